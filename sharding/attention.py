"""Attention inside `jax.shard_map`: each device runs the attention kernel on its own batch and head shard.

A Pallas `pallas_call` (the Mosaic flash-attention kernel on TPU) cannot be partitioned by XLA under plain jit:
with sharded inputs XLA would gather them and run the kernel replicated. Attention is independent per sequence
and per KV-head group, so a shard_map over the batch axes and (when it divides the KV heads) the head axes is
exact with no communication. Mesh axes come from the logical rules ("batch", "act_heads").
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from jax.sharding import PartitionSpec

from sharding.context import ShardingContext
from sharding.rules import logical_to_spec

AttentionFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array | None], jax.Array]


def attention_specs(q_shape, k_shape, ctx: ShardingContext) -> tuple[PartitionSpec, PartitionSpec, PartitionSpec]:
    """(q/out spec, k/v spec, segment_ids spec). Batch axes that do not divide B are dropped; heads are sharded
    only when the head axes divide the KV heads (hence the query heads too), so each shard keeps whole GQA groups."""
    b, _, n, _ = q_shape
    kv = k_shape[2]
    batch = logical_to_spec(("batch",), ctx.mesh, ctx.rules, shape=(b,), indivisible="replicate")[0]
    heads = logical_to_spec(("act_heads",), ctx.mesh, ctx.rules, shape=(kv,), indivisible="replicate")[0]
    if heads is not None and n % kv:
        heads = None
    q_spec = PartitionSpec(batch, None, heads, None)
    return q_spec, q_spec, PartitionSpec(batch, None)


def sharded_attention(
    fn: AttentionFn,
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    segment_ids: jax.Array | None,
    ctx: ShardingContext,
) -> jax.Array:
    """fn(q, k, v, segment_ids) per shard. q [B, T, N, H], k/v [B, S, K, H], segment_ids [B, T] -> [B, T, N, H]."""
    q_spec, kv_spec, seg_spec = attention_specs(q.shape, k.shape, ctx)
    if segment_ids is None:
        body = lambda q_, k_, v_: fn(q_, k_, v_, None)
        args, in_specs = (q, k, v), (q_spec, kv_spec, kv_spec)
    else:
        body = fn
        args, in_specs = (q, k, v, segment_ids), (q_spec, kv_spec, kv_spec, seg_spec)
    return jax.shard_map(body, mesh=ctx.mesh, in_specs=in_specs, out_specs=q_spec, check_vma=False)(*args)
