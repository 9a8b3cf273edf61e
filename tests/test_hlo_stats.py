"""`ernie_jax.tools.hlo_stats` weights loop bodies by their trip counts: checked against XLA's own cost analysis of the
same program with the loop unrolled, on CPU and (through libtpu) for TPU. Its HBM bytes per op follow XLA's
`HloCostAnalysis` (a dynamic-slice reads the slice, an in-place update writes the update): checked against XLA's
"bytes accessed" on programs without loops."""

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
    # Where libtpu's cost model gives a step time (no loops, no custom calls), the roofline is near it. libtpu
    # adds a fixed cost per op that dominates matmuls of a few microseconds, so the layers are big enough for the
    # FLOPs to count: with [1024, 1024] layers the ratio is 0.46, and it passed the band only while each layer's
    # weight slice was charged the bytes of the whole stack.
    mesh = Mesh(_tpu_devices(), ("x",))
    w = jax.ShapeDtypeStruct((LAYERS, 2048, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
    x = jax.ShapeDtypeStruct((16384, 2048), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
    compiled = _stack(unroll=True).lower(w, x).compile()
    cost = compiled.cost_analysis()
    optimal = float((cost[0] if isinstance(cost, list | tuple) else cost)["optimal_seconds"])
    assert optimal > 0
    est = roofline_seconds(Module(compiled.as_text()), 459e12, 2.765e12, 1.8e11)
    assert 0.5 < est["compute_s"] / optimal < 2.0, (est, optimal)


# ------------------------------------------------------------------------------------------- HBM bytes per op
STACK = (8, 2048, 4096)  # f32: a 256 MiB "scan-stacked" array, past what libtpu would prefetch into on-chip memory
LAYER = STACK[1:]
_F32, _I32 = jnp.float32, jnp.int32


def _layer(s, i):
    return jax.lax.dynamic_index_in_dim(s, i, keepdims=False)


def _stack_grad(w, x):
    def loss(w, x):
        h, _ = jax.lax.scan(lambda h, wi: (jnp.tanh(h @ wi), None), x, w, unroll=True)
        return jnp.sum(h * h)

    return jax.grad(loss, argnums=(0, 1))(w, x)


# name: (function, argument (shape, dtype)s, donated arguments, bytes of what the op must at most touch or None)
BYTES_PROGRAMS = {
    # One layer out of a stack reads the layer, not the stack (what scan bodies do with stacked weights).
    "layer_of_stack": (lambda s, i: _layer(s, i) * 2.0, [(STACK, _F32), ((), _I32)], (), 2 * 4 * 2048 * 4096),
    "two_layers_of_stack": (
        lambda s, i, j: _layer(s, i) * _layer(s, j),
        [(STACK, _F32), ((), _I32), ((), _I32)],
        (),
        3 * 4 * 2048 * 4096,
    ),
    # An update in place (the buffer donated) reads and writes the update, not the whole buffer.
    "update_in_place": (
        lambda s, u, i: jax.lax.dynamic_update_index_in_dim(s, u * 3.0 + 1.0, i, 0),
        [(STACK, _F32), (LAYER, _F32), ((), _I32)],
        (0,),
        2 * 4 * 2048 * 4096,
    ),
    "static_slice": (lambda s: s[2:5] + 1.0, [(STACK, _F32)], (), None),
    "layer_and_whole_stack": (lambda s, i: _layer(s, i) + s.sum(0), [(STACK, _F32), ((), _I32)], (), None),
    "multi_output": (
        lambda a, b: (jnp.tanh(a) * b, jnp.sum(jnp.tanh(a), axis=0), jnp.exp(b)),
        [(LAYER, _F32), (LAYER, _F32)],
        (),
        None,
    ),
    "concatenate": (lambda a, b: jnp.concatenate([a, b], 0) * 2.0, [(LAYER, _F32), (LAYER, _F32)], (), None),
    "transpose": (lambda a: a.T + 1.0, [(LAYER, _F32)], (), None),
    "norm": (
        lambda a, g: a * jax.lax.rsqrt(jnp.mean(a * a, axis=-1, keepdims=True) + 1e-6) * g,
        [(LAYER, _F32), ((4096,), _F32)],
        (),
        None,
    ),
    "gather_rows": (lambda a, i: a[i], [(LAYER, _F32), ((2048,), _I32)], (), None),
    "stack_grad_unrolled": (_stack_grad, [((6, 512, 512), _F32), ((1024, 512), _F32)], (), None),
}
# libtpu prices some ops with its own model rather than HloCostAnalysis's operands-plus-result (it charges a gather
# 6.5x that, a matmul fusion 2.6x, reductions about 2x); hlo_stats keeps XLA's generic rule for those, so on TPU
# the comparison covers the programs libtpu prices by the generic rules.
TPU_BYTES_PROGRAMS = (
    "layer_of_stack",
    "two_layers_of_stack",
    "update_in_place",
    "static_slice",
    "layer_and_whole_stack",
    "multi_output",
    "concatenate",
    "transpose",
)


def _xla_bytes(compiled) -> float:
    cost = compiled.cost_analysis()
    return float((cost[0] if isinstance(cost, list | tuple) else cost)["bytes accessed"])


def _our_bytes(compiled) -> float:
    return sum(op.bytes for op in op_times(Module(compiled.as_text()), 1e15, 1e12))


def _compile_program(name, sharding=None):
    fn, specs, donate, _ = BYTES_PROGRAMS[name]
    args = [jax.ShapeDtypeStruct(shape, dtype, sharding=sharding) for shape, dtype in specs]
    return jax.jit(fn, donate_argnums=donate).lower(*args).compile()


def _check_bytes(name, compiled):
    ours, xla = _our_bytes(compiled), _xla_bytes(compiled)
    # XLA adds a few bytes of scalar indices here and there (padded to a tile on TPU): within 0.1%.
    assert ours == pytest.approx(xla, rel=1e-3), (name, ours, xla)
    bound = BYTES_PROGRAMS[name][3]
    if bound is not None:  # the op was charged the slice or update, not the whole stack
        assert ours <= bound * 1.001, (name, ours, bound)


@pytest.mark.parametrize("name", list(BYTES_PROGRAMS))
def test_hbm_bytes_match_xla_cost_analysis_cpu(name):
    _check_bytes(name, _compile_program(name))


@pytest.mark.tpu
@pytest.mark.parametrize("name", TPU_BYTES_PROGRAMS)
def test_hbm_bytes_match_xla_cost_analysis_tpu(name):
    sharding = NamedSharding(Mesh(_tpu_devices()[:1], ("x",)), P())
    _check_bytes(name, _compile_program(name, sharding))


def test_scan_bytes_grow_linearly_with_depth():
    # Each layer of a scan reads its own slice of the stacked weights: 4x the layers is about 4x the bytes, not
    # the 16x of charging every layer's slice with the whole stack.
    def weighted_bytes(layers):
        w = jax.ShapeDtypeStruct((layers, 512, 512), jnp.float32)
        x = jax.ShapeDtypeStruct((1024, 512), jnp.float32)
        return _our_bytes(_stack(unroll=False).lower(w, x).compile())

    assert 3.5 < weighted_bytes(24) / weighted_bytes(6) < 4.5
