"""Row permutations whose forward and backward are both row gathers.

`x[perm]` differentiates into a scatter-add of the cotangent rows, and un-sorting with `zeros.at[perm].set(y)`
is a scatter of whole rows. XLA lowers scatters of [M, D] rows with index broadcasts as large as the rows
themselves (a u32[M, D] temporary on TPU) and serialises them. For a permutation the transpose of a gather is
the gather by the inverse permutation, so both directions can stay gathers; the only scatter left is the 1-D int
one that builds the inverse.
"""

from __future__ import annotations

import functools

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


def _take_rows(x: jax.Array, idx: jax.Array) -> jax.Array:
    # idx may repeat rows (order // k): in bounds, non-negative, not unique.
    return x.at[idx].get(mode="promise_in_bounds", wrap_negative_indices=False)


def _sum_unpermuted(y: jax.Array, inverse: jax.Array, k: int) -> jax.Array:
    n = inverse.shape[0] // k
    # [k, n, D]: each token's k rows, read straight into place. k leads so that the gathered [k * n, D] rows are
    # already [k, n, D] in memory; [n, k, D] would take a relayout pass before the sum.
    rows = _gather_rows(y, inverse.reshape(n, k).T)
    return rows.astype(jnp.float32).sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _permute_repeated(x, order, inverse, k):
    return _take_rows(x, order // k)


def _permute_repeated_fwd(x, order, inverse, k):
    return _take_rows(x, order // k), (order, inverse)


def _permute_repeated_bwd(k, residuals, ct):
    order, inverse = residuals
    return _sum_unpermuted(ct, inverse, k).astype(ct.dtype), None, None


_permute_repeated.defvjp(_permute_repeated_fwd, _permute_repeated_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _unpermute_sum(y, inverse, order, k, dtype):
    return _sum_unpermuted(y, inverse, k)


def _unpermute_sum_fwd(y, inverse, order, k, dtype):
    return _sum_unpermuted(y, inverse, k), order


def _unpermute_sum_bwd(k, dtype, order, ct):
    return _take_rows(ct, order // k).astype(dtype), None, None


_unpermute_sum.defvjp(_unpermute_sum_fwd, _unpermute_sum_bwd)


def permute_repeated(x: jax.Array, k: int, order: jax.Array, inverse: jax.Array) -> jax.Array:
    """`permute_rows(repeat_rows(x, k), order, inverse)` = x[order // k], [n, D] -> [n * k, D], read straight from
    x: the k-fold repeated copy is never written. Its gradient is `unpermute_sum` of the cotangent (gathers and
    a sum over k, no scatter-add)."""
    return _permute_repeated(x, order, inverse, k)


def unpermute_sum(y: jax.Array, k: int, inverse: jax.Array, order: jax.Array) -> jax.Array:
    """The transpose of `permute_repeated`: y [n * k, D] in `order`, back to each token's k rows and summed in
    fp32 -> [n, D] fp32 (permute_rows(y, inverse).reshape(n, k, D).sum(1) without the un-permuted copy). Its
    gradient is `permute_repeated` of the cotangent."""
    return _unpermute_sum(y, inverse, order, k, jnp.dtype(y.dtype))
