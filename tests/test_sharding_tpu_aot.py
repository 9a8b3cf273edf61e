"""The ragged all-to-all expert-parallel MoE compiles for a TPU v5p topology on this CPU host (through libtpu)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding

import sharding
from ernie_jax.moe import expert_parallel_moe
from ernie_jax.options import ModelOptions
from tests.helpers import tpu_topology_devices

pytestmark = pytest.mark.tpu


@functools.cache
def tpu_devices(topology: str):
    return tpu_topology_devices(topology)  # skips only without libtpu


@pytest.mark.parametrize("transport", ["ragged_a2a", "allgather", "ragged_a2a_bounded"])
def test_sharding_moe_layer_compiles_for_v5p(transport):
    # "ragged_a2a_bounded": receive buffers of 2 balanced shares instead of the worst case (expert = 4 shares).
    transport, buffer_factor = ("ragged_a2a", 2.0) if transport == "ragged_a2a_bounded" else (transport, 0.0)
    devices = tpu_devices("v5p:2x2x2")
    mesh = sharding.make_mesh(data=1, fsdp=2, expert=4, devices=devices)
    # a3b expert shapes: 64 experts, hidden 2560, expert width 1536, k=6; 4096 tokens.
    n, d, f, e, k = 4096, 2560, 1536, 64, 6

    def spec(*logical):
        return NamedSharding(mesh, sharding.logical_to_spec(logical, mesh))

    args = (
        jax.ShapeDtypeStruct((n, d), jnp.bfloat16, sharding=spec("batch", None)),
        jax.ShapeDtypeStruct((n, k), jnp.int32, sharding=spec("batch", None)),
        jax.ShapeDtypeStruct((n, k), jnp.float32, sharding=spec("batch", None)),
        jax.ShapeDtypeStruct((e, d, f), jnp.bfloat16, sharding=spec("experts", "embed", "expert_mlp")),
        jax.ShapeDtypeStruct((e, d, f), jnp.bfloat16, sharding=spec("experts", "embed", "expert_mlp")),
        jax.ShapeDtypeStruct((e, f, d), jnp.bfloat16, sharding=spec("experts", "expert_mlp", "embed")),
    )

    def layer(x, experts, weights, w_gate, w_up, w_down):
        options = ModelOptions(moe_transport=transport, moe_buffer_factor=buffer_factor)
        return expert_parallel_moe(x, experts, weights, w_gate, w_up, w_down, mesh=mesh, options=options)

    def loss(*a):
        return jnp.sum(layer(*a).astype(jnp.float32))

    compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 3, 4, 5))).lower(*args).compile()
    hlo = compiled.as_text()
    if transport == "ragged_a2a":
        assert "ragged-all-to-all" in hlo
    else:
        assert "reduce-scatter" in hlo and "all-gather" in hlo
    mem = compiled.memory_analysis()
    print(f"[sharding-tpu] {transport} buffer {buffer_factor}: temp {mem.temp_size_in_bytes / 2**20:.0f} MiB per chip")
    if transport == "ragged_a2a":
        # The receive buffer's rows: n_local * k * (buffer_factor or EP), n_local = 4096 / 8 devices.
        rows = 512 * k * (buffer_factor or 4)
        assert f"bf16[{int(rows)},{d}]" in hlo
