"""ERNIE 4.5 causal LM in Flax NNX, with scanned layer groups.

Layers are grouped by `ErnieConfig.layer_groups` (e.g. 21B-A3B: one dense layer, then 27 MoE layers). Each group
stores its layers' parameters stacked on a leading "layers" axis and runs them with `jax.lax.scan`, so a 54-layer
model compiles in about the time of one layer per group.
"""

from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from ernie_jax.config import ErnieConfig, LayerKind
from ernie_jax.layers import MLP, Attention, LayerKV, RMSNorm, make_param, normal_init, zeros_init
from ernie_jax.moe import MoEBlock, RouterStats

REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_all": jax.checkpoint_policies.checkpoint_dots,
}


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How the model runs (not what it is): kernels, rematerialisation."""

    remat: str = "none"  # one of REMAT_POLICIES
    attention_impl: str = "auto"  # pallas_kernels.flash_attention implementation
    gmm_impl: str = "auto"  # pallas_kernels.gmm implementation

    def __post_init__(self):
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"ModelOptions.remat: must be one of {sorted(REMAT_POLICIES)}, got {self.remat!r}")


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
        common = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack, rngs=rngs)
        self.attn = Attention(cfg, attention_impl=options.attention_impl, **common)
        self.post_attn_norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack, rngs=rngs
        )
        if kind == "moe":
            self.ffn = MoEBlock(cfg, gmm_impl=options.gmm_impl, **common)
        else:
            self.ffn = MLP(cfg, cfg.intermediate_size, use_bias=cfg.use_bias, **common)

    def __call__(self, h, positions, segment_ids, token_mask) -> tuple[jax.Array, RouterStats | None]:
        h = h + self.attn(self.input_norm(h), positions, segment_ids).astype(h.dtype)  # [B, T, D]
        normed = self.post_attn_norm(h)
        if self.kind == "moe":
            y, stats = self.ffn(normed, token_mask)
        else:
            y, stats = self.ffn(normed), None
        return h + y.astype(h.dtype), stats

    def cached(self, h, positions, layer_cache: LayerKV, fill, row_start) -> tuple[jax.Array, LayerKV]:
        """The same block over new tokens with a KV cache (generation); MoE layers stay dropless."""
        attn_out, layer_cache = self.attn.cached(self.input_norm(h), positions, layer_cache, fill, row_start)
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
        self.remat = options.remat
        self.layers = nnx.List(
            DecoderLayer(cfg, kind, options, dtype=dtype, param_dtype=param_dtype, stack=(repeats,), rngs=rngs)
            for kind in pattern
        )

    def __call__(self, h, positions, segment_ids, token_mask):
        graphdef, state = nnx.split(self.layers)

        def body(carry, layer_state):
            layers = nnx.merge(graphdef, layer_state)
            stats = []
            for layer in layers:
                carry, layer_stats = layer(carry, positions, segment_ids, token_mask)
                stats.append(layer_stats)
            return sharding.shard(carry, "batch", "seq", "act_embed"), tuple(stats)

        if self.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.remat], prevent_cse=False)
        h, stats = jax.lax.scan(body, h, state)  # stats: per pattern position, stacked [R, ...] or None
        return h, stats

    def cached(self, h, positions, group_cache: tuple[LayerKV, ...], fill, row_start):
        """Scan over the layers with their caches (per pattern position, stacked [R, B, S, K, H]) as scan inputs
        and the updated caches as outputs, so each layer reads and writes only its own slice."""
        graphdef, state = nnx.split(self.layers)

        def body(carry, layer_inputs):
            layer_state, caches = layer_inputs
            layers = nnx.merge(graphdef, layer_state)
            updated = []
            for layer, layer_cache in zip(layers, caches, strict=True):
                carry, layer_cache = layer.cached(carry, positions, layer_cache, fill, row_start)
                updated.append(layer_cache)
            return sharding.shard(carry, "batch", "seq", "act_embed"), tuple(updated)

        return jax.lax.scan(body, h, (state, group_cache))


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

    def __call__(
        self,
        input_ids: jax.Array,
        attention_mask: jax.Array | None = None,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        *,
        return_aux: bool = False,
        return_hidden: bool = False,
    ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        """Args:
        input_ids: [B, T] int tokens.
        attention_mask: [B, T], 1 for real tokens, 0 for padding (left or right).
        positions: [B, T] RoPE positions; default 0..T-1 in every row (as transformers does).
        segment_ids: [B, T] document ids of packed rows (0 = padding); tokens attend within their document.
        return_aux: also return {"router_stats": per group, per pattern position, RouterStats stacked [R]}.
        return_hidden: return the final-normed hidden states [B, T, D] in place of the logits, so a caller (the
            chunked training loss) can apply `logits_from_hidden` a slice at a time.
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
        h = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)  # [B, T, D]
        h = sharding.shard(h, "batch", "seq", "act_embed")
        router_stats = []
        for group in self.groups:
            h, stats = group(h, positions, segment_ids, token_mask)
            router_stats.append(stats)
        h = self.final_norm(h).astype(self.dtype)  # [B, T, D]
        out = h if return_hidden else self.logits_from_hidden(h)
        if return_aux:
            return out, {"router_stats": router_stats}
        return out

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

    def forward_cached(self, input_ids: jax.Array, positions: jax.Array, cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Run T new tokens per row through the model with a KV cache: prefill (the left-padded prompts) or one
        decode step (T = 1). Returns the final-normed hidden states [B, T, D] (apply `logits_from_hidden` to the
        positions you need: a prompt's full [B, T, V] logits are large) and the cache with T more slots filled.

        input_ids, positions: [B, T]. Slot `cache.fill + t` of every row receives token t.
        """
        h = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)  # [B, T, D]
        h = sharding.shard(h, "batch", "seq", "act_embed")
        layers = []
        for group, group_cache in zip(self.groups, cache.layers, strict=True):
            h, group_cache = group.cached(h, positions, group_cache, cache.fill, cache.row_start)
            layers.append(group_cache)
        h = self.final_norm(h).astype(self.dtype)
        return h, KVCache(tuple(layers), cache.fill + input_ids.shape[1], cache.row_start)

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
