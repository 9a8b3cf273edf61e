"""Speculative decoding with the model's own MTP head: draft one token, verify it with the main model.

Each step runs the main model on two tokens per row, [latest token, draft], in one forward:
- the logits at the latest token decide the draft: greedy accepts it when it is the argmax; sampling accepts it
  with probability min(1, p(d) / q(d)) and otherwise draws from max(p - q, 0) renormalised (`accept_draft`), which
  leaves the main model's distribution exactly as it is;
- when the draft is accepted, the logits at the draft give one more token for free (the bonus).
So a step emits one or two tokens, and greedy output is token for token plain greedy's.

The MTP head (depth 0) then reads the main model's last-layer output at both positions, with the embeddings of
the tokens that followed them, and drafts the next token from whichever position is now the latest. It keeps its
own KV cache, on the same slots as the main cache. Every step writes two slots in every row (rows stay in
lockstep, as in `decode.py`); a rejected draft's slot becomes a hole that no later query reads (`KVCache.slot_ok`).
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.experimental import io_callback

from ernie_jax.generation.sampling import Sampling, accept_draft, choose_tokens, sampling_logits
from ernie_jax.layers import LayerKV
from ernie_jax.model import KVCache


class SpecState(NamedTuple):
    cache: KVCache  # the main model's; slot_ok marks rejected drafts' slots
    mtp_cache: LayerKV  # the MTP block's keys and values [B, S, K, H], slots aligned with `cache`
    tokens: jax.Array  # [B, M] int32 emitted tokens, pad_id after a row stops
    count: jax.Array  # [B] int32 tokens emitted per row
    last: jax.Array  # [B] int32 the latest emitted token (in neither cache yet)
    position: jax.Array  # [B] int32 its RoPE position
    draft: jax.Array  # [B] int32 the MTP head's guess for the token after `last`
    draft_dist: jax.Array | None  # [B, V] the distribution the draft was drawn from (sampling only)
    done: jax.Array  # [B] bool
    step: jax.Array  # [] int32 verify forwards so far
    drafted: jax.Array  # [] int32 drafts checked on live rows
    accepted: jax.Array  # [] int32 of which accepted


def _draft(model, mtp_hidden: jax.Array, key, sampling: Sampling) -> tuple[jax.Array, jax.Array | None]:
    """The MTP head's next-token guess from its hidden state [B, D] (and, when sampling, its distribution)."""
    logits = model.logits_from_hidden(model.final_norm(mtp_hidden[:, None]).astype(model.dtype))[:, 0]
    logits = logits.astype(jnp.float32)  # [B, V]
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), None
    filtered = sampling_logits(logits, sampling)
    return jax.random.categorical(key, filtered, axis=-1).astype(jnp.int32), jax.nn.softmax(filtered, axis=-1)


def _stream(stream, tokens, live) -> None:
    stream([int(t) if keep else None for t, keep in zip(tokens, live, strict=True)])


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "cache_size"))
def prefill_speculative(graphdef, params, prompt_ids, row_start, done, key, *, spec, cache_size: int) -> SpecState:
    """The prompts [B, P] through the main model (first new token) and through the MTP head (first draft)."""
    model = nnx.merge(graphdef, params)
    batch, width = prompt_ids.shape
    slot = jnp.arange(width)[None, :]
    positions = jnp.maximum(slot - row_start[:, None], 0)  # [B, P], 0 at each row's first real token
    start = model.init_cache(batch, cache_size, row_start)._replace(slot_ok=jnp.ones((batch, cache_size), bool))
    hidden, last_layer, cache = model.forward_cached(prompt_ids, positions, start, return_last_layer=True)
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0].astype(jnp.float32)  # [B, V]
    first = jnp.where(done, spec.pad_id, choose_tokens(logits, jax.random.fold_in(key, 0), spec.sampling, None))
    # MTP position t embeds the token after t: the prompt's next token, and the first new token after the last.
    next_ids = jnp.concatenate([prompt_ids[:, 1:], first[:, None]], axis=1)  # [B, P]
    cfg = model.config
    empty = jnp.zeros((batch, cache_size, cfg.num_key_value_heads, cfg.resolved_head_dim), model.dtype)
    mtp_hidden, mtp_cache = model.mtp[0].cached(
        last_layer, model.embed_tokens(next_ids), positions, LayerKV(empty, empty), start
    )
    draft, draft_dist = _draft(model, mtp_hidden[:, -1], jax.random.fold_in(key, 1), spec.sampling)
    if spec.stream is not None:
        io_callback(functools.partial(_stream, spec.stream), None, first, ~done, ordered=True)
    stops = jnp.isin(first, jnp.asarray(spec.eos_ids, jnp.int32)) if spec.eos_ids else jnp.zeros_like(done)
    return SpecState(
        cache=cache,
        mtp_cache=mtp_cache,
        tokens=jnp.full((batch, spec.max_new_tokens), spec.pad_id, jnp.int32).at[:, 0].set(first),
        count=jnp.where(done, 0, 1).astype(jnp.int32),
        last=first,
        position=width - row_start,
        draft=draft,
        draft_dist=draft_dist,
        done=done | stops | (spec.max_new_tokens <= 1),
        step=jnp.zeros((), jnp.int32),
        drafted=jnp.zeros((), jnp.int32),
        accepted=jnp.zeros((), jnp.int32),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"), donate_argnames=("state",))
def speculative_loop(graphdef, params, state: SpecState, key, *, spec) -> SpecState:
    """Draft-and-verify steps on device until every row has stopped or has max_new_tokens tokens."""
    model = nnx.merge(graphdef, params)
    sampling, limit = spec.sampling, spec.max_new_tokens
    eos = jnp.asarray(spec.eos_ids, jnp.int32)
    is_eos = (lambda t: jnp.isin(t, eos)) if spec.eos_ids else (lambda t: jnp.zeros(t.shape, bool))

    def keep_going(s: SpecState):
        return (s.step < limit) & ~jnp.all(s.done)

    def one_step(s: SpecState) -> SpecState:
        fill = s.cache.fill
        ids = jnp.stack([s.last, s.draft], axis=1)  # [B, 2]
        positions = jnp.stack([s.position, s.position + 1], axis=1)
        hidden, last_layer, cache = model.forward_cached(ids, positions, s.cache, return_last_layer=True)
        logits = model.logits_from_hidden(hidden).astype(jnp.float32)  # [B, 2, V]
        step_key = jax.random.fold_in(key, s.step + 2)
        if sampling.greedy:
            first = jnp.argmax(logits[:, 0], axis=-1).astype(jnp.int32)
            accepted = first == s.draft
            bonus = jnp.argmax(logits[:, 1], axis=-1).astype(jnp.int32)
        else:
            accept_key, bonus_key, step_key = jax.random.split(step_key, 3)
            target = jax.nn.softmax(sampling_logits(logits[:, 0], sampling), axis=-1)
            accepted, first = accept_draft(target, s.draft_dist, s.draft, accept_key)
            bonus = jax.random.categorical(bonus_key, sampling_logits(logits[:, 1], sampling), axis=-1)
            bonus = bonus.astype(jnp.int32)
        live = ~s.done
        take_bonus = live & accepted & ~is_eos(first) & (s.count + 1 < limit)
        # Each row writes its own columns: elementwise selects rather than a scatter, so the write stays local to a
        # row's shard on a mesh (columns past max_new_tokens are simply never matched).
        column = jnp.arange(limit)[None, :]  # [1, M]
        tokens = jnp.where((column == s.count[:, None]) & live[:, None], first[:, None], s.tokens)
        tokens = jnp.where((column == s.count[:, None] + 1) & take_bonus[:, None], bonus[:, None], tokens)
        count = s.count + live + take_bonus
        done = s.done | (live & (is_eos(first) | (take_bonus & is_eos(bonus)))) | (count >= limit)
        if spec.stream is not None:
            io_callback(functools.partial(_stream, spec.stream), None, first, live, ordered=True)
            io_callback(functools.partial(_stream, spec.stream), None, bonus, take_bonus, ordered=True)

        # The MTP head over both new positions, each with the token that followed it (written at the same two
        # slots as the main cache), then the next draft from the position that is now the latest.
        mtp_view = cache._replace(fill=fill)
        mtp_hidden, mtp_cache = model.mtp[0].cached(
            last_layer, model.embed_tokens(jnp.stack([first, bonus], axis=1)), positions, s.mtp_cache, mtp_view
        )
        latest = jnp.where(accepted, 1, 0)  # [B]: the draft's position when it was accepted
        source = jnp.take_along_axis(mtp_hidden, latest[:, None, None], axis=1)[:, 0]  # [B, D]
        draft, draft_dist = _draft(model, source, step_key, sampling)
        # A rejected draft's slot is a hole from now on, in both caches.
        cache = cache._replace(slot_ok=cache.slot_ok.at[:, fill + 1].set(accepted))
        return SpecState(
            cache=cache,
            mtp_cache=mtp_cache,
            tokens=tokens,
            count=count,
            last=jnp.where(accepted, bonus, first),
            position=s.position + 1 + accepted,
            draft=draft,
            draft_dist=draft_dist,
            done=done,
            step=s.step + 1,
            drafted=s.drafted + jnp.sum(live),
            accepted=s.accepted + jnp.sum(live & accepted),
        )

    return jax.lax.while_loop(keep_going, one_step, state)
