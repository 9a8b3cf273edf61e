"""Mosaic TPU grouped matmul kernels: `gmm` (forward and dlhs) and `tgmm` (the per-group weight gradient).

Shapes: lhs [M, K] with rows sorted by group, rhs [G_local, K, N] (or [G_local, N, K] with transpose_rhs),
group_sizes [G] over ALL groups, group_offset = index of the first local group. Rows of non-local groups, and
rows past sum(group_sizes), come out as zeros: an expert-parallel shard computes only its own experts.

Both kernels walk a schedule of (m-tile, group) "visits" laid out by `gmm_schedule` / `tgmm_schedule`. The grid
has a STATIC number of visit steps (an upper bound: m_tiles + G_local), and steps past the real count repeat the
last real block indices and do nothing. A dynamic grid would save the idle steps but breaks interpret mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import out_struct


def local_bounds(group_sizes: jax.Array, group_offset: jax.Array, num_local: int) -> tuple[jax.Array, jax.Array]:
    """Row ranges [start, end) of the local groups, each [G_local] int32."""
    ends = jnp.cumsum(group_sizes.astype(jnp.int32))
    starts = ends - group_sizes.astype(jnp.int32)
    off = jnp.asarray(group_offset, jnp.int32).reshape(())
    return jax.lax.dynamic_slice(starts, (off,), (num_local,)), jax.lax.dynamic_slice(ends, (off,), (num_local,))


def gmm_schedule(starts: jax.Array, ends: jax.Array, m_tiles: int, tm: int) -> tuple[jax.Array, ...]:
    """Visits for gmm, in nondecreasing m-tile order so each output tile stays resident across its visits.

    Layout: tiles before the local rows (zero visits), then every (group, tile) pair a non-empty local group
    touches, then tiles after the local rows (zero visits). A tile straddling k group boundaries is visited k + 1
    times; empty groups are never visited. Total <= m_tiles + G_local - 1 < the static step count.

    Returns group_ids [steps] (-1 = zero visit), rhs_ids [steps] (a valid block index for every step),
    tile_ids [steps], num_visits [1].
    """
    num_local = starts.shape[0]
    steps = m_tiles + num_local
    sizes = ends - starts
    lo = starts // tm
    spans = jnp.where(sizes > 0, (ends + tm - 1) // tm - lo, 0)  # tiles touched per group, [G_local]
    local_lo, local_hi = starts[0], ends[-1]  # local rows are contiguous
    first = jnp.minimum(local_lo // tm, m_tiles)
    after = jnp.where(local_hi > local_lo, (local_hi + tm - 1) // tm, first)
    in_groups = jnp.sum(spans)
    total = first + in_groups + (m_tiles - after)

    i = jnp.minimum(jnp.arange(steps, dtype=jnp.int32), total - 1)  # idle steps repeat the last visit
    cum = jnp.cumsum(spans)
    j = i - first
    g = jnp.clip(jnp.searchsorted(cum, j, side="right"), 0, num_local - 1).astype(jnp.int32)
    is_group = (i >= first) & (j < in_groups)
    tile = jnp.where(i < first, i, jnp.where(is_group, lo[g] + j - (cum[g] - spans[g]), after + j - in_groups))
    group_ids = jnp.where(is_group, g, -1)
    # Zero visits still fetch an rhs block; pointing them at a neighbouring group keeps the fetch redundant.
    rhs_ids = jnp.where(is_group, g, jnp.where(i < first, 0, num_local - 1))
    return group_ids, rhs_ids.astype(jnp.int32), tile.astype(jnp.int32), total.reshape(1).astype(jnp.int32)


def tgmm_schedule(starts: jax.Array, ends: jax.Array, m_tiles: int, tm: int) -> tuple[jax.Array, ...]:
    """Visits for tgmm, grouped by group: every local group gets >= 1 visit (empty ones once, to write zeros).

    Total <= m_tiles + G_local - 1. Returns group_ids [steps], tile_ids [steps], num_visits [1].
    """
    num_local = starts.shape[0]
    steps = m_tiles + num_local
    sizes = ends - starts
    lo = jnp.minimum(starts // tm, m_tiles - 1)
    spans = jnp.where(sizes > 0, (ends + tm - 1) // tm - starts // tm, 1)
    cum = jnp.cumsum(spans)
    total = cum[-1]
    i = jnp.minimum(jnp.arange(steps, dtype=jnp.int32), total - 1)
    g = jnp.clip(jnp.searchsorted(cum, i, side="right"), 0, num_local - 1).astype(jnp.int32)
    tile = jnp.minimum(lo[g] + i - (cum[g] - spans[g]), m_tiles - 1)
    return g, tile.astype(jnp.int32), total.reshape(1).astype(jnp.int32)


def _gmm_kernel(
    group_ids, rhs_ids, tile_ids, num_visits, starts, ends,  # scalar prefetch (SMEM)
    lhs_ref, rhs_ref, out_ref, acc_ref,
    *, tm: int, k_tiles: int, transpose_rhs: bool,
):  # fmt: skip
    del rhs_ids
    i, kt = pl.program_id(1), pl.program_id(2)
    g = group_ids[i]
    active = i < num_visits[0]

    @pl.when(kt == 0)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active & (g >= 0))
    def _accumulate():
        contract = 1 if transpose_rhs else 0  # [tn, tk] blocks for the dlhs pass, [tk, tn] otherwise
        acc_ref[...] += jax.lax.dot_general(
            lhs_ref[...], rhs_ref[...], (((1,), (contract,)), ((), ())), preferred_element_type=jnp.float32
        )

    tile = tile_ids[i]
    # A tile's first visit overwrites the (uninitialised) output block; later visits merge their group's rows.
    first_visit = (i == 0) | (tile_ids[jnp.maximum(i - 1, 0)] != tile)
    last_k = active & (kt == k_tiles - 1)

    def rows_in_group():
        gc = jnp.maximum(g, 0)
        rows = tile * tm + jax.lax.broadcasted_iota(jnp.int32, acc_ref.shape, 0)
        return (rows >= starts[gc]) & (rows < ends[gc]) & (g >= 0)

    @pl.when(last_k & first_visit)
    def _write_first():
        out_ref[...] = jnp.where(rows_in_group(), acc_ref[...], 0.0).astype(out_ref.dtype)

    @pl.when(last_k & jnp.logical_not(first_visit))
    def _write_merge():
        out_ref[...] = jnp.where(rows_in_group(), acc_ref[...].astype(out_ref.dtype), out_ref[...])


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    *,
    tiling: tuple[int, int, int],
    out_dtype,
    transpose_rhs: bool = False,
    interpret=False,
    cost_rows: int | None = None,
) -> jax.Array:
    """[M, K] x [G_local, K, N] -> [M, N] (rhs [G_local, N, K] when transpose_rhs). M must divide by tm."""
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    assert m % tm == 0 and k % tk == 0 and n % tn == 0, (lhs.shape, rhs.shape, tiling)
    m_tiles, k_tiles, n_tiles = m // tm, k // tk, n // tn
    starts, ends = local_bounds(group_sizes, group_offset, num_local)
    group_ids, rhs_ids, tile_ids, num_visits = gmm_schedule(starts, ends, m_tiles, tm)
    steps = m_tiles + num_local

    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, tn, tk), lambda nt, i, kt, gid, rid, *_: (rid[i], nt, kt))
    else:
        rhs_spec = pl.BlockSpec((None, tk, tn), lambda nt, i, kt, gid, rid, *_: (rid[i], kt, nt))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(n_tiles, steps, k_tiles),
        in_specs=[pl.BlockSpec((tm, tk), lambda nt, i, kt, gid, rid, tid, *_: (tid[i], kt)), rhs_spec],
        out_specs=pl.BlockSpec((tm, tn), lambda nt, i, kt, gid, rid, tid, *_: (tid[i], nt)),
        scratch_shapes=[pltpu.VMEM((tm, tn), jnp.float32)],
    )
    kernel = functools.partial(_gmm_kernel, tm=tm, k_tiles=k_tiles, transpose_rhs=transpose_rhs)
    itemsize = jnp.dtype(lhs.dtype).itemsize
    mc = min(m, cost_rows or m)  # rows expected to hold local groups: the rest are zero visits
    call = pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), out_dtype, lhs, rhs, group_sizes),
        grid_spec=grid_spec,
        # Consecutive visits of one m-tile share its output block, so only the n axis may be split across cores.
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=2 * mc * k * n, transcendentals=0, bytes_accessed=itemsize * (mc * k * n_tiles + rhs.size + m * n)
        ),
        interpret=interpret,
        name="ernie_gmm",
    )
    return call(group_ids, rhs_ids, tile_ids, num_visits, starts, ends, lhs, rhs)


def _tgmm_kernel(
    group_ids, tile_ids, num_visits, starts, ends,  # scalar prefetch (SMEM)
    lhs_ref, grad_ref, out_ref, acc_ref,
    *, tm: int,
):  # fmt: skip
    i = pl.program_id(2)
    g = group_ids[i]
    total = num_visits[0]
    active = i < total
    first = (i == 0) | (group_ids[jnp.maximum(i - 1, 0)] != g)
    last = (i == total - 1) | (group_ids[jnp.minimum(i + 1, pl.num_programs(2) - 1)] != g)

    @pl.when(active & first)
    def _zero():
        acc_ref[...] = jnp.zeros_like(acc_ref)

    @pl.when(active)
    def _accumulate():
        rows = tile_ids[i] * tm + jax.lax.broadcasted_iota(jnp.int32, lhs_ref.shape, 0)
        in_group = (rows >= starts[g]) & (rows < ends[g])
        # Masking one operand is enough: rows of other groups contribute exact zeros to the contraction.
        x = jnp.where(in_group, lhs_ref[...], jnp.zeros_like(lhs_ref))  # [tm, tk]
        acc_ref[...] += jax.lax.dot_general(
            x, grad_ref[...], (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32
        )  # [tk, tn]

    @pl.when(active & last)
    def _write():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(
    lhs: jax.Array,
    grad: jax.Array,
    group_sizes: jax.Array,
    group_offset: jax.Array,
    num_local: int,
    *,
    tiling: tuple[int, int, int],
    out_dtype,
    interpret=False,
    cost_rows: int | None = None,
) -> jax.Array:
    """Per-group lhs^T @ grad: [M, K], [M, N] -> [G_local, K, N]; empty groups give zeros."""
    m, k = lhs.shape
    n = grad.shape[1]
    tm, tk, tn = tiling
    assert m % tm == 0 and k % tk == 0 and n % tn == 0, (lhs.shape, grad.shape, tiling)
    m_tiles, k_tiles, n_tiles = m // tm, k // tk, n // tn
    starts, ends = local_bounds(group_sizes, group_offset, num_local)
    group_ids, tile_ids, num_visits = tgmm_schedule(starts, ends, m_tiles, tm)
    steps = m_tiles + num_local
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5,
        grid=(k_tiles, n_tiles, steps),
        in_specs=[
            pl.BlockSpec((tm, tk), lambda kt, nt, i, gid, tid, *_: (tid[i], kt)),
            pl.BlockSpec((tm, tn), lambda kt, nt, i, gid, tid, *_: (tid[i], nt)),
        ],
        out_specs=pl.BlockSpec((None, tk, tn), lambda kt, nt, i, gid, tid, *_: (gid[i], kt, nt)),
        scratch_shapes=[pltpu.VMEM((tk, tn), jnp.float32)],
    )
    itemsize = jnp.dtype(lhs.dtype).itemsize
    mc = min(m, cost_rows or m)
    call = pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm),
        out_shape=out_struct((num_local, k, n), out_dtype, lhs, grad, group_sizes),
        grid_spec=grid_spec,
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=pl.CostEstimate(
            flops=2 * mc * k * n,
            transcendentals=0,
            bytes_accessed=itemsize * (mc * k * n_tiles + mc * n * k_tiles + num_local * k * n),
        ),
        interpret=interpret,
        name="ernie_tgmm",
    )
    return call(group_ids, tile_ids, num_visits, starts, ends, lhs, grad)
