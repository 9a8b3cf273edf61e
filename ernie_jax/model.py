"""ERNIE 4.5 causal LM in Flax NNX, with scanned layer groups.

Layers are grouped by `ErnieConfig.layer_groups` (e.g. 21B-A3B: one dense layer, then 27 MoE layers). Each group
stores its layers' parameters stacked on a leading "layers" axis and runs them with `jax.lax.scan`, so a 54-layer
model compiles in about the time of one layer per group. `ModelOptions.scan_layers=False` unrolls that scan (same
parameters, same arithmetic): a shallow model runs faster on XLA:CPU without the loop and its per-layer stacking.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from ernie_jax.config import ErnieConfig, LayerKind
from ernie_jax.layers import MLP, Attention, LayerKV, RMSNorm, make_param, normal_init, zeros_init
from ernie_jax.lora import dropout_keys
from ernie_jax.moe import MoEBlock, RouterStats
from ernie_jax.options import REMAT_CHOICES, ModelOptions

REMAT_POLICIES = {  # ModelOptions.remat -> what the backward pass may keep instead of recomputing
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.checkpoint_dots,
    # The flash kernel's keys, values, output and softmax statistics: the backward recomputes the FFN/MoE, the
    # query and output projections, not the kernel and the key and value projections.
    "attention": jax.checkpoint_policies.save_only_these_names("flash_kv", "flash_out"),
}
assert tuple(REMAT_POLICIES) == REMAT_CHOICES


class DecoderLayer(nnx.Module):
    """Pre-norm block: h += Attn(norm(h)); h += FFN(norm(h)), FFN dense SwiGLU or MoE."""

    def __init__(
        self,
        cfg: ErnieConfig,
        kind: LayerKind,
        options: ModelOptions,
        *,
        dtype,
        param_dtype,
        stack=(),
        rngs: nnx.Rngs | None = None,
    ):
        self.kind = kind
        self.options = options
        common = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack, rngs=rngs)
        self.attn = Attention(cfg, options=options, **common)
        self.post_attn_norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack, rngs=rngs
        )
        if kind == "moe":
            self.ffn = MoEBlock(cfg, options=options, **common)
        else:
            self.ffn = MLP(cfg, cfg.intermediate_size, use_bias=cfg.use_bias, **common)

    def __call__(self, h, positions, segment_ids, token_mask, dropout_key=None) -> tuple[jax.Array, RouterStats | None]:
        attn_key, ffn_key = dropout_keys(dropout_key, 2)
        h = h + self.attn(self.input_norm(h), positions, segment_ids, attn_key).astype(h.dtype)  # [B, T, D]
        normed = self.post_attn_norm(h)
        if self.kind == "moe":
            y, stats = self.ffn(normed, token_mask, ffn_key)
        else:
            y, stats = self.ffn(normed, ffn_key), None
        return h + y.astype(h.dtype), stats

    def cached(self, h, positions, layer_cache: LayerKV, fill, row_start, slot_ok=None) -> tuple[jax.Array, LayerKV]:
        """The same block over new tokens with a KV cache (generation); MoE layers stay dropless."""
        attn_out, layer_cache = self.attn.cached(self.input_norm(h), positions, layer_cache, fill, row_start, slot_ok)
        h = h + attn_out.astype(h.dtype)  # [B, T, D]
        normed = self.post_attn_norm(h)
        y = self.ffn(normed)[0] if self.kind == "moe" else self.ffn(normed)
        return h + y.astype(h.dtype), layer_cache


class LayerGroup(nnx.Module):
    """`repeats` copies of a layer pattern (e.g. (dense, moe)), parameters stacked, run with lax.scan."""

    def __init__(
        self,
        cfg: ErnieConfig,
        pattern: tuple[LayerKind, ...],
        repeats: int,
        options: ModelOptions,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs | None = None,
    ):
        self.pattern = pattern
        self.repeats = repeats
        self.options = options
        self.layers = nnx.List(
            DecoderLayer(cfg, kind, options, dtype=dtype, param_dtype=param_dtype, stack=(repeats,), rngs=rngs)
            for kind in pattern
        )

    def __call__(self, h, positions, segment_ids, token_mask, dropout_key=None):
        """dropout_key: the LoRA adapters' dropout key in training, split over the repeats (None: no dropout)."""
        graphdef, state = nnx.split(self.layers)
        # One key per repeat, scanned with its layers' parameters; None scans as an empty pytree.
        repeat_keys = None if dropout_key is None else jax.random.split(dropout_key, self.repeats)

        def body(carry, layer_inputs):
            layer_state, repeat_key = layer_inputs
            layers = nnx.merge(graphdef, layer_state)
            stats = []
            for layer, key in zip(layers, dropout_keys(repeat_key, len(layers)), strict=True):
                carry, layer_stats = layer(carry, positions, segment_ids, token_mask, key)
                stats.append(layer_stats)
            return sharding.shard(carry, "batch", "seq", "act_embed"), tuple(stats)

        if self.options.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.options.remat], prevent_cse=False)
        # stats: per pattern position, [R, ...] or None
        h, stats = jax.lax.scan(body, h, (state, repeat_keys), unroll=not self.options.scan_layers)
        return h, stats

    def cached(self, h, positions, group_cache: tuple[LayerKV, ...], fill, row_start, slot_ok=None):
        """Scan over the layers with their caches (per pattern position, stacked [R, B, S, K, H]) as scan inputs
        and the updated caches as outputs, so each layer reads and writes only its own slice."""
        graphdef, state = nnx.split(self.layers)

        def body(carry, layer_inputs):
            layer_state, caches = layer_inputs
            layers = nnx.merge(graphdef, layer_state)
            updated = []
            for layer, layer_cache in zip(layers, caches, strict=True):
                carry, layer_cache = layer.cached(carry, positions, layer_cache, fill, row_start, slot_ok)
                updated.append(layer_cache)
            return sharding.shard(carry, "batch", "seq", "act_embed"), tuple(updated)

        return jax.lax.scan(body, h, (state, group_cache), unroll=not self.options.scan_layers)


class MTPLayer(nnx.Module):
    """One multi-token-prediction depth (ERNIE's `mtp_*[d]` tensors): from the previous depth's hidden state at t
    and the embedding of token t + d + 1, predict token t + d + 2 through the shared final norm and head.

        x = concat(emb_norm(embed(token t+d+1)), hidden_norm(h_t)) @ proj      # [B, T, 2D] -> [B, T, D]
        h'_t = decoder layer d (a dense block: attention over the depth's own positions, then SwiGLU)
    """

    def __init__(self, cfg: ErnieConfig, depth: int, options: ModelOptions, *, dtype, param_dtype, rngs=None):
        d = cfg.hidden_size
        self.dtype = dtype
        self.emb_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.hidden_norm = RMSNorm(d, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        # [2D, D]: the input dim is the concatenation (embedding half first), sharded like nothing else.
        self.proj = make_param(rngs, normal_init(cfg.initializer_range), (2 * d, d), (None, "embed"), param_dtype)
        self.proj_bias = make_param(rngs, zeros_init, (d,), ("embed",), param_dtype) if cfg.use_bias else None
        self.block = DecoderLayer(cfg, cfg.layer_kind(depth), options, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, h, embedded, positions, segment_ids, token_mask) -> jax.Array:
        """h [B, T, D] previous depth (the main model's last layer output, before the final norm, for depth 0);
        embedded [B, T, D] the embeddings of the tokens one ahead of h's. Returns this depth's [B, T, D]."""
        out, _ = self.block(self._input(h, embedded), positions, segment_ids, token_mask)  # dense: no router statistics
        return out

    def cached(self, h, embedded, positions, layer_cache: LayerKV, cache: KVCache) -> tuple[jax.Array, LayerKV]:
        """The same depth over new positions with its own KV cache, whose slots follow the main `cache`'s
        (written at cache.fill ..; the same row starts and readable slots). For speculative decoding."""
        x = self._input(h, embedded)
        return self.block.cached(x, positions, layer_cache, cache.fill, cache.row_start, cache.slot_ok)

    def _input(self, h, embedded) -> jax.Array:
        x = jnp.concatenate([self.emb_norm(embedded), self.hidden_norm(h)], axis=-1).astype(self.dtype)
        b, t, c = x.shape
        # One row axis, as in the dense MLP: with [B, T, 2D] rows XLA:CPU built the projection's weight gradient
        # from a transposed copy of the [B, T, D] gradient, fused with the norm's backward (3 ms a step at batch 16).
        x = jnp.einsum("NC,CD->ND", x.reshape(b * t, c), self.proj[...].astype(self.dtype)).reshape(b, t, -1)
        return x if self.proj_bias is None else x + self.proj_bias[...].astype(self.dtype)  # [B, T, D]


class ErnieForCausalLM(nnx.Module):
    """`model(input_ids)` -> logits [B, T, V], exactly transformers' Ernie4_5(_Moe)ForCausalLM."""

    def __init__(
        self,
        cfg: ErnieConfig,
        *,
        rngs: nnx.Rngs | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        options: ModelOptions = ModelOptions(),
    ):
        self.config = cfg
        self.options = options
        self.dtype = dtype
        init = normal_init(cfg.initializer_range)
        self.embed = make_param(rngs, init, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), param_dtype)
        self.groups = nnx.List(
            LayerGroup(cfg, pattern, repeats, options, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            for pattern, repeats in cfg.layer_groups
        )
        self.final_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else make_param(rngs, init, (cfg.hidden_size, cfg.vocab_size), ("embed", "vocab"), param_dtype)
        )
        self.lm_head_bias = (
            make_param(rngs, zeros_init, (cfg.vocab_size,), ("vocab",), param_dtype) if cfg.lm_head_has_bias else None
        )
        depths = range(cfg.num_nextn_predict_layers)
        self.mtp = (
            nnx.List(MTPLayer(cfg, d, options, dtype=dtype, param_dtype=param_dtype, rngs=rngs) for d in depths)
            if cfg.num_nextn_predict_layers
            else None
        )

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        return_aux: bool = False,
        return_hidden: bool = False,
        return_mtp_logits: bool = False,
        mtp_input_ids: jax.Array | None = None,
        dropout_key: jax.Array | None = None,
    ) -> jax.Array | tuple:
        """Args:
        input_ids: [B, T] int tokens.
        attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right).
        positions: [B, T] RoPE positions; default 0..T-1 in every row (as transformers does).
        segment_ids: [B, T] document ids of packed rows (0 = padding); tokens attend within their document.
        return_aux: also return {"router_stats": per group, per pattern position, RouterStats stacked [R]}.
        return_hidden: return the final-normed hidden states [B, T, D] in place of the logits, so a caller (the
            chunked training loss) can apply `logits_from_hidden` a slice at a time.
        return_mtp_logits: also return the MTP depths' outputs (logits, or final-normed hidden states with
            return_hidden): `(out, mtp_out)`, or `(out, mtp_out, aux)` with return_aux. `mtp_out[d]` at position t
            predicts token t + d + 2, so it has T - d - 1 positions (the tokens it embeds must exist).
        mtp_input_ids: [B, T + n] the tokens the MTP depths embed, when the caller has n more than input_ids
            (training rows carry T + mtp.depth tokens): then every depth gets min(T, T + n - d - 1) positions.
        dropout_key: a key for the LoRA adapters' dropout (`lora.dropout`), given in training only; None (the
            default, for evaluation and generation) applies no dropout.
        """
        b, t = input_ids.shape
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        token_mask = None
        if segment_ids is not None:
            token_mask = segment_ids != 0
        if attention_mask is not None:
            valid = attention_mask.astype(bool)
            token_mask = valid if token_mask is None else token_mask & valid
            segment_ids = valid.astype(jnp.int32) if segment_ids is None else jnp.where(valid, segment_ids, 0)
        h = self.embed_tokens(input_ids)  # [B, T, D]
        router_stats = []
        for group, group_key in zip(self.groups, dropout_keys(dropout_key, len(self.groups)), strict=True):
            h, stats = group(h, positions, segment_ids, token_mask, group_key)
            router_stats.append(stats)
        last = h  # the last layer's output: what the first MTP depth reads (before the final norm)
        h = self.final_norm(h).astype(self.dtype)  # [B, T, D]
        out = h if return_hidden else self.logits_from_hidden(h)
        aux = {"router_stats": router_stats}
        if not return_mtp_logits:
            return (out, aux) if return_aux else out
        if self.mtp is None:
            raise ValueError("return_mtp_logits: this model has no MTP head (config num_nextn_predict_layers=0)")
        ids = input_ids if mtp_input_ids is None else mtp_input_ids
        mtp_hidden = self.mtp_hidden(last, ids, positions, segment_ids, token_mask)
        mtp_out = mtp_hidden if return_hidden else [self.logits_from_hidden(x) for x in mtp_hidden]
        return (out, mtp_out, aux) if return_aux else (out, mtp_out)

    def embed_tokens(self, ids: jax.Array) -> jax.Array:
        """Token embeddings [B, T] -> [B, T, D] in the compute dtype, sharded as activations."""
        h = jnp.take(self.embed[...], ids, axis=0).astype(self.dtype)
        return sharding.shard(h, "batch", "seq", "act_embed")

    def mtp_hidden(self, last, ids, positions, segment_ids, token_mask) -> list[jax.Array]:
        """The MTP depths on the main model's last-layer output `last` [B, T, D]: per depth the final-normed hidden
        states [B, L_d, D], where position t of depth d embeds ids[t + d + 1] and predicts ids[t + d + 2]."""
        outs, h = [], last
        for d, layer in enumerate(self.mtp):
            length = min(h.shape[1], ids.shape[1] - d - 1)
            cut = lambda x, n=length: None if x is None else x[:, :n]
            embedded = self.embed_tokens(ids[:, d + 1 : d + 1 + length])  # [B, L, D]
            h = layer(h[:, :length], embedded, cut(positions), cut(segment_ids), cut(token_mask))
            outs.append(self.final_norm(h).astype(self.dtype))
        return outs

    def init_cache(self, batch: int, size: int, row_start: jax.Array | None = None, dtype=None) -> KVCache:
        """An empty KV cache of `size` slots per row: per layer group and pattern position, keys and values
        [R, B, S, K, H] in the compute dtype. row_start [B]: each row's number of left-padding slots."""
        cfg = self.config
        shape = (batch, size, cfg.num_key_value_heads, cfg.resolved_head_dim)
        dtype = self.dtype if dtype is None else dtype

        def empty(repeats):
            zeros = jnp.zeros((repeats, *shape), dtype)
            return sharding.shard(zeros, "layers", "batch", "seq", "kv_heads", "head_dim")

        layers = tuple(
            tuple(LayerKV(empty(repeats), empty(repeats)) for _ in pattern) for pattern, repeats in cfg.layer_groups
        )
        row_start = jnp.zeros((batch,), jnp.int32) if row_start is None else row_start.astype(jnp.int32)
        return KVCache(layers, jnp.zeros((), jnp.int32), row_start)

    def forward_cached(
        self, input_ids: jax.Array, positions: jax.Array, cache: KVCache, *, return_last_layer: bool = False
    ) -> tuple:
        """Run T new tokens per row through the model with a KV cache: prefill (the left-padded prompts) or one
        decode step (T = 1). Returns the final-normed hidden states [B, T, D] (apply `logits_from_hidden` to the
        positions you need: a prompt's full [B, T, V] logits are large) and the cache with T more slots filled;
        with return_last_layer, (hidden, last layer's output before the final norm (what MTP reads), cache).

        input_ids, positions: [B, T]. Slot `cache.fill + t` of every row receives token t.
        """
        h = self.embed_tokens(input_ids)  # [B, T, D]
        layers = []
        for group, group_cache in zip(self.groups, cache.layers, strict=True):
            h, group_cache = group.cached(h, positions, group_cache, cache.fill, cache.row_start, cache.slot_ok)
            layers.append(group_cache)
        last = h
        h = self.final_norm(h).astype(self.dtype)
        cache = cache._replace(layers=tuple(layers), fill=cache.fill + input_ids.shape[1])
        return (h, last, cache) if return_last_layer else (h, cache)

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """The LM head: final-normed hidden states [B, T, D] (any T, e.g. one loss chunk) -> logits [B, T, V]."""
        if self.lm_head is None:
            logits = jnp.einsum("BTD,VD->BTV", h, self.embed[...].astype(self.dtype))
        else:
            logits = jnp.einsum("BTD,DV->BTV", h, self.lm_head[...].astype(self.dtype))
        if self.lm_head_bias is not None:
            logits = logits + self.lm_head_bias[...].astype(self.dtype)
        return logits


class KVCache(NamedTuple):
    """A static-size generation cache. Rows are left-padded so that every row writes the same slot each step.

    layers: per layer group, per pattern position, the group's stacked LayerKV ([R, B, S, K, H] each).
    fill: [] int32, slots filled so far (the next write slot).
    row_start: [B] int32, each row's first real slot; slots before it are padding and never attended to.
    """

    layers: tuple[tuple[LayerKV, ...], ...]
    fill: jax.Array
    row_start: jax.Array
    slot_ok: jax.Array | None = None  # [B, S] bool, slots a row may read (None: all); see generation/speculative.py


def moe_layer_stats(cfg: ErnieConfig, router_stats: list) -> RouterStats:
    """Flatten per-group router stats into one RouterStats with a leading [num_moe_layers] axis, layer order."""
    per_layer: dict[int, RouterStats] = {}
    for group_stats, group_indices, (pattern, _) in zip(
        router_stats, cfg.group_layer_indices(), cfg.layer_groups, strict=True
    ):
        for position, kind in enumerate(pattern):
            if kind != "moe":
                continue
            for r, layer in enumerate(group_indices[position]):
                per_layer[layer] = jax.tree.map(lambda a, r=r: a[r], group_stats[position])
    ordered = [per_layer[i] for i in sorted(per_layer)]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *ordered)


def abstract_model(
    cfg: ErnieConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.float32, options: ModelOptions = ModelOptions()
) -> ErnieForCausalLM:
    """A model whose parameters are ShapeDtypeStructs: no memory, for shapes, shardings and AOT compiles."""
    return nnx.eval_shape(
        lambda: ErnieForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, options=options)
    )


def with_options(model: nnx.Module, **changes) -> nnx.Module:
    """The same weights, run with other options (e.g. `moe_transport="allgather"` to generate on a CPU mesh from a
    model trained with ragged_a2a). Every module that reads options gets the new ones; arrays are shared, and
    `model` itself is left as it was."""
    options = dataclasses.replace(model.options, **changes)
    copy = nnx.merge(*nnx.split(model))
    for _, node in nnx.iter_graph(copy):
        if isinstance(node, nnx.Module) and isinstance(getattr(node, "options", None), ModelOptions):
            node.options = options
    return copy
