"""Parameter roles are types and metadata, not paths: a module added to the model (an MTP block, an adapter, a user's
head) is handled by what its variables are, and whatever cannot be handled fails loudly instead of silently.

Checked for the optimizer's weight-decay mask, the orthogonal router loss, the aux-free bias update and the
Hugging Face name map.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax import save_pretrained
from ernie_jax.layers import make_param, normal_init, zeros_init
from ernie_jax.model import ErnieForCausalLM
from ernie_jax.moe import CorrectionBias, RouterWeight, update_correction_biases
from ernie_jax.training.config import OptimConfig
from ernie_jax.training.losses import orthogonal_loss, router_orthogonal_loss
from ernie_jax.training.optim import make_optimizer
from ernie_jax.training.state import split_model
from tests.helpers import TINY_MOE


class ExtraHead(nnx.Module):
    """A module outside the layer groups, with a matrix, a bias and a second router, like an MTP block."""

    def __init__(self, d: int, e: int):
        rngs = nnx.Rngs(7)
        self.proj = make_param(rngs, normal_init(0.02), (d, d), ("embed", "mlp"), jnp.float32)
        self.proj_bias = make_param(rngs, zeros_init, (d,), ("embed",), jnp.float32)
        self.router = make_param(
            rngs, normal_init(0.02), (d, e), ("embed", "router_experts"), jnp.float32, param_type=RouterWeight
        )
        self.gate = nnx.Param(jnp.ones((d, d)), logical_axes=("embed", "mlp"), weight_decay=True)  # named "router"-ish


def _model_with_extra() -> ErnieForCausalLM:
    model = ErnieForCausalLM(TINY_MOE, rngs=nnx.Rngs(0))
    model.extra = ExtraHead(TINY_MOE.hidden_size, TINY_MOE.moe_num_experts)
    return model


def _decay_mask(params: nnx.State) -> dict[str, bool]:
    """The mask AdamW actually received, read back from the optimizer state's structure-matched mask."""
    optimizer = make_optimizer(OptimConfig(weight_decay=0.5, clip_norm=0.0, warmup_steps=0), 10, params)
    ones = jax.tree.map(jnp.ones_like, params)
    # With zero gradients and parameters of ones, an AdamW update is -lr * wd exactly where decay applies, else 0.
    updates, _ = optimizer.update(jax.tree.map(jnp.zeros_like, params), optimizer.init(ones), ones)
    return {".".join(map(str, path)): bool(jnp.any(v.get_value() != 0)) for path, v in nnx.to_flat_state(updates)}


def test_weight_decay_follows_metadata_for_an_added_module():
    _, params, _ = split_model(_model_with_extra())
    mask = _decay_mask(params)
    assert mask["extra.proj"] and mask["extra.router"] and mask["extra.gate"]
    assert not mask["extra.proj_bias"]
    assert mask["embed"] and mask["groups.1.layers.0.ffn.w_gate"] and mask["groups.1.layers.0.ffn.router"]
    norms = [k for k in mask if k.endswith("norm.weight")]
    assert norms and not any(mask[k] for k in norms)


def test_a_parameter_without_decay_metadata_is_refused_by_name():
    model = _model_with_extra()
    model.extra.stray = nnx.Param(jnp.ones((4, 4)))  # made without make_param: no weight_decay metadata
    _, params, _ = split_model(model)
    with pytest.raises(ValueError, match=r"extra\.stray: parameter has no weight_decay metadata"):
        make_optimizer(OptimConfig(), 10, params)


def test_orthogonal_loss_selects_routers_by_type_not_name():
    model = _model_with_extra()
    _, params, _ = split_model(model)
    routers = [model.groups[1].layers[0].ffn.router.get_value(), model.extra.router.get_value()[None]]
    expected = sum(float(router_orthogonal_loss(w)) for w in routers)
    np.testing.assert_allclose(float(orthogonal_loss(params)), expected, rtol=1e-6)
    # A plain Param whose name says "router" is not a router.
    model.extra.router = nnx.Param(model.extra.router.get_value(), logical_axes=("embed", "router_experts"))
    _, params, _ = split_model(model)
    np.testing.assert_allclose(float(orthogonal_loss(params)), float(router_orthogonal_loss(routers[0])), rtol=1e-6)


def test_bias_update_reaches_every_moe_block_and_refuses_a_stray_bias():
    cfg = TINY_MOE
    model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
    e = cfg.moe_num_experts
    load = jnp.arange(e, dtype=jnp.float32)  # expert 0 idle, expert e-1 busiest
    loads = [[None if kind == "dense" else jnp.tile(load, (r, 1)) for kind in p] for p, r in cfg.layer_groups]
    update_correction_biases(model, loads, 0.5)
    moved = [
        layer.ffn.correction_bias.get_value()
        for (p, _), group in zip(cfg.layer_groups, model.groups, strict=True)
        for kind, layer in zip(p, group.layers, strict=True)
        if kind == "moe"
    ]
    assert moved
    for bias in moved:
        np.testing.assert_array_equal(np.sign(bias[:, 0]), 1.0)
        np.testing.assert_array_equal(np.sign(bias[:, -1]), -1.0)

    model.extra = ExtraHead(cfg.hidden_size, e)
    model.extra.correction_bias = CorrectionBias(jnp.zeros((e,)), logical_axes=("router_experts",))
    with pytest.raises(ValueError, match=r"no router statistics.*extra\.correction_bias"):
        update_correction_biases(model, loads, 0.5)


def test_hf_name_map_refuses_a_parameter_it_cannot_name(tmp_path):
    with pytest.raises(ValueError, match=r"save_pretrained: .*no HF name for extra\.gate, extra\.proj"):
        save_pretrained(_model_with_extra(), tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.safetensors"))  # nothing half-written


def test_with_options_reaches_every_module():
    """Run options travel with the model: `with_options` changes them in every module that reads them (the MoE
    transport in each MoE block, remat in each group, kernels in attention) and leaves the original alone."""
    from ernie_jax.model import with_options
    from ernie_jax.options import ModelOptions

    model = ErnieForCausalLM(TINY_MOE, rngs=nnx.Rngs(0), options=ModelOptions(moe_transport="allgather"))
    changed = with_options(model, moe_transport="ragged_a2a", remat="full")
    readers = [m for _, m in nnx.iter_graph(changed) if isinstance(getattr(m, "options", None), ModelOptions)]
    assert len(readers) > len(TINY_MOE.layer_groups)
    assert all(m.options.moe_transport == "ragged_a2a" and m.options.remat == "full" for m in readers)
    assert changed.groups[1].layers[0].ffn.options.moe_transport == "ragged_a2a"
    assert model.groups[1].layers[0].ffn.options.moe_transport == "allgather"
    assert changed.embed.get_value() is model.embed.get_value()  # the weights are shared, not copied
