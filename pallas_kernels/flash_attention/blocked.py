"""Causal attention for XLA backends: query blocks that skip the keys they cannot see.

The twin (`reference.attention_reference`) scores every query against every key and masks half of them away. Here
the queries are cut into blocks, and each block attends only to the keys up to its last query, through the twin
itself: about half the FLOPs. Each block's [rows, keys] scores are also small enough to stay in cache, which on a
CPU matters more than the FLOPs: the [T, S] scores of one long sequence do not fit.

The keys a block leaves out are ones the twin masks for every query of the block, and a masked score's weight is
exactly zero there, so each query's softmax is unchanged (up to the matmuls' float rounding). The one difference: a
query that may see no key at all (only possible when kv_segment_ids differ from segment_ids) gets the twin's
uniform average over the keys it was given, here its block's visible keys instead of all S; nothing reads such a
row.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from pallas_kernels.flash_attention.reference import attention_reference

MIN_BLOCK = 32  # shorter query blocks make matmuls too small to pay for their own dispatch
MAX_BLOCK = 128
MAX_BLOCKS = 16  # the blocks are unrolled into the program; more of them only lengthen compilation


def query_block_length(t: int) -> int:
    """Queries per block for T queries: a quarter of T within [MIN_BLOCK, MAX_BLOCK], and at most MAX_BLOCKS blocks.

    Measured on a 2-core CPU, forward + backward of [B, T, N, H] attention: T=128 best at 32, T=1024 at 64-128,
    T=2048 (H=128) at 128.
    """
    return max(min(max(t // 4, MIN_BLOCK), MAX_BLOCK), math.ceil(t / MAX_BLOCKS))


def attention_blocked(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_q: int | None = None,
) -> jax.Array:
    """`attention_reference`, computed per query block over the keys that block can see (causal only).

    q [B, T, N, H], k/v [B, S, K, H] with the queries the last T of S keys, segment_ids [B, T],
    kv_segment_ids [B, S] -> [B, T, N, H]. `block_q` overrides `query_block_length(T)`.
    """
    t, s = q.shape[1], k.shape[1]
    block = block_q or query_block_length(t)
    if not causal or t < 2 * block:
        return attention_reference(
            q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, sm_scale=sm_scale
        )
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    outs = []
    for start in range(0, t, block):
        stop = min(start + block, t)
        visible = s - t + stop  # the block's last query sits at key position visible - 1
        outs.append(
            attention_reference(
                q[:, start:stop],
                k[:, :visible],
                v[:, :visible],
                causal=True,
                segment_ids=None if segment_ids is None else segment_ids[:, start:stop],
                kv_segment_ids=None if kv_segment_ids is None else kv_segment_ids[:, :visible],
                sm_scale=sm_scale,
            )
        )
    return jnp.concatenate(outs, axis=1)  # [B, T, N, H]
