"""Choosing the next token from logits, in transformers' order: repetition penalty, temperature, top-k, top-p.

Everything is a jnp function of [B, V] fp32 logits, traced into the decode loop.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. Hashable: it is a static argument of the compiled decode loop."""

    temperature: float = 0.0  # 0: greedy (argmax)
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0

    def __post_init__(self):
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise ValueError(f"top_k must be >= 1 or None, got {self.top_k}")
        if self.top_p is not None and not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] or None, got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise ValueError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalises_repeats(self) -> bool:
        return self.repetition_penalty != 1.0


def apply_repetition_penalty(logits: jax.Array, seen: jax.Array, penalty: float) -> jax.Array:
    """CTRL's penalty, as transformers: a seen token's logit is divided by `penalty` if positive, else multiplied.

    logits [B, V] fp32; seen [B, V] bool (the row's prompt and generated tokens, padding excluded).
    """
    penalised = jnp.where(logits < 0, logits * penalty, logits / penalty)
    return jnp.where(seen, penalised, logits)


def top_k_filter(logits: jax.Array, k: int) -> jax.Array:
    """Keep the k largest logits per row (and any tied with the k-th), set the rest to -inf. [B, V] -> [B, V]."""
    kth_largest = jax.lax.top_k(logits, k)[0][:, -1:]  # [B, 1]
    return jnp.where(logits < kth_largest, -jnp.inf, logits)


def top_p_filter(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter: keep the smallest set of most likely tokens whose probability reaches p. [B, V] -> [B, V].

    A token is kept when the probability of the tokens strictly more likely than it is still below p, so the most
    likely token is always kept. Tokens tied with the last kept one are kept too (a threshold, not a scatter).
    """
    if p >= 1.0:  # everything; fp32 cumulative sums can reach 1 before the last token
        return logits
    sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]  # [B, V] descending
    sorted_probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs
    kept = jnp.sum(mass_before < p, axis=-1, keepdims=True)  # [B, 1], >= 1
    threshold = jnp.take_along_axis(sorted_logits, kept - 1, axis=-1)  # smallest kept logit
    return jnp.where(logits < threshold, -jnp.inf, logits)


def sampling_logits(logits: jax.Array, sampling: Sampling) -> jax.Array:
    """Temperature, then top-k, then top-p: the logits whose softmax is the distribution a token is drawn from.
    [B, V] fp32 -> [B, V] (filtered tokens at -inf). Not for greedy (temperature 0)."""
    logits = logits / sampling.temperature
    if sampling.top_k is not None and sampling.top_k < logits.shape[-1]:
        logits = top_k_filter(logits, sampling.top_k)
    if sampling.top_p is not None:
        logits = top_p_filter(logits, sampling.top_p)
    return logits


def choose_tokens(logits: jax.Array, key: jax.Array, sampling: Sampling, seen: jax.Array | None) -> jax.Array:
    """The next token per row: logits [B, V] fp32 -> [B] int32."""
    if sampling.penalises_repeats:
        logits = apply_repetition_penalty(logits, seen, sampling.repetition_penalty)
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, sampling_logits(logits, sampling), axis=-1).astype(jnp.int32)


def accept_draft(
    target: jax.Array, draft_dist: jax.Array, draft: jax.Array, key: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Speculative sampling's rule, which leaves the target distribution exactly as it is: accept the draft token d
    (drawn from q) with probability min(1, p(d) / q(d)); otherwise draw from max(p - q, 0), renormalised.

    target p, draft_dist q: [B, V] probabilities; draft [B] int32. Returns (accepted [B] bool, token [B] int32:
    the draft where accepted, the residual draw elsewhere).
    """
    accept_key, residual_key = jax.random.split(key)
    rows = jnp.arange(draft.shape[0])
    p_d, q_d = target[rows, draft], draft_dist[rows, draft]
    accepted = jax.random.uniform(accept_key, draft.shape) * q_d < p_d  # u < p/q without dividing by q = 0
    residual = jnp.maximum(target - draft_dist, 0.0)
    # p == q leaves no residual mass; then nothing can be rejected anyway (p(d) = q(d)), so any fallback is unused.
    residual = jnp.where(jnp.sum(residual, -1, keepdims=True) > 0, residual, target)
    redrawn = jax.random.categorical(residual_key, jnp.log(residual), axis=-1).astype(jnp.int32)
    return accepted, jnp.where(accepted, draft, redrawn)
