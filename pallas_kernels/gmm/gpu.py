"""Pallas-Triton grouped matmul kernels for GPU: same contract as `pallas_kernels.gmm.tpu` (gmm, tgmm).

GPU programs run concurrently with no ordering between grid steps, so unlike the TPU kernels no two programs
may write the same output tile:
  gmm:  one program per (m-tile, n-tile); it loops over the local groups that touch its rows (a dynamic trip
        count read from per-tile metadata) and merges each group's rows into a register accumulator.
  tgmm: one program per (group, k-tile, n-tile); it loops over the m-tiles of its group.
The grids are static ((m_tiles, n_tiles) and (G_local, k_tiles, n_tiles)), so interpret mode works on CPU.
Triton needs power-of-two tiles >= 16; `ops.default_tiling(kernel="gpu")` picks them.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import out_struct
from pallas_kernels.gmm.tpu import local_bounds


def _dot(a, b, contract_a: int, contract_b: int):
    return jax.lax.dot_general(a, b, (((contract_a,), (contract_b,)), ((), ())), preferred_element_type=jnp.float32)


def _gmm_kernel(
    first_ref, stop_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref,
    *, tm: int, tk: int, tn: int, k_tiles: int, transpose_rhs: bool,
):  # fmt: skip
    mt, nt = pl.program_id(0), pl.program_id(1)
    rows = mt * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tn), 0)

    def group(g, out):
        start, end = starts_ref[g], ends_ref[g]

        def k_step(kt, acc):
            x = lhs_ref[pl.ds(mt * tm, tm), pl.ds(kt * tk, tk)]  # [tm, tk]
            if transpose_rhs:
                return acc + _dot(x, rhs_ref[g, pl.ds(nt * tn, tn), pl.ds(kt * tk, tk)], 1, 1)  # w [tn, tk]
            return acc + _dot(x, rhs_ref[g, pl.ds(kt * tk, tk), pl.ds(nt * tn, tn)], 1, 0)  # w [tk, tn]

        # Empty groups inside the tile's range run zero k steps.
        acc = jax.lax.fori_loop(0, jnp.where(end > start, k_tiles, 0), k_step, jnp.zeros((tm, tn), jnp.float32))
        return jnp.where((rows >= start) & (rows < end), acc, out)

    out = jax.lax.fori_loop(first_ref[mt], stop_ref[mt], group, jnp.zeros((tm, tn), jnp.float32))
    out_ref[pl.ds(mt * tm, tm), pl.ds(nt * tn, tn)] = out.astype(out_ref.dtype)


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
    """[M, K] x [G_local, K, N] -> [M, N] (rhs [G_local, N, K] when transpose_rhs); M must divide by tm."""
    m, k = lhs.shape
    num_local = rhs.shape[0]
    n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, tk, tn = tiling
    assert m % tm == 0 and k % tk == 0 and n % tn == 0, (lhs.shape, rhs.shape, tiling)
    m_tiles = m // tm
    starts, ends = local_bounds(group_sizes, group_offset, num_local)
    tile_lo = jnp.arange(m_tiles, dtype=jnp.int32) * tm
    # Local groups touching tile t: [first local group ending after its first row, first starting past its end).
    first = jnp.searchsorted(ends, tile_lo, side="right").astype(jnp.int32)
    stop = jnp.searchsorted(starts, tile_lo + tm, side="left").astype(jnp.int32)
    kernel = functools.partial(_gmm_kernel, tm=tm, tk=tk, tn=tn, k_tiles=k // tk, transpose_rhs=transpose_rhs)
    return pl.pallas_call(
        kernel,
        out_shape=out_struct((m, n), out_dtype, lhs, rhs, group_sizes),
        grid=(m_tiles, n // tn),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="ernie_gmm_triton",
    )(first, stop, starts, ends, lhs, rhs)


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, grad_ref, out_ref, *, tm: int, tk: int, tn: int):
    g, kt, nt = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]

    def m_step(mt, acc):
        rows = mt * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, tk), 0)
        x = lhs_ref[pl.ds(mt * tm, tm), pl.ds(kt * tk, tk)]  # [tm, tk]
        x = jnp.where((rows >= start) & (rows < end), x, jnp.zeros_like(x))  # other groups' rows add zero
        return acc + _dot(x, grad_ref[pl.ds(mt * tm, tm), pl.ds(nt * tn, tn)], 0, 0)  # [tk, tn]

    # An empty group loops zero times and writes zeros.
    hi = jnp.where(end > start, (end + tm - 1) // tm, start // tm)
    acc = jax.lax.fori_loop(start // tm, hi, m_step, jnp.zeros((tk, tn), jnp.float32))
    out_ref[g, pl.ds(kt * tk, tk), pl.ds(nt * tn, tn)] = acc.astype(out_ref.dtype)


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
    starts, ends = local_bounds(group_sizes, group_offset, num_local)
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, tk=tk, tn=tn),
        out_shape=out_struct((num_local, k, n), out_dtype, lhs, grad, group_sizes),
        grid=(num_local, k // tk, n // tn),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        interpret=interpret,
        name="ernie_tgmm_triton",
    )(starts, ends, lhs, grad)
