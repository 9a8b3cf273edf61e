"""Dropless expert compute on one device: sort the k assignments of every token by expert, run the grouped
SwiGLU with each row's routing weight applied before the down projection, un-sort and sum. Plain functions on
arrays; the expert-parallel path (expert_parallel.py) runs the same `expert_swiglu` on each device's share.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

import pallas_kernels
from ernie_jax.moe.permute import inverse_permutation, permute_repeated, permute_rows, unpermute_sum
from ernie_jax.moe.routing import Routing
from ernie_jax.options import ModelOptions


def sort_by_expert(expert_ids: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Order of the assignments grouped by expert, and the group sizes [num_experts] int32.

    expert_ids [N, k] or [M]. An id equal to num_experts means "no expert here" (another device's expert, or a
    token outside a VL pool's modality): those assignments sort after every group and no group counts them.
    """
    flat = expert_ids.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)  # drops ids >= num_experts
    return order, group_sizes


def expert_swiglu(
    xs: jax.Array,
    group_sizes: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    options: ModelOptions = ModelOptions(),
    expected_rows: int | None = None,
    row_weights: jax.Array | None = None,
) -> jax.Array:
    """SwiGLU of rows sorted by expert: xs [M, D], w_gate/w_up [E, D, F], w_down [E, F, D] -> [M, D].

    expected_rows: how many of the M rows the local experts get under balanced routing (an expert-parallel buffer
    is sized for the worst case); only the kernels' cost estimates use it.
    row_weights: [M] each row's routing weight, applied before the down projection (which is linear), so the
    rows come out weighted and the combine is a plain sum. Its gradient is then computed where the rows are: an
    expert-parallel backward needs no weighted copy of the returned rows.
    """
    gmm = functools.partial(
        pallas_kernels.gmm, implementation=options.gmm_impl, platform=options.platform, cost_rows=expected_rows
    )
    # Gate and up as one grouped matmul of width 2F: each row is read once, and the backward's row gradient is
    # one matmul instead of two summed.
    gate_up = gmm(xs, jnp.concatenate([w_gate, w_up], axis=-1), group_sizes)  # [M, 2F]
    gate, up = jnp.split(gate_up, 2, axis=-1)  # [M, F] each
    h = jax.nn.silu(gate) * up
    if row_weights is not None:
        h = (h * row_weights[:, None]).astype(gate.dtype)
    return gmm(h, w_down, group_sizes)


def dropless_moe(
    x: jax.Array,
    routing: Routing,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    options: ModelOptions = ModelOptions(),
) -> jax.Array:
    """Every assignment is computed (no capacity): sort by expert, weighted grouped SwiGLU, unsort and sum.

    x [N, D] -> [N, D] in x's dtype.
    """
    n, d = x.shape
    k = routing.experts.shape[-1]
    order, group_sizes = sort_by_expert(routing.experts, w_gate.shape[0])
    inverse = inverse_permutation(order)
    # Permutations of the k-repeated rows: gathers forward and backward, no [N*k, D] scatters.
    xs = permute_repeated(x, k, order, inverse)  # [N*k, D], rows grouped by expert
    ws = permute_rows(routing.weights.reshape(-1), order, inverse)  # [N*k] their routing weights
    ys = expert_swiglu(xs, group_sizes, w_gate, w_up, w_down, options=options, row_weights=ws)  # [N*k, D] weighted
    return unpermute_sum(ys, k, inverse, order).astype(x.dtype)  # each token's k rows summed: [N, D]


def dense_moe_oracle(
    x: jax.Array, routing: Routing, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """Every expert on every token, then mask: E/k times the FLOPs. The test oracle for dispatch paths."""
    gate = jnp.einsum("ND,EDF->NEF", x, w_gate)
    up = jnp.einsum("ND,EDF->NEF", x, w_up)
    ys = jnp.einsum("NEF,EFD->NED", jax.nn.silu(gate) * up, w_down)
    combine = jnp.einsum("NK,NKE->NE", routing.weights, jax.nn.one_hot(routing.experts, w_gate.shape[0]))
    return jnp.einsum("NED,NE->ND", ys.astype(jnp.float32), combine).astype(x.dtype)
