"""Grouped matmul for XLA backends without a native one (CPU): exact, at about dense-matmul cost.

`lax.ragged_dot` on XLA:CPU broadcasts lhs to every group (G times the FLOPs). Here each group's rows are padded to a
multiple of `tile` and laid out contiguously, every tile takes its group's weight, and one batched matmul does the
work: FLOPs ~ (M + G * tile) * K * N instead of G * M * K * N. Differentiable by plain autodiff (gathers/scatters).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm_blocked(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, tile: int = 64, preferred_element_type=None
) -> jax.Array:
    """[M, K] x [G, K, N] -> [M, N]; lhs rows sorted by group; rows past sum(group_sizes) come out zero."""
    m, k = lhs.shape
    g, _, n = rhs.shape
    tile = max(1, min(tile, m))
    sizes = group_sizes.astype(jnp.int32)
    ends = jnp.cumsum(sizes)
    starts = ends - sizes
    padded = (sizes + tile - 1) // tile * tile  # each group's rows rounded up to whole tiles
    padded_ends = jnp.cumsum(padded)
    padded_starts = padded_ends - padded
    num_tiles = -(-(m + g * (tile - 1)) // tile)  # static bound on tiles over all groups
    cap = num_tiles * tile
    rows = jnp.arange(m)
    row_group = jnp.searchsorted(ends, rows, side="right")  # == g for rows past sum(group_sizes)
    valid = row_group < g
    group = jnp.minimum(row_group, g - 1)
    dest = jnp.where(valid, padded_starts[group] + rows - starts[group], cap)  # cap: dropped
    x = jnp.zeros((cap, k), lhs.dtype).at[dest].set(lhs, mode="drop")  # [cap, K]
    tile_group = jnp.minimum(jnp.searchsorted(padded_ends, jnp.arange(num_tiles) * tile, side="right"), g - 1)
    w = rhs[tile_group]  # [tiles, K, N]: each tile's group weight
    y = jnp.einsum("TRK,TKN->TRN", x.reshape(num_tiles, tile, k), w, preferred_element_type=jnp.float32)
    out = y.reshape(cap, n)[jnp.minimum(dest, cap - 1)]  # back to the original row order
    out = jnp.where(valid[:, None], out, 0.0)
    return out.astype(preferred_element_type or lhs.dtype)
