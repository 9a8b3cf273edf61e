"""Row permutations whose forward and backward are both row gathers.

`x[perm]` differentiates into a scatter-add of the cotangent rows, and un-sorting with `zeros.at[perm].set(y)`
is a scatter of whole rows. XLA lowers scatters of [M, D] rows with index broadcasts as large as the rows
themselves (a u32[M, D] temporary on TPU) and serialises them. For a permutation the transpose of a gather is
the gather by the inverse permutation, so both directions can stay gathers; the only scatter left is the 1-D int
one that builds the inverse.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def inverse_permutation(perm: jax.Array) -> jax.Array:
    """inv with inv[perm[i]] = i for a permutation perm of range(M): one 1-D int scatter, O(M)."""
    m = perm.shape[0]
    return (
        jnp.zeros_like(perm)
        .at[perm]
        .set(
            jnp.arange(m, dtype=perm.dtype), unique_indices=True, mode="promise_in_bounds", wrap_negative_indices=False
        )
    )


def repeat_rows(x: jax.Array, k: int) -> jax.Array:
    """Each row k times in a row: [n, D] -> [n * k, D]. Its transpose is a reshape and a sum over k, not a
    scatter-add as for x[arange(n * k) // k]."""
    n, d = x.shape
    return jnp.broadcast_to(x[:, None], (n, k, d)).reshape(n * k, d)


def _gather_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    # In bounds and non-negative by contract (a permutation): no clamping, fill masks or negative-index wrapping.
    return x.at[idx].get(mode="promise_in_bounds", unique_indices=True, wrap_negative_indices=False)


@jax.custom_vjp
def _permute_rows(x: jax.Array, perm: jax.Array, inverse: jax.Array) -> jax.Array:
    return _gather_rows(x, perm)


def _permute_rows_fwd(x, perm, inverse):
    return _gather_rows(x, perm), inverse


def _permute_rows_bwd(inverse, ct):
    # y = x[perm], so dx[perm[i]] = ct[i], i.e. dx = ct[inverse]. No cotangent for the integer indices.
    return _gather_rows(ct, inverse), None, None


_permute_rows.defvjp(_permute_rows_fwd, _permute_rows_bwd)


def permute_rows(x: jax.Array, perm: jax.Array, inverse: jax.Array | None = None) -> jax.Array:
    """x[perm] for a permutation perm of range(M); x [M, ...]. The gradient is a gather of the cotangent by the
    inverse permutation instead of a scatter-add. Pass `inverse` (= inverse_permutation(perm)) when it is at hand;
    otherwise it is computed here (and dropped by XLA when nothing differentiates through this)."""
    if inverse is None:
        inverse = inverse_permutation(perm)
    return _permute_rows(x, perm, inverse)
