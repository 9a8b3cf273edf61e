"""ERNIE 4.5 routing: which experts each token goes to, with what weight, and the router statistics training uses.

  1. logits = x_fp32 @ W_router (fp32, no bias)                                     [N, E]
  2. probs = softmax(logits) over all experts
  3. selection: top-k of (probs + e_score_correction_bias); the bias affects selection only
  4. weights: the *unbiased* probs of the selected experts / max(sum, moe_norm_min)
(transformers `Ernie4_5_MoeTopKRouter`, Paddle `topk_gate`.) Plain functions on arrays, shared by the text MoE
and the VL model's modality pools.

The router's two variables have their own types, so filters select them by role, never by name or path:
`RouterWeight` (an `nnx.Param`, trained, with the orthogonal loss) and `CorrectionBias` (not a Param: the
optimizer never sees it; the aux-free sign rule updates it).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx


class RouterWeight(nnx.Param):
    """The router's [D, E] fp32 weight (`gate.weight`): a parameter whose role the training losses select by type."""


class CorrectionBias(nnx.Variable):
    """Aux-loss-free balancing bias (`moe_statics.e_score_correction_bias`): not a gradient-trained parameter."""


class Routing(NamedTuple):
    weights: jax.Array  # [N, k] fp32 mixing weights (unbiased probs, renormalised)
    experts: jax.Array  # [N, k] int32 selected experts
    probs: jax.Array  # [N, E] fp32 softmax over all experts
    logits: jax.Array  # [N, E] fp32 router logits


class RouterStats(NamedTuple):
    """Per-layer router statistics, returned as values so training can log them and update the bias."""

    tokens_per_expert: jax.Array  # [E] fp32 count of dispatched (biased top-k) assignments
    aux_loss: jax.Array  # [] load-balance loss E * sum_e f_e * P_e (= k when balanced)
    z_loss: jax.Array  # [] mean logsumexp(logits)^2
    dropped: jax.Array  # [] assignments dropped by a bounded expert-parallel buffer (0 when dropless)


def route(x: jax.Array, router_w: jax.Array, correction_bias: jax.Array, *, k: int, norm_min: float) -> Routing:
    """Select k experts per token. x [N, D], router_w [D, E] fp32, correction_bias [E] fp32."""
    logits = jnp.einsum("ND,DE->NE", x.astype(jnp.float32), router_w.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    _, experts = jax.lax.top_k(probs + correction_bias.astype(jnp.float32), k)  # [N, k]
    chosen = jnp.take_along_axis(probs, experts, axis=-1)
    weights = chosen / jnp.maximum(chosen.sum(axis=-1, keepdims=True), norm_min)
    return Routing(weights, experts.astype(jnp.int32), probs, logits)


def router_stats(routing: Routing, *, k: int, token_mask: jax.Array | None = None) -> RouterStats:
    """Load counts, aux load-balance loss (Paddle form: counts from top-k on unbiased probs) and z-loss.

    token_mask [N] (1 = real token) excludes padding from every statistic.
    """
    n, e = routing.probs.shape
    mask = jnp.ones((n,), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)
    dispatched = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32).sum(axis=1)  # [N, E]
    tokens_per_expert = jnp.einsum("NE,N->E", dispatched, mask)
    _, unbiased = jax.lax.top_k(routing.probs, k)
    unbiased_counts = jnp.einsum("NE,N->E", jax.nn.one_hot(unbiased, e, dtype=jnp.float32).sum(axis=1), mask)
    mean_prob = jnp.einsum("NE,N->E", routing.probs, mask) / denom
    aux = e * jnp.sum(jax.lax.stop_gradient(unbiased_counts / denom) * mean_prob)
    z = jnp.sum(jax.nn.logsumexp(routing.logits, axis=-1) ** 2 * mask) / denom
    return RouterStats(tokens_per_expert, aux, z, jnp.zeros((), jnp.float32))
