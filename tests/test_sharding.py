"""Expert parallelism and layouts on 8 emulated CPU devices. Every node id here contains 'sharding'."""

from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding
from ernie_jax.config import ERNIE_4_5_21B_A3B
from ernie_jax.model import ErnieForCausalLM, abstract_model, moe_layer_stats
from ernie_jax.moe import Routing, dense_moe_oracle, expert_parallel_moe
from ernie_jax.options import ModelOptions
from ernie_jax.training.config import load_preset
from tests.helpers import TINY_MOE, assert_close

MESHES = {
    "one_device": dict(data=1, devices=1),
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2),
    "expert8": dict(data=1, expert=8),
}
CFG = TINY_MOE  # 8 experts, k=2, dense first layer, 2 shared experts
B, T = 8, 8


def _mesh(spec):
    spec = dict(spec)
    n = spec.pop("devices", None)
    return sharding.make_mesh(**spec, devices=jax.devices()[:n] if n else None)


def _loss_fn(graphdef, state, ids, cotangent):
    model = nnx.merge(graphdef, state)
    logits, aux = model(ids, return_aux=True)
    stats = moe_layer_stats(CFG, aux["router_stats"])
    return jnp.sum(logits * cotangent) + jnp.sum(stats.aux_loss) + jnp.sum(stats.z_loss), logits


@functools.cache
def _reference():
    model = ErnieForCausalLM(CFG, rngs=nnx.Rngs(3))
    graphdef, state = nnx.split(model)
    ids = jax.random.randint(jax.random.key(1), (B, T), 0, CFG.vocab_size)
    cot = jax.random.normal(jax.random.key(2), (B, T, CFG.vocab_size))
    (_, logits), grads = jax.jit(jax.value_and_grad(_loss_fn, argnums=1, has_aux=True), static_argnums=0)(
        graphdef, state, ids, cot
    )
    return graphdef, state, ids, cot, logits, grads


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_sharding_logits_and_grads_match_single_device(mesh_name):
    graphdef, state, ids, cot, ref_logits, ref_grads = _reference()
    mesh = _mesh(MESHES[mesh_name])
    placed = sharding.shard_state(state, mesh)
    batch = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", None), mesh))
    with sharding.use_mesh(mesh):
        step = jax.jit(jax.value_and_grad(_loss_fn, argnums=1, has_aux=True), static_argnums=0)
        (_, logits), grads = step(graphdef, placed, jax.device_put(ids, batch), cot)
    worst_logit = assert_close(logits, ref_logits, np.float32, f"{mesh_name} logits")
    worst_grad = 0.0
    for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads), strict=True):
        worst_grad = max(worst_grad, assert_close(g.get_value(), r.get_value(), np.float32, f"{mesh_name} grad {path}"))
    print(f"[sharding] {mesh_name}: max|dlogit|={worst_logit:.2e} max|dgrad|={worst_grad:.2e}")
    w_gate = placed["groups"][1]["layers"][0]["ffn"]["w_gate"].get_value()  # [R, E, D, F]
    if mesh.shape["expert"] > 1:
        assert all(s.data.shape[1] < CFG.moe_num_experts for s in w_gate.addressable_shards), (
            "a device holds all experts"
        )


def _skewed_routing(n, k, num_experts, key):
    """Routing where most tokens pick experts 0 and 1 and several experts get nothing (empty groups)."""
    k1, k2 = jax.random.split(key)
    logits = jax.random.normal(k1, (n, num_experts)) + jnp.array([4.0, 3.5] + [0.0] * (num_experts - 2))
    logits = logits.at[:, 5:].add(-30.0)  # experts 5.. never chosen
    probs = jax.nn.softmax(logits)
    weights, experts = jax.lax.top_k(probs, k)
    return Routing(weights / weights.sum(-1, keepdims=True), experts.astype(jnp.int32), probs, logits)


@pytest.mark.parametrize("mesh_name", ["data2_expert4", "fsdp2_expert2_tensor2", "expert8"])
def test_sharding_ep_moe_matches_dense_oracle_with_empty_experts(mesh_name):
    n, d, f, e, k = 64, 16, 8, 8, 2
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, d))
    w_gate, w_up = (jax.random.normal(kk, (e, d, f)) * 0.3 for kk in keys[1:3])
    w_down = jax.random.normal(keys[3], (e, f, d)) * 0.3
    routing = _skewed_routing(n, k, e, keys[4])
    assert int(jnp.bincount(routing.experts.reshape(-1), length=e)[5:].sum()) == 0
    mesh = _mesh(MESHES[mesh_name])

    def ep(x, w_gate, w_up, w_down, weights):
        return expert_parallel_moe(x, routing.experts, weights, w_gate, w_up, w_down, mesh=mesh)

    def oracle(x, w_gate, w_up, w_down, weights):
        return dense_moe_oracle(x, routing._replace(weights=weights), w_gate, w_up, w_down)

    args = (x, w_gate, w_up, w_down, routing.weights)
    assert_close(jax.jit(ep)(*args), oracle(*args), np.float32, "forward")
    cot = jax.random.normal(jax.random.key(9), (n, d))
    g_ep = jax.grad(lambda *a: jnp.sum(ep(*a) * cot), argnums=(0, 1, 2, 3, 4))(*args)
    g_ref = jax.grad(lambda *a: jnp.sum(oracle(*a) * cot), argnums=(0, 1, 2, 3, 4))(*args)
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down", "weights"), g_ep, g_ref, strict=True):
        assert_close(a, b, np.float32, f"grad {name}")


def test_sharding_experts_not_divisible_by_expert_axis_is_a_clear_error():
    mesh = _mesh(dict(data=2, expert=4))
    x = jnp.zeros((8, 16))
    w = jnp.zeros((6, 16, 8))
    with pytest.raises(sharding.ShardingError, match="experts"):
        expert_parallel_moe(x, jnp.zeros((8, 2), jnp.int32), jnp.zeros((8, 2)), w, w, jnp.zeros((6, 8, 16)), mesh=mesh)


def test_sharding_ragged_all_to_all_refuses_cpu_with_the_fix():
    mesh = _mesh(dict(data=1, expert=8))
    w = jnp.zeros((8, 16, 8))
    with pytest.raises(NotImplementedError, match="allgather"):
        expert_parallel_moe(
            jnp.zeros((16, 16)),
            jnp.zeros((16, 2), jnp.int32),
            jnp.zeros((16, 2)),
            w,
            w,
            jnp.zeros((8, 8, 16)),
            mesh=mesh,
            options=ModelOptions(moe_transport="ragged_a2a"),
        )


def test_sharding_mesh_errors_name_the_fix():
    with pytest.raises(sharding.MeshError, match="-1"):
        sharding.make_mesh(data=3, expert=2)
    with pytest.raises(sharding.MeshError, match="at most one"):
        sharding.make_mesh(data=-1, expert=-1)
    assert dict(sharding.make_mesh(data=-1, expert=4).shape)["data"] == 2


# ------------------------------------------------------------------------------------------------------------------
# Layout golden: PartitionSpec of every a3b parameter on an abstract v5p-64 mesh, reviewed as a JSON diff.
GOLDEN = os.path.join(os.path.dirname(__file__), "golden", "a3b_v5p64_param_specs.json")


def a3b_param_specs() -> dict[str, list]:
    """The a3b_tpu preset's own model and mesh (64 devices) on an abstract mesh: no devices needed."""
    preset = load_preset("a3b_tpu")
    sizes = sharding.resolve_mesh_shape(preset.mesh.sizes, preset.min_devices)
    mesh = jax.sharding.AbstractMesh(tuple(sizes.values()), tuple(sizes))
    assert preset.model == ERNIE_4_5_21B_A3B
    state = nnx.state(abstract_model(preset.model))
    out = {}
    for path, var in nnx.to_flat_state(state):
        name = ".".join(map(str, path))
        spec = sharding.logical_to_spec(
            var.get_metadata()["logical_axes"], mesh, shape=var.get_value().shape, name=name
        )
        out[name] = [list(s) if isinstance(s, tuple) else s for s in spec] + [None] * (
            len(var.get_value().shape) - len(spec)
        )
    return out


def test_sharding_a3b_layout_matches_golden():
    specs = a3b_param_specs()
    if os.environ.get("UPDATE_GOLDEN"):
        os.makedirs(os.path.dirname(GOLDEN), exist_ok=True)
        with open(GOLDEN, "w") as f:
            json.dump(specs, f, indent=1, sort_keys=True)
    with open(GOLDEN) as f:
        golden = json.load(f)
    assert specs == golden, "parameter layout changed: review, then regenerate with UPDATE_GOLDEN=1"
    assert specs["groups.1.layers.0.ffn.w_gate"] == [None, "expert", "fsdp", None]
