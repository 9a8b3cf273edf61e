"""Grouped matmul kernels (TPU Mosaic and GPU Triton) in interpret mode against the twin: forward and both
gradients, ragged and empty groups, token padding, group_offset (expert-parallel shards), fp32 and bf16.

Shapes are fixed per test and only the (traced) group sizes vary, so each jitted kernel traces once and the
hypothesis examples reuse it: interpret mode is slow to trace, cheap to rerun.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import pallas_kernels
from pallas_kernels.gmm import ops
from pallas_kernels.gmm.reference import gmm_loop_reference, gmm_reference
from pallas_kernels.gmm.tpu import gmm_schedule, tgmm_schedule
from tests.helpers import assert_close

M, K, N, G = 72, 32, 48, 5  # M is not a multiple of tm=16: exercises token padding
TILING = (16, 16, 16)  # several m, k and n tiles, so tiles straddle group boundaries


def _inputs(dtype, g=G, seed=0):
    rng = np.random.RandomState(seed)
    lhs = jnp.asarray(rng.randn(M, K), dtype)
    rhs = jnp.asarray(rng.randn(g, K, N) / np.sqrt(K), dtype)
    cot = jnp.asarray(rng.randn(M, N), dtype)  # a fixed random cotangent for the vjp
    return lhs, rhs, cot


def _sizes_strategy(g=G, total=M):
    """Ragged group sizes with frequent empty groups; their sum is <= M (the rest is padding rows)."""
    return st.lists(st.sampled_from([0, 0, 1, 5, 8, 16, 17, 30]), min_size=g, max_size=g).filter(
        lambda s: sum(s) <= total
    )


def _fwd_and_vjp(fn):
    def run(lhs, rhs, sizes, cot):
        out, vjp = jax.vjp(lambda a, b: fn(a, b, sizes), lhs, rhs)
        return (out, *vjp(cot))

    return jax.jit(run)


@functools.cache  # one jitted function per kernel: parametrized cases with the same shapes reuse its trace
def _kernel_fn(kernel, **kw):
    return _fwd_and_vjp(lambda a, b, s: ops.gmm(a, b, s, tiling=TILING, kernel=kernel, interpret=True, **kw))


_REF = _fwd_and_vjp(lambda a, b, s: gmm_reference(a, b, s))
_TPU_F32 = _kernel_fn("tpu")  # same object as _kernel_fn("tpu")


def _check(got, want, dtype):
    for name, a, b in zip(("out", "dlhs", "drhs"), got, want, strict=True):
        assert a.dtype == b.dtype, name
        assert_close(a, b, dtype, name)


@settings(max_examples=12, deadline=None)
@given(sizes=_sizes_strategy())
def test_tpu_kernel_matches_twin_on_random_ragged_groups(sizes):
    lhs, rhs, cot = _inputs(jnp.float32)
    sizes = jnp.asarray(sizes, jnp.int32)
    _check(_TPU_F32(lhs, rhs, sizes, cot), _REF(lhs, rhs, sizes, cot), jnp.float32)
    # Independent oracle for the forward (the twin itself could be wrong about padding rows).
    assert_close(_TPU_F32(lhs, rhs, sizes, cot)[0], gmm_loop_reference(lhs, rhs, sizes), jnp.float32)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize(
    "sizes",
    [[20, 0, 17, 0, 35], [0, 0, 72, 0, 0], [0, 0, 0, 0, 0], [16, 16, 16, 16, 8], [1, 2, 3, 4, 5]],
    ids=["ragged", "one_group", "all_empty", "tile_aligned", "tiny_with_padding"],
)
def test_kernels_forward_and_gradients(kernel, dtype, sizes):
    lhs, rhs, cot = _inputs(dtype)
    sizes = jnp.asarray(sizes, jnp.int32)
    fn = _kernel_fn(kernel)
    got = fn(lhs, rhs, sizes, cot)
    _check(got, _REF(lhs, rhs, sizes, cot), dtype)
    padding = int(M - sizes.sum())
    if padding:  # rows past the groups: zero output and zero gradient
        assert not np.any(np.asarray(got[0][-padding:], np.float32))
        assert not np.any(np.asarray(got[1][-padding:], np.float32))


def test_gpu_kernel_on_random_ragged_groups():
    fn = _kernel_fn("gpu")
    lhs, rhs, cot = _inputs(jnp.float32)
    rng = np.random.RandomState(3)
    for _ in range(4):
        sizes = rng.multinomial(rng.randint(0, M + 1), np.ones(G) / G) * (rng.rand(G) > 0.3)
        sizes = jnp.asarray(sizes, jnp.int32)
        _check(fn(lhs, rhs, sizes, cot), _REF(lhs, rhs, sizes, cot), jnp.float32)


@pytest.mark.parametrize("kernel", ["tpu", "gpu"])
def test_group_offset_shards_sum_to_full_result(kernel):
    """Expert parallelism: shard e holds groups [e*L, (e+1)*L); each shard computes only its rows (others zero),
    so the shards' outputs and lhs gradients add up to the unsharded ones and their rhs gradients concatenate."""
    shards, g = 3, 6
    lhs, rhs, cot = _inputs(jnp.float32, g=g, seed=1)
    sizes = jnp.asarray([9, 0, 20, 13, 0, 14], jnp.int32)
    local = g // shards

    @jax.jit
    def shard(offset):
        w = jax.lax.dynamic_slice_in_dim(rhs, offset, local)
        fn = lambda a, b: ops.gmm(a, b, sizes, group_offset=offset, tiling=TILING, kernel=kernel, interpret=True)
        out, vjp = jax.vjp(fn, lhs, w)
        ref = gmm_reference(lhs, w, sizes, group_offset=offset)
        return (out, *vjp(cot)), ref

    parts = [shard(jnp.int32(e * local)) for e in range(shards)]
    for got, ref in parts:
        assert_close(got[0], ref, jnp.float32, "shard forward vs twin")
    full = _REF(lhs, rhs, sizes, cot)
    assert_close(sum(p[0][0] for p in parts), full[0], jnp.float32, "out")
    assert_close(sum(p[0][1] for p in parts), full[1], jnp.float32, "dlhs")
    assert_close(jnp.concatenate([p[0][2] for p in parts]), full[2], jnp.float32, "drhs")


def test_group_offset_inside_shard_map():
    """The kernel under shard_map with group_offset from axis_index, as the EP MoE calls it.

    check_vma=False only because the Pallas *interpreter* evaluates index maps with unvarying grid indices next
    to varying scalar-prefetch operands; the compiled TPU kernel under check_vma=True is covered by the AOT test.
    """
    mesh = jax.make_mesh((4,), ("expert",), devices=jax.devices()[:4])
    g = 8
    lhs, rhs, _ = _inputs(jnp.float32, g=g, seed=2)
    sizes = jnp.asarray([3, 10, 0, 20, 7, 0, 15, 10], jnp.int32)
    spec = jax.sharding.PartitionSpec

    def body(x, w, s):
        offset = jax.lax.axis_index("expert") * w.shape[0]
        out = pallas_kernels.gmm(x, w, s, group_offset=offset, tiling=TILING, implementation="pallas")
        return jax.lax.psum(out, "expert")

    fn = jax.jit(
        jax.shard_map(body, mesh=mesh, in_specs=(spec(), spec("expert"), spec()), out_specs=spec(), check_vma=False)
    )
    put = lambda x, p: jax.device_put(x, jax.sharding.NamedSharding(mesh, p))
    got = fn(put(lhs, spec()), put(rhs, spec("expert")), put(sizes, spec()))
    assert_close(got, gmm_reference(lhs, rhs, sizes), jnp.float32)


_SCHEDULE_ROWS = 384  # >= 9 groups x 40 rows; divisible by every tm below, so only 3 shapes are traced


@functools.cache
def _schedules(m_tiles, tm):
    return jax.jit(lambda s, e: (gmm_schedule(s, e, m_tiles, tm), tgmm_schedule(s, e, m_tiles, tm)))


@settings(max_examples=150, deadline=None)
@given(sizes=st.lists(st.integers(0, 40), min_size=9, max_size=9), tm=st.sampled_from([8, 16, 32]))
def test_schedules_cover_every_tile_within_the_static_bound(sizes, tm):
    """The static grid (m_tiles + G_local steps) is enough, every m-tile is written, and tgmm visits every group."""
    m_tiles = _SCHEDULE_ROWS // tm
    ends = np.cumsum(sizes).astype(np.int32)
    starts = ends - np.asarray(sizes, np.int32)
    (gid, _, tiles, total), (tgid, _, ttotal) = jax.tree.map(
        np.asarray, _schedules(m_tiles, tm)(jnp.asarray(starts), jnp.asarray(ends))
    )
    total = int(total[0])
    assert total <= m_tiles + len(sizes)
    assert sorted(set(tiles[:total].tolist())) == list(range(m_tiles))
    assert np.all(np.diff(tiles[:total]) >= 0)  # nondecreasing: a tile's visits are consecutive
    for g, size in enumerate(sizes):  # each non-empty group visits exactly the tiles its rows touch
        want = set(range(starts[g] // tm, -(-ends[g] // tm))) if size else set()
        assert set(tiles[:total][gid[:total] == g].tolist()) == want
    assert int(ttotal[0]) <= m_tiles + len(sizes)
    assert set(tgid[: int(ttotal[0])].tolist()) == set(range(len(sizes)))


def test_dispatch():
    lhs, rhs, _ = _inputs(jnp.float32)
    sizes = jnp.asarray([20, 0, 17, 0, 35], jnp.int32)
    has_pallas = lambda impl: (
        "pallas_call"
        in str(
            jax.make_jaxpr(lambda a, b: pallas_kernels.gmm(a, b, sizes, implementation=impl, tiling=TILING))(lhs, rhs)
        )
    )
    assert not has_pallas("auto")  # CPU: the twin
    assert not has_pallas("xla")
    assert has_pallas("pallas")  # CPU: the TPU kernel, interpreted
    with pytest.raises(ValueError, match="implementation"):
        pallas_kernels.gmm(lhs, rhs, sizes, implementation="cuda")
    out = pallas_kernels.gmm(lhs, rhs, sizes, implementation="pallas", preferred_element_type=jnp.float32)
    assert out.shape == (M, N) and out.dtype == jnp.float32


def test_triton_kernels_lower_for_cuda():
    """The Triton gmm/tgmm lower to Triton IR at a3b shapes (no GPU needed): catches Triton lowering errors."""
    sds = jax.ShapeDtypeStruct

    def grads(x, w, s):
        loss = lambda x, w: jnp.sum(ops.gmm(x, w, s, kernel="gpu").astype(jnp.float32))
        return jax.grad(loss, (0, 1))(x, w)

    args = sds((1024, 2560), jnp.bfloat16), sds((8, 2560, 1536), jnp.bfloat16), sds((8,), jnp.int32)
    text = jax.jit(grads).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert text.count("ernie_gmm_triton") >= 1 and text.count("ernie_tgmm_triton") >= 1
