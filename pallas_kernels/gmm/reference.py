"""Pure-jnp grouped matmul (the twin of the gmm kernels).

Rows of `lhs` are sorted by group: rows [sum(group_sizes[:g]), sum(group_sizes[:g+1])) use rhs[g].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm_reference(
    lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None, group_offset=None
) -> jax.Array:
    """[M, K] x [G_local, K, N] -> [M, N] by `jax.lax.ragged_dot`.

    Exact, differentiable, and lowered natively on TPU; on CPU XLA expands it densely (G times the FLOPs), so it
    is the oracle and the small-model CPU path, not a fast path.

    group_offset (the kernels' expert-parallel contract): rhs holds groups group_offset .. group_offset+G_local-1
    of the G in group_sizes; rows of other groups, and rows past sum(group_sizes), come out zero.
    """
    out_dtype = preferred_element_type or lhs.dtype
    group_sizes = group_sizes.astype(jnp.int32)
    num_local = rhs.shape[0]
    if group_offset is not None or group_sizes.shape[0] != num_local:
        # ragged_dot's own group_offset is not lowered, and it wants sum(sizes) == M: frame the local groups
        # with two all-zero groups that take the rows before and after them.
        off = jnp.asarray(0 if group_offset is None else group_offset, jnp.int32)
        local = jax.lax.dynamic_slice(group_sizes, (off,), (num_local,))
        before = jnp.sum(jnp.where(jnp.arange(group_sizes.shape[0]) < off, group_sizes, 0))
        after = lhs.shape[0] - before - jnp.sum(local)
        group_sizes = jnp.concatenate([before[None], local, after[None]])
        zero = jnp.zeros((1, *rhs.shape[1:]), rhs.dtype)
        rhs = jnp.concatenate([zero, rhs, zero])
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes, preferred_element_type=jnp.float32)
    return out.astype(out_dtype)


def gmm_loop_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array) -> jax.Array:
    """Per-group masked dot in a Python loop: an independent oracle for tests (tiny shapes only)."""
    ends = jnp.cumsum(group_sizes)
    starts = ends - group_sizes
    rows = jnp.arange(lhs.shape[0])
    out = jnp.zeros((lhs.shape[0], rhs.shape[-1]), jnp.float32)
    for g in range(rhs.shape[0]):
        in_group = ((rows >= starts[g]) & (rows < ends[g]))[:, None]
        out = out + jnp.where(in_group, jnp.dot(lhs, rhs[g], preferred_element_type=jnp.float32), 0.0)
    return out.astype(lhs.dtype)
