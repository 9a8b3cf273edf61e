"""The Pallas TPU kernels compile (Mosaic lowering included) for real TPU topologies, AOT on this CPU host.

Each test lowers the kernel inside `shard_map` (the only place a Mosaic kernel compiles from a topology
description) at ERNIE-4.5-21B-A3B shapes, forward and backward, so a Mosaic lowering error fails CI.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import pallas_kernels
from tests.helpers import tpu_topology_devices

pytestmark = pytest.mark.tpu

TOPOLOGIES = ["v4:2x2x1", "v5p:2x2x1"]

# a3b: hidden 2560, expert width 1536, 64 experts; 20 query / 4 kv heads of 128.
HIDDEN, EXPERT_WIDTH, EXPERTS = 2560, 1536, 64
HEADS, KV_HEADS, HEAD_DIM = 20, 4, 128


def tpu_mesh(topology: str, axis: str) -> Mesh:
    # Compiling only: skip libtpu's one-process-per-host lockfile, so a second test process can compile too.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = tpu_topology_devices(topology)  # skips only without libtpu
    return Mesh(np.array(devices).reshape(-1), (axis,))


def _sds(mesh, shape, dtype, spec):
    return jax.ShapeDtypeStruct(shape, dtype, sharding=NamedSharding(mesh, spec))


def _mosaic_calls(compiled) -> int:
    return compiled.as_text().count("tpu_custom_call")


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_gmm_expert_swiglu_compiles(topology):
    """Routed-expert SwiGLU (gate, up, down gmm) with its gradient, experts sharded, group_offset per shard."""
    mesh = tpu_mesh(topology, "expert")
    shards = mesh.shape["expert"]
    local = EXPERTS // shards
    tokens = 2048  # rows per shard, sorted by expert

    def body(x, w_gate, w_up, w_down, sizes):
        offset = jax.lax.axis_index("expert") * local
        mm = lambda a, w: pallas_kernels.gmm(
            a, w, sizes, group_offset=offset, implementation="pallas", kernel="tpu", interpret=False
        )

        def loss(x, w_gate, w_up, w_down):
            h = jax.nn.silu(mm(x, w_gate)) * mm(x, w_up)  # [M, F]
            return jnp.sum(mm(h, w_down).astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, w_gate, w_up, w_down)

    e = P("expert")
    fn = jax.shard_map(body, mesh=mesh, in_specs=(e, e, e, e, P()), out_specs=(e, e, e, e))
    compiled = (
        jax.jit(fn)
        .lower(
            _sds(mesh, (tokens * shards, HIDDEN), jnp.bfloat16, e),
            _sds(mesh, (EXPERTS, HIDDEN, EXPERT_WIDTH), jnp.bfloat16, e),
            _sds(mesh, (EXPERTS, HIDDEN, EXPERT_WIDTH), jnp.bfloat16, e),
            _sds(mesh, (EXPERTS, EXPERT_WIDTH, HIDDEN), jnp.bfloat16, e),
            _sds(mesh, (EXPERTS,), jnp.int32, P()),
        )
        .compile()
    )
    # 3 forward gmm + 3 dlhs gmm + 3 tgmm: every one of them went through Mosaic.
    assert _mosaic_calls(compiled) == 9


@pytest.mark.parametrize("topology", TOPOLOGIES)
def test_gmm_fp32_compiles(topology):
    """fp32 operands with an fp32 output (the router-free fp32 path), forward only."""
    mesh = tpu_mesh(topology, "expert")
    shards = mesh.shape["expert"]

    def body(x, w, sizes):
        offset = jax.lax.axis_index("expert") * w.shape[0]
        return pallas_kernels.gmm(x, w, sizes, group_offset=offset, implementation="pallas", interpret=False)

    e = P("expert")
    fn = jax.shard_map(body, mesh=mesh, in_specs=(e, e, P()), out_specs=e)
    compiled = (
        jax.jit(fn)
        .lower(
            _sds(mesh, (1024 * shards, HIDDEN), jnp.float32, e),
            _sds(mesh, (EXPERTS, HIDDEN, EXPERT_WIDTH), jnp.float32, e),
            _sds(mesh, (EXPERTS,), jnp.int32, P()),
        )
        .compile()
    )
    assert _mosaic_calls(compiled) == 1


@pytest.mark.parametrize("topology", TOPOLOGIES)
@pytest.mark.parametrize("packed", [True, False], ids=["segments", "causal_only"])
def test_flash_attention_compiles(topology, packed):
    """Causal GQA flash attention (20 q / 4 kv heads of 128), forward and dq/dkv, batch sharded over devices."""
    mesh = tpu_mesh(topology, "data")
    shards = mesh.shape["data"]
    seq = 2048

    def body(q, k, v, segment_ids):
        def loss(q, k, v):
            out = pallas_kernels.flash_attention(
                q, k, v, segment_ids=segment_ids if packed else None, implementation="pallas", kernel="tpu",
                interpret=False,
            )  # fmt: skip
            return jnp.sum(out.astype(jnp.float32) ** 2)

        return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

    d = P("data")
    fn = jax.shard_map(body, mesh=mesh, in_specs=(d, d, d, d), out_specs=(d, d, d))
    compiled = (
        jax.jit(fn)
        .lower(
            _sds(mesh, (shards, seq, HEADS, HEAD_DIM), jnp.bfloat16, d),
            _sds(mesh, (shards, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16, d),
            _sds(mesh, (shards, seq, KV_HEADS, HEAD_DIM), jnp.bfloat16, d),
            _sds(mesh, (shards, seq), jnp.int32, d),
        )
        .compile()
    )
    assert _mosaic_calls(compiled) == 3  # forward, dq, dkv
