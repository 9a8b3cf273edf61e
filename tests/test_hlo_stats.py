"""`ernie_jax.tools.hlo_stats` weights loop bodies by their trip counts: checked against XLA's own cost analysis of the
same program with the loop unrolled, on CPU and (through libtpu) for TPU."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ernie_jax.tools.hlo_stats import Module, op_times, roofline_seconds, seconds_by_kind
from tests.helpers import tpu_topology_devices

LAYERS = 6
# cost_analysis also counts elementwise FLOPs (tanh, adds), which hlo_stats leaves out: a few percent.
FLOPS_RTOL = 0.05


def _stack(unroll: bool):
    def loss(w, x):  # w [L, D, D], x [T, D]
        def body(h, wi):
            return jnp.tanh(h @ wi), None

        h, _ = jax.lax.scan(body, x, w, unroll=unroll)
        return jnp.sum(h * h)

    return jax.jit(jax.grad(loss, argnums=(0, 1)))  # both: no matmul is dead code in the unrolled program


def _xla_flops(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list | tuple) else cost)["flops"])


def _compile_pair(w, x):
    scanned = _stack(unroll=False).lower(w, x).compile()
    unrolled = _stack(unroll=True).lower(w, x).compile()
    return scanned, unrolled


def test_loop_bodies_weighted_by_trip_count_cpu():
    w = jax.ShapeDtypeStruct((LAYERS, 128, 128), jnp.float32)
    x = jax.ShapeDtypeStruct((256, 128), jnp.float32)
    scanned, unrolled = _compile_pair(w, x)
    module = Module(scanned.as_text())
    assert LAYERS in module.trip_counts.values() and not module.unknown_trip_counts
    # Forward and backward matmuls of every layer: 3 per layer (h @ w, dh @ w^T, h^T @ dh).
    expected = 3 * LAYERS * 2 * 256 * 128 * 128
    assert module.flops() == pytest.approx(expected, rel=1e-6)
    assert module.flops() == pytest.approx(_xla_flops(unrolled), rel=FLOPS_RTOL)
    # Unweighted, it agrees with XLA's cost_analysis of the scanned program, which visits the body once.
    assert module.flops(weighted=False) == pytest.approx(_xla_flops(scanned), rel=FLOPS_RTOL)
    assert module.flops(weighted=False) < module.flops() / 2


def test_op_times_name_the_slow_ops_and_add_up_to_the_roofline():
    w = jax.ShapeDtypeStruct((LAYERS, 128, 128), jnp.float32)
    x = jax.ShapeDtypeStruct((256, 128), jnp.float32)
    scanned, _ = _compile_pair(w, x)
    module = Module(scanned.as_text())
    peak, hbm = 1e12, 1e11  # a chip where these small matmuls are memory-bound, so bytes decide their time
    ops = op_times(module, peak, hbm)
    assert [op.seconds for op in ops] == sorted((op.seconds for op in ops), reverse=True)
    assert sum(op.seconds for op in ops) == pytest.approx(roofline_seconds(module, peak, hbm, 1e11)["compute_s"])
    matmuls = [op for op in ops if op.kind == "matmul"]
    assert sum(op.flops for op in matmuls) == pytest.approx(3 * LAYERS * 2 * 256 * 128 * 128, rel=1e-6)
    assert {op.runs for op in matmuls} == {LAYERS}  # each in a loop body, run once per layer
    for op in ops:
        assert op.seconds == pytest.approx(max(op.flops / peak, op.bytes / hbm))
        assert op.bound == ("compute" if op.flops / peak >= op.bytes / hbm else "memory")
    by_kind = seconds_by_kind(ops)
    assert sum(by_kind.values()) == pytest.approx(sum(op.seconds for op in ops))
    assert "matmul" in by_kind


def test_op_kinds_of_sort_gather_and_scatter():
    def fn(x, idx):  # x [N, D], idx [N]
        order = jnp.argsort(idx)
        gathered = jnp.take(x, order, axis=0)
        return jnp.zeros_like(x).at[order].add(gathered * 2.0)

    compiled = jax.jit(fn).lower(jnp.zeros((512, 64)), jnp.zeros((512,), jnp.int32)).compile()
    module = Module(compiled.as_text())
    kinds = {op.kind for op in op_times(module, 1e12, 1e11)}
    assert {"sort", "gather", "scatter"} <= kinds, kinds


def _tpu_devices(topology: str = "v5p:2x2x1"):
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    return tpu_topology_devices(topology)  # skips only without libtpu


@pytest.mark.tpu
def test_loop_bodies_weighted_tpu_collectives_and_convolutions():
    mesh = Mesh(_tpu_devices(), ("x",))
    # Weights sharded on their output dim: each layer all-gathers its weight, forward and backward.
    w = jax.ShapeDtypeStruct((LAYERS, 512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P(None, None, "x")))
    x = jax.ShapeDtypeStruct((2048, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
    scanned, unrolled = _compile_pair(w, x)
    module = Module(scanned.as_text())
    assert LAYERS in module.trip_counts.values() and not module.unknown_trip_counts
    assert module.flops() == pytest.approx(3 * LAYERS * 2 * 512 * 512 * 512, rel=1e-6)  # per chip: 512 rows each
    assert module.flops() == pytest.approx(_xla_flops(unrolled), rel=FLOPS_RTOL)
    # The scanned step gathers each layer's weight in the forward and again in the backward loop.
    gathers = module.collectives()["all-gather"]
    assert module.collectives(weighted=False)["all-gather"]["count"] == 2
    assert gathers["count"] == 2 * LAYERS
    assert gathers["bytes"] == 2 * LAYERS * 512 * 512 * 2  # one whole bf16 [512, 512] weight each


@pytest.mark.tpu
def test_padded_window_convolution_flops_tpu():
    # XLA:TPU writes this projection as a convolution whose window of N slides over 2N - 1 padded positions;
    # only the taps that land on the input are work.
    mesh = Mesh(_tpu_devices(), ("x",))
    b, t, d, n, h = 4, 256, 512, 20, 128
    x = jax.ShapeDtypeStruct((b, t, d), jnp.bfloat16, sharding=NamedSharding(mesh, P("x")))
    w = jax.ShapeDtypeStruct((d, n, h), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    fn = jax.jit(lambda x, w: jnp.einsum("BTD,DNH->BTNH", x, w))
    compiled = fn.lower(x, w).compile()
    module = Module(compiled.as_text())
    expected = 2 * (b // 4) * t * d * n * h
    assert module.flops() == pytest.approx(expected, rel=1e-6)
    assert module.flops() == pytest.approx(_xla_flops(compiled), rel=FLOPS_RTOL)


@pytest.mark.tpu
def test_roofline_near_xla_cost_model_tpu():
    # Where libtpu's cost model gives a step time (no loops, no custom calls), the roofline is near it.
    mesh = Mesh(_tpu_devices(), ("x",))
    w = jax.ShapeDtypeStruct((LAYERS, 1024, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((8192, 1024), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
    compiled = _stack(unroll=True).lower(w, x).compile()
    cost = compiled.cost_analysis()
    optimal = float((cost[0] if isinstance(cost, list | tuple) else cost)["optimal_seconds"])
    assert optimal > 0
    est = roofline_seconds(Module(compiled.as_text()), 459e12, 2.765e12, 1.8e11)
    assert 0.5 < est["compute_s"] / optimal < 2.0, (est, optimal)
