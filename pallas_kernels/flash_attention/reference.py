"""Pure-jnp causal GQA attention: the twin every attention kernel is tested against, and the CPU path."""

from __future__ import annotations

import jax
import jax.numpy as jnp

# Large finite negative instead of -inf: a fully masked row stays finite (as transformers' eager path does).
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(
    t: int, s: int, *, causal: bool, q_segment_ids: jax.Array | None, kv_segment_ids: jax.Array | None
) -> jax.Array | None:
    """Boolean [B or 1, T, S] mask: True where query t may attend key s."""
    mask = None
    if causal:
        # Queries are the last T of S keys (T == S in training).
        mask = (jnp.arange(t)[:, None] + (s - t)) >= jnp.arange(s)[None, :]
        mask = mask[None]
    if q_segment_ids is not None:
        same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]  # [B, T, S]
        mask = same if mask is None else mask & same
    return mask


def attention_reference(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
) -> jax.Array:
    """softmax(q k^T * scale + mask) v with fp32 logits and softmax, laid out for XLA (the CPU path).

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H] with K dividing N (query head n reads kv head n // (N // K)).
      segment_ids: [B, T] ints; tokens attend only within their segment (packed documents, padding).
      kv_segment_ids: [B, S]; defaults to segment_ids.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    s, kv = k.shape[1], k.shape[2]
    g = n // kv
    scale = h**-0.5 if sm_scale is None else sm_scale
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    # Head-major layouts, so both matmuls are plain batched matmuls over (B, K) and the softmax reduces over the
    # contiguous key axis; the G query heads that share a kv head are stacked along rows (M = G * T).
    qh = jnp.einsum("BTKGH->BKGTH", q.reshape(b, t, kv, g, h)).reshape(b, kv, g * t, h)  # [B, K, M, H]
    kh, vh = jnp.einsum("BSKH->BKSH", k), jnp.einsum("BSKH->BKSH", v)  # [B, K, S, H]
    logits = jnp.einsum("BKMH,BKSH->BKMS", qh, kh, preferred_element_type=jnp.float32).reshape(b, kv, g, t, s)
    mask = attention_mask(t, s, causal=causal, q_segment_ids=segment_ids, kv_segment_ids=kv_segment_ids)
    if mask is not None:
        # An additive mask: its gradient is the identity, so the backward needs no mask (a select would).
        logits = logits + jnp.where(mask, 0.0, MASK_VALUE)[:, None, None]  # [B, K, G, T, S]
    # Softmax with the normalisation after the second matmul (as flash attention does): the division touches
    # [.., H] outputs instead of [.., S] probabilities. The max is only a stabiliser, so it carries no gradient.
    top = jax.lax.stop_gradient(jnp.max(logits, axis=-1, keepdims=True))
    weights = jnp.exp((logits - top) * scale).reshape(b, kv, g * t, s)  # [B, K, M, S], unnormalised
    total = jnp.sum(weights, axis=-1, keepdims=True)  # [B, K, M, 1]
    out = jnp.einsum("BKMS,BKSH->BKMH", weights.astype(v.dtype), vh, preferred_element_type=jnp.float32) / total
    out = jnp.einsum("BKGTH->BTKGH", out.reshape(b, kv, g, t, h))
    return out.reshape(b, t, n, h).astype(q.dtype)
