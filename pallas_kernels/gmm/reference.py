"""Pure-jnp grouped matmul (the twin of the gmm kernels).

Rows of `lhs` are sorted by group: rows [sum(group_sizes[:g]), sum(group_sizes[:g+1])) use rhs[g].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def gmm_reference(lhs: jax.Array, rhs: jax.Array, group_sizes: jax.Array, *, preferred_element_type=None) -> jax.Array:
    """[M, K] x [G, K, N] -> [M, N] by `jax.lax.ragged_dot`.

    Exact, differentiable, and lowered natively on TPU; on CPU XLA expands it densely (G times the FLOPs), so it
    is the oracle and the small-model CPU path, not a fast path.
    """
    out_dtype = preferred_element_type or lhs.dtype
    out = jax.lax.ragged_dot(lhs, rhs, group_sizes.astype(jnp.int32), preferred_element_type=jnp.float32)
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
