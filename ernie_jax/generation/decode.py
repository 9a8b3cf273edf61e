"""Generation with a KV cache: one prefill over the left-padded prompts, then a decode loop that runs on device.

Two compiled functions per (model, shapes, sampling) and no per-token Python:
- `prefill`: the prompts [B, P] (left-padded, so every row writes the same cache slot each step) run through
  the model once, filling cache slots 0..P-1 and choosing the first new token of every row.
- `decode_loop`: a `lax.while_loop` of single-token steps over the static-size cache, until `max_new_tokens` or every
  row has stopped. Its state, cache included, is donated, so the cache is updated in place.

Rows keep their own RoPE position (prompt length + tokens so far), their own first real slot (the cache's
`row_start`) and their own stop flag: a row that emits an EOS token stops, the others go on. Under
`sharding.use_mesh` the batch and the cache follow the rules table and MoE layers run expert-parallel.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.experimental import io_callback

import sharding
from ernie_jax.generation.sampling import Sampling, choose_tokens
from ernie_jax.generation.speculative import prefill_speculative, speculative_loop
from ernie_jax.model import KVCache

PROMPT_BUCKET = 16  # prompts are left-padded to a multiple of this, so nearby lengths share one compile

# stream(tokens): called once per step with one entry per prompt, the new token or None once the row has stopped
StreamFn = Callable[[list[int | None]], None]


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    """Everything static about a decode loop (hashable: part of the compiled functions' cache key)."""

    sampling: Sampling
    max_new_tokens: int
    eos_ids: tuple[int, ...]  # empty: never stop early
    pad_id: int  # written after a row stops
    record_logits: bool = False  # keep every step's logits (for tests: [B, max_new_tokens, V] fp32)
    stream: StreamFn | None = None
    speculative: bool = False  # draft with the MTP head, verify with the main model (generation/speculative.py)


class DecodeState(NamedTuple):
    cache: KVCache
    tokens: jax.Array  # [B, M] int32 new tokens, pad_id after a row stops
    step: jax.Array  # [] int32 tokens chosen so far
    last: jax.Array  # [B] int32 the latest token, the next step's input
    position: jax.Array  # [B] int32 the latest token's RoPE position
    done: jax.Array  # [B] bool
    seen: jax.Array | None  # [B, V] bool tokens of the row so far, only with a repetition penalty
    logits: jax.Array | None  # [B, M, V] fp32, only with record_logits


class Generated(NamedTuple):
    """The raw result of `decode_batch`; `generate` turns it into per-prompt lists."""

    tokens: np.ndarray  # [B, M] int32
    steps: int  # how many of the M columns were produced
    logits: np.ndarray | None  # [B, M, V] fp32 with record_logits
    prompt_ids: np.ndarray  # [B, P] the left-padded prompts as run
    row_start: np.ndarray  # [B] each row's left padding
    stats: dict | None = None  # speculative decoding: drafts checked, accepted, main-model forwards


def _stream_to_host(stream: StreamFn, tokens: np.ndarray, was_done: np.ndarray) -> None:
    stream([None if stopped else int(token) for token, stopped in zip(tokens, was_done, strict=True)])


def _choose_and_record(state: DecodeState, logits: jax.Array, key: jax.Array, spec: DecodeSpec) -> DecodeState:
    """Choose every row's next token from its logits [B, V] fp32 and append it."""
    token = choose_tokens(logits, jax.random.fold_in(key, state.step), spec.sampling, state.seen)  # [B]
    token = jnp.where(state.done, spec.pad_id, token)
    tokens = jax.lax.dynamic_update_slice_in_dim(state.tokens, token[:, None], state.step, axis=1)
    seen = state.seen
    if seen is not None:
        seen = seen.at[jnp.arange(token.shape[0]), token].set(True)
    recorded = state.logits
    if recorded is not None:
        recorded = jax.lax.dynamic_update_slice_in_dim(recorded, logits[:, None], state.step, axis=1)
    if spec.stream is not None:
        io_callback(functools.partial(_stream_to_host, spec.stream), None, token, state.done, ordered=True)
    stops = jnp.isin(token, jnp.asarray(spec.eos_ids, jnp.int32)) if spec.eos_ids else jnp.zeros_like(state.done)
    return state._replace(
        tokens=tokens, step=state.step + 1, last=token, done=state.done | stops, seen=seen, logits=recorded
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "cache_size"))
def prefill(graphdef, params, prompt_ids, row_start, done, key, prompt_inputs=None, *, spec: DecodeSpec,
            cache_size: int):  # fmt: skip
    """Fill the cache with the prompts [B, P] and choose the first new token of every row.

    prompt_inputs: what else the model's prompt forward takes, by name (a VL model: its images and 3D positions,
    `ernie_jax.vl.generation`); its "positions" replace the 1D ones, and decoding goes on from each row's largest.
    """
    model = nnx.merge(graphdef, params)
    batch, width = prompt_ids.shape
    slot = jnp.arange(width)[None, :]  # [1, P]
    real = slot >= row_start[:, None]  # [B, P]
    extra = dict(prompt_inputs or {})
    positions = extra.pop("positions", jnp.maximum(slot - row_start[:, None], 0))  # 1D: 0 at the first real token
    cache = model.init_cache(batch, cache_size, row_start)
    hidden, cache = model.forward_cached(prompt_ids, positions, cache, **extra)  # [B, P, D]
    logits = model.logits_from_hidden(hidden[:, -1:])[:, 0].astype(jnp.float32)  # [B, V]
    vocab = logits.shape[-1]
    seen = None
    if spec.sampling.penalises_repeats:
        seen = jnp.zeros((batch, vocab), bool).at[jnp.arange(batch)[:, None], prompt_ids].max(real)
    state = DecodeState(
        cache=cache,
        tokens=jnp.full((batch, spec.max_new_tokens), spec.pad_id, jnp.int32),
        step=jnp.zeros((), jnp.int32),
        last=jnp.zeros((batch,), jnp.int32),
        position=jnp.max(positions.reshape(-1, batch, width), axis=(0, 2)),  # 1D: width - 1 - row_start
        done=done,
        seen=seen,
        logits=jnp.zeros((batch, spec.max_new_tokens, vocab), jnp.float32) if spec.record_logits else None,
    )
    return _choose_and_record(state, logits, key, spec)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"), donate_argnames=("state",))
def decode_loop(graphdef, params, state: DecodeState, key, *, spec: DecodeSpec) -> DecodeState:
    """Single-token steps on device until max_new_tokens or every row has stopped."""
    model = nnx.merge(graphdef, params)

    def keep_going(s: DecodeState):
        return (s.step < spec.max_new_tokens) & ~jnp.all(s.done)

    def one_step(s: DecodeState) -> DecodeState:
        position = s.position + 1
        hidden, cache = model.forward_cached(s.last[:, None], position[:, None], s.cache)  # [B, 1, D]
        logits = model.logits_from_hidden(hidden)[:, 0].astype(jnp.float32)  # [B, V]
        return _choose_and_record(s._replace(cache=cache, position=position), logits, key, spec)

    return jax.lax.while_loop(keep_going, one_step, state)


def batch_multiple() -> int:
    """Rows the batch must be a multiple of: the active mesh's batch shards (1 without a mesh)."""
    ctx = sharding.active()
    if ctx is None:
        return 1
    axes = sharding.logical_to_spec(("batch",), ctx.mesh, ctx.rules)[0]
    axes = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
    return math.prod(ctx.mesh.shape[a] for a in axes)


def decode_batch(
    model,
    prompts: Sequence[Sequence[int]],
    spec: DecodeSpec,
    *,
    seed: int = 0,
    prompt_inputs: Callable[[np.ndarray, np.ndarray], dict] | None = None,
) -> Generated:
    """Prefill and decode `prompts` (token-id lists of any lengths) together; see `generate`.

    prompt_inputs(prompt_ids [B, P], row_start [B]) -> the prompt forward's other inputs (see `prefill`), built for
    the left-padded batch as run."""
    if not prompts:
        raise ValueError("generate: no prompts")
    lengths = [len(p) for p in prompts]
    if min(lengths) == 0:
        raise ValueError(f"generate: prompt {lengths.index(0)} is empty; every prompt needs at least one token")
    vocab = model.config.vocab_size
    for i, prompt in enumerate(prompts):
        bad = [t for t in prompt if not 0 <= t < vocab]
        if bad:
            raise ValueError(f"generate: prompt {i} has token ids outside the vocabulary [0, {vocab}): {bad[:5]}")
    real_rows = len(prompts)
    rows = -(-real_rows // batch_multiple()) * batch_multiple()  # a mesh shards the batch: pad with stopped rows
    width = -(-max(lengths) // PROMPT_BUCKET) * PROMPT_BUCKET
    prompt_ids = np.full((rows, width), spec.pad_id, np.int32)
    row_start = np.full((rows,), width - 1, np.int32)  # filler rows: one pad token
    for i, prompt in enumerate(prompts):
        prompt_ids[i, width - len(prompt) :] = prompt
        row_start[i] = width - len(prompt)
    done = np.arange(rows) >= real_rows
    graphdef, params = nnx.split(model)
    key = jax.random.key(seed)
    extra = None if prompt_inputs is None else prompt_inputs(prompt_ids, row_start)
    if spec.speculative:
        if extra is not None:
            raise ValueError("speculative decoding takes text prompts only")
        return _decode_speculative(graphdef, params, prompt_ids, row_start, done, key, spec, real_rows)
    cache_size = width + spec.max_new_tokens  # the last step writes slot width + max_new_tokens - 2
    state = prefill(graphdef, params, prompt_ids, row_start, done, key, extra, spec=spec, cache_size=cache_size)
    state = decode_loop(graphdef, params, state, key, spec=spec)
    tokens = np.asarray(state.tokens)[:real_rows]
    logits = None if state.logits is None else np.asarray(state.logits)[:real_rows]
    return Generated(tokens, int(state.step), logits, prompt_ids[:real_rows], row_start[:real_rows])


def _decode_speculative(graphdef, params, prompt_ids, row_start, done, key, spec: DecodeSpec, real_rows: int):
    """decode_batch's speculative path: two cache slots per step (a draft may be rejected), stats kept."""
    cache_size = prompt_ids.shape[1] + 2 * spec.max_new_tokens
    state = prefill_speculative(graphdef, params, prompt_ids, row_start, done, key, spec=spec, cache_size=cache_size)
    state = speculative_loop(graphdef, params, state, key, spec=spec)
    counts = np.asarray(state.count)[:real_rows]
    drafted, accepted, forwards = int(state.drafted), int(state.accepted), int(state.step)
    stats = {
        "drafted": drafted,
        "accepted": accepted,
        "acceptance": accepted / drafted if drafted else 0.0,
        "main_forwards": forwards,  # verify steps after the prefill
        # tokens past the prefill's first one, per verify forward and live row
        "tokens_per_forward": (drafted + accepted) / drafted if drafted else 0.0,
    }
    tokens = np.asarray(state.tokens)[:real_rows]
    return Generated(tokens, int(counts.max(initial=0)), None, prompt_ids[:real_rows], row_start[:real_rows], stats)


def new_tokens_per_row(generated: Generated, eos_ids: Sequence[int]) -> list[list[int]]:
    """Each row's new tokens, up to and including its first EOS."""
    out = []
    for row in generated.tokens[:, : generated.steps].tolist():
        stop = next((i for i, token in enumerate(row) if token in eos_ids), None)
        out.append(row if stop is None else row[: stop + 1])
    return out
