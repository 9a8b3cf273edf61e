"""The training losses: masked token cross-entropy (whole or chunked over the sequence) and ERNIE's router terms
(load-balance aux loss and z-loss from the router statistics, orthogonality of the router weights).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from ernie_jax.moe import RouterWeight
from ernie_jax.training.config import MoELossConfig


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over masked tokens of -log softmax(logits)[target], in fp32. logits [B, T, V]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * mask)


def chunked_cross_entropy_sum(
    h: jax.Array, head_fn: Callable[[jax.Array], jax.Array], targets: jax.Array, mask: jax.Array, chunk: int
) -> jax.Array:
    """cross_entropy_sum(head_fn(h), targets, mask), computed `chunk` tokens of the sequence at a time.

    The logits [B, T, V] in fp32 are the largest temporary of a training step (13.5 GB per chip for 21B-A3B at
    8 x 4096 tokens), so they are never formed whole: lax.scan runs one chunk after another, and jax.checkpoint on
    the chunk body makes the backward pass recompute that chunk's logits instead of keeping every chunk's as a
    residual. `head_fn` (h [B, C, D] -> logits [B, C, V]) closes over the head weights; scan's transpose carries
    their gradient across chunks and sums it, in the weights' dtype. h [B, T, D]; targets, mask [B, T].
    """
    b, t = targets.shape
    if chunk <= 0 or t % chunk:
        raise ValueError(f"loss_chunk: {chunk} must be a positive divisor of the sequence length {t}")
    n = t // chunk

    def to_chunks(x):  # [B, T, ...] -> [N, B, C, ...]: scan walks the leading axis
        return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # inside scan there is nothing for CSE to merge
    def body(total, xs):
        h_c, targets_c, mask_c = xs  # [B, C, D], [B, C], [B, C]
        h_c = sharding.shard(h_c, "batch", "seq", "act_embed")
        return total + cross_entropy_sum(head_fn(h_c), targets_c, mask_c), None

    xs = (to_chunks(h), to_chunks(targets), to_chunks(mask))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def router_orthogonal_loss(router_w: jax.Array) -> jax.Array:
    """Paddle's orthogonal loss per layer: rows of W [E, D] L2-normalised, mean of (W W^T - I)^2, summed over layers.
    router_w [R, D, E] (a scanned group's stacked routers) or [D, E] (one router outside the groups)."""
    w = jnp.swapaxes(router_w.astype(jnp.float32).reshape(-1, *router_w.shape[-2:]), -1, -2)  # [R, E, D]
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    gram = jnp.einsum("RED,RFD->REF", w, w) - jnp.eye(w.shape[-2])
    return jnp.sum(jnp.mean(gram**2, axis=(-1, -2)))


def orthogonal_loss(params: nnx.State) -> jax.Array:
    """The orthogonal loss summed over every router: the parameters of type RouterWeight, wherever they sit."""
    routers = jax.tree.leaves(nnx.filter_state(params, RouterWeight))
    return sum((router_orthogonal_loss(w) for w in routers), jnp.zeros(()))


def sum_router_stats(router_stats: list, field: str) -> jax.Array:
    """One RouterStats field summed over every MoE layer (per group, per pattern position, stacked [R])."""
    leaves = [getattr(s, field) for group in router_stats for s in group if s is not None]
    return sum(jnp.sum(x) for x in leaves) if leaves else jnp.zeros(())


def total_loss(coef: MoELossConfig, ce: jax.Array, aux: jax.Array, z: jax.Array, ortho: jax.Array) -> jax.Array:
    """The training objective: token cross-entropy plus ERNIE's router terms, each with its coefficient."""
    return ce + coef.aux_loss_coef * aux + coef.z_loss_coef * z + coef.ortho_loss_coef * ortho


def mtp_targets(batch: dict[str, jax.Array], seq_len: int, depth: int) -> list[tuple[jax.Array, jax.Array]]:
    """(targets, mask) [B, T] per MTP depth from a batch of rows with T + depth tokens: position t of depth d
    learns targets[t + d + 1] (token t + d + 2), only where that target is a learned token of t's own document."""
    segments = batch["segment_ids"]
    out = []
    for d in range(depth):
        ahead = slice(d + 1, d + 1 + seq_len)
        same_document = segments[:, ahead] == segments[:, :seq_len]
        out.append((batch["targets"][:, ahead], batch["loss_mask"][:, ahead] * same_document))
    return out
