"""Grouped matmul for XLA backends without a native one (CPU): exact, at about dense-matmul cost.

`lax.ragged_dot` on XLA:CPU broadcasts lhs to every group (G times the FLOPs). Here each group's rows are padded to a
multiple of `tile` and laid out contiguously, every tile takes its group's weight, and one batched matmul does the
work: FLOPs ~ (M + G * tile) * K * N instead of G * M * K * N.

The gradient is written by hand (`custom_vjp`) so that the backward keeps only what it was given (lhs, rhs and the
group sizes) and rebuilds the tile layout, which is a few integer ops and one row gather. Plain autodiff would
keep the per-tile copies of the weights and rows ([tiles, K, N], [tiles, tile, K]) alive until the backward: under
the layer scan, a zero-filled stack of them per layer, which on XLA:CPU costs more than the matmuls.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from pallas_kernels.common import match_vma


class TileLayout(NamedTuple):
    """Where each row goes in the padded, tile-aligned buffer: `dest` [M] (past the buffer for rows past
    sum(group_sizes), which are dropped), each tile's group `tile_group` [tiles], and the row each slot of the buffer
    takes, `source` [tiles * tile] (M for padding slots)."""

    dest: jax.Array
    tile_group: jax.Array
    source: jax.Array


def _layout(group_sizes: jax.Array, m: int, tile: int, num_tiles: int) -> TileLayout:
    g = group_sizes.shape[0]
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    padded = (sizes + tile - 1) // tile * tile  # each group's rows rounded up to whole tiles
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    rows = jnp.arange(m)
    row_group = jnp.searchsorted(ends, rows, side="right")  # == g for rows past sum(group_sizes)
    valid = row_group < g
    group = jnp.minimum(row_group, g - 1)
    dest = jnp.where(valid, padded_starts[group] + rows - starts[group], num_tiles * tile)  # past the buffer: dropped
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right"), g - 1)
    slots = jnp.arange(num_tiles * tile)
    slot_group = tile_group[slots // tile]
    offset = slots - padded_starts[slot_group]  # past the group's rows for its padding (and for spare tiles)
    source = jnp.where(offset < sizes[slot_group], starts[slot_group] + offset, m)
    return TileLayout(dest, tile_group, source)


def _to_tiles(rows: jax.Array, layout: TileLayout, tile: int, num_tiles: int) -> jax.Array:
    """[M, C] rows -> [tiles, tile, C], padding rows zero."""
    # A gather over the slots rather than a scatter of the rows into a zeroed buffer: one pass over the output
    # instead of a fill and a scatter, which XLA:CPU runs element by element.
    slots = rows.at[layout.source].get(mode="fill", fill_value=0)  # [tiles * tile, C]
    return slots.reshape(num_tiles, tile, rows.shape[1])


def _from_tiles(tiles: jax.Array, layout: TileLayout) -> jax.Array:
    """[tiles, tile, C] -> [M, C] in the original row order; rows past sum(group_sizes) zero."""
    flat = tiles.reshape(-1, tiles.shape[-1])
    return flat.at[layout.dest].get(mode="fill", fill_value=0)


def _num_tiles(m: int, g: int, tile: int) -> int:
    return -(-(m + g * (tile - 1)) // tile)  # static bound on tiles over all groups


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm_blocked(lhs, rhs, group_sizes, tile, out_dtype):
    out, _ = _gmm_blocked_fwd(lhs, rhs, group_sizes, tile, out_dtype)
    return out


def _gmm_blocked_fwd(lhs, rhs, group_sizes, tile, out_dtype):
    m, num_groups = lhs.shape[0], rhs.shape[0]
    num_tiles = _num_tiles(m, num_groups, tile)
    layout = _layout(group_sizes, m, tile, num_tiles)
    x = _to_tiles(lhs, layout, tile, num_tiles)  # [tiles, tile, K]
    y = jnp.einsum("TRK,TKN->TRN", x, rhs[layout.tile_group], preferred_element_type=jnp.float32)
    return _from_tiles(y, layout).astype(out_dtype), (lhs, rhs, group_sizes)


def _gmm_blocked_bwd(tile, out_dtype, residuals, cotangent):
    lhs, rhs, group_sizes = residuals
    m, num_groups = lhs.shape[0], rhs.shape[0]
    num_tiles = _num_tiles(m, num_groups, tile)
    layout = _layout(group_sizes, m, tile, num_tiles)
    dy = _to_tiles(cotangent, layout, tile, num_tiles)  # [tiles, tile, N]; padding and dropped rows zero
    x = _to_tiles(lhs, layout, tile, num_tiles)  # [tiles, tile, K]
    # d lhs: each tile's rows times its group's weight, transposed. The G weights are transposed before the
    # per-tile gather, so the batched matmul contracts a row-major operand (XLA:CPU runs a contraction over
    # both operands' minor axes well below its plain-matmul speed).
    rhs_t = jnp.einsum("GKN->GNK", rhs)[layout.tile_group]  # [tiles, N, K]
    dx = jnp.einsum("TRN,TNK->TRK", dy, rhs_t, preferred_element_type=jnp.float32)
    # d rhs: per tile x^T dy, summed over the tiles of each group (tiles are in group order).
    dw_tiles = jnp.einsum("TRK,TRN->TKN", x, dy, preferred_element_type=jnp.float32)  # [tiles, K, N]
    dw = jax.ops.segment_sum(dw_tiles, layout.tile_group, num_segments=num_groups, indices_are_sorted=True)
    # Integer group sizes get a float0 cotangent.
    d_sizes = jnp.zeros(group_sizes.shape, jax.dtypes.float0)
    return _from_tiles(dx, layout).astype(lhs.dtype), dw.astype(rhs.dtype), d_sizes


_gmm_blocked.defvjp(_gmm_blocked_fwd, _gmm_blocked_bwd)


def tile_rows(m: int, num_groups: int) -> int:
    """Rows per tile for M rows in G groups: half the mean group, as a power of two in [32, 128].

    Longer tiles run the batched matmul faster on XLA:CPU (fewer, larger matmuls) but pad each group by up to a tile
    more; half the mean group balances the two. Measured on a 2-core CPU, value and gradient of `gmm_blocked` alone
    with 8 groups and width 128 -> 192: M = 256 best at 32 rows, M = 1024 at 64-128, M = 2048 at 128-256, M = 4096
    and 8192 at 256. In the whole training step of the tiny preset (M = 4096) 256-row tiles were no faster than 128
    and pad more, hence the cap.
    """
    half_mean = max(m // (2 * num_groups), 1)
    return min(max(1 << (half_mean.bit_length() - 1), 32), 128)


def gmm_blocked(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int | None = None, preferred_element_type=None
) -> jax.Array:
    """[M, K] x [G, K, N] -> [M, N]; lhs rows sorted by group; rows past sum(group_sizes) come out zero.

    `tile` (rows per tile) defaults to `tile_rows(M, G)`."""
    if tile is None:
        tile = tile_rows(lhs.shape[0], rhs.shape[0])
    tile = max(1, min(tile, lhs.shape[0]))
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    # Inside shard_map a replicated weight next to sharded rows gets sharded-row gradients; marking both varying
    # first lets autodiff sum the weight gradient over the axes it is replicated on (the transpose of the cast).
    lhs, rhs, group_sizes = match_vma(lhs, rhs, group_sizes)
    return _gmm_blocked(lhs, rhs, group_sizes, tile, out_dtype)
