"""`scan_layers=False` unrolls each layer group's scan. It must compute what the scan computes (forward, gradients,
cached generation, the VL model with its vision tower), leave no loop over the layers in the compiled program, and
reach the trainer from its config key."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
import ernie_jax.vl as vl
from ernie_jax.model import with_options
from ernie_jax.options import ModelOptions, OptionsError
from ernie_jax.training.config import ConfigError, apply_overrides, load_preset
from tests.helpers import TINY_MOE, TINY_MOE_INTERVAL, assert_close, random_ids
from tests.test_vl_parity import hf_vl_model, random_patches, vl_row

B, T = 2, 16


def _value_and_grad(model, ids, cotangent):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        logits = nnx.merge(graphdef, p, rest)(ids)  # [B, T, V]
        return jnp.sum(logits * cotangent), logits

    (_, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    return logits, grads


@pytest.mark.parametrize("cfg", [TINY_MOE, TINY_MOE_INTERVAL], ids=["moe", "moe_interval"])
@pytest.mark.parametrize("remat", ["none", "dots_all"])
def test_unrolled_layers_give_the_scans_logits_and_gradients(cfg, remat):
    model = ernie_jax.ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(random_ids(B, T, cfg.vocab_size))
    cotangent = jax.random.normal(jax.random.key(1), (B, T, cfg.vocab_size))
    scanned = _value_and_grad(with_options(model, remat=remat, scan_layers=True), ids, cotangent)
    unrolled = _value_and_grad(with_options(model, remat=remat, scan_layers=False), ids, cotangent)
    assert_close(unrolled[0], scanned[0], np.float32, "logits")
    for (path, got), (_, want) in zip(
        jax.tree_util.tree_leaves_with_path(unrolled[1]), jax.tree_util.tree_leaves_with_path(scanned[1]), strict=True
    ):
        assert_close(got, want, np.float32, jax.tree_util.keystr(path), scaled=True)


def _layer_loops(model, ids) -> list[str]:
    """The compiled forward's while loops that carry the hidden state [B, T, D] (a loop over layers)."""
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    hlo = jax.jit(lambda p, x: nnx.merge(graphdef, p, rest)(x)).lower(params, ids).compile().as_text()
    hidden = f"f32[{B},{T},{model.config.hidden_size}]"
    return [line for line in hlo.splitlines() if re.search(r"\bwhile\(", line) and hidden in line.split("=")[1]]


def test_unrolled_program_has_no_loop_over_the_layers():
    cfg = TINY_MOE_INTERVAL  # two (moe, dense) repeats: one layer group scanned twice
    model = ernie_jax.ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(random_ids(B, T, cfg.vocab_size))
    assert len(_layer_loops(with_options(model, scan_layers=True), ids)) == 1
    assert _layer_loops(with_options(model, scan_layers=False), ids) == []


def test_unrolled_generation_equals_the_scans():
    model = ernie_jax.ErnieForCausalLM(TINY_MOE, rngs=nnx.Rngs(0))
    prompts = [random_ids(1, n, TINY_MOE.vocab_size, seed=n)[0].tolist() for n in (9, 5, 12)]

    def generate(m):
        return ernie_jax.generate(m, prompts, max_new_tokens=8, temperature=0.0, eos_token_id=None)

    assert generate(with_options(model, scan_layers=False)) == generate(with_options(model, scan_layers=True))


def test_unrolled_vl_model_gives_the_scans_logits(tmp_path):
    hf_vl_model({}, {}).save_pretrained(tmp_path)
    model = vl.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    rng = np.random.RandomState(5)
    ids, types = vl_row([2, ("image", 6), 3], rng)
    grid = np.array([[1, 4, 6]])
    inputs = dict(
        mm_token_type_ids=np.array([types]),
        moe_mm_token_type_ids=vl.moe_token_types(np.array([ids]), model.config),
        pixel_values=random_patches(grid, rng),
        image_grid_thw=grid,
    )

    def logits(m):
        return np.asarray(m(np.array([ids]), **inputs))

    assert_close(
        logits(with_options(model, scan_layers=False)), logits(with_options(model, scan_layers=True)), np.float32
    )


def test_scan_layers_is_a_run_option_the_trainer_passes_on():
    assert load_preset("tiny").model_options().scan_layers is False
    cfg = apply_overrides(load_preset("0p3b"), ["scan_layers=false"])
    assert cfg.model_options().scan_layers is False
    with pytest.raises(OptionsError, match="scan_layers: must be true or false"):
        ModelOptions(scan_layers="no")
    with pytest.raises(ConfigError, match="scan_layers"):
        apply_overrides(load_preset("tiny"), ["scan_layers=sometimes"])
