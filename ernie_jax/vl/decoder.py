"""The ERNIE 4.5 VL language model's layers: 3D-RoPE attention and dense or modality-isolated MoE FFNs.

Attention, norms and dense MLPs are the text models' (`ernie_jax.layers`); only the rotary angles differ (one per
frequency pair and token, from 3D positions, see `rope.mrope_angles`), so they are computed once per forward and
shared by every layer, as transformers does. Consecutive layers of one kind are stacked and run with `lax.scan`.
"""

from __future__ import annotations

import jax
from flax import nnx

import sharding
from ernie_jax.layers import MLP, Attention, LayerKV, RMSNorm, cached_attention, rotate_pairs
from ernie_jax.model import REMAT_POLICIES
from ernie_jax.options import ModelOptions
from ernie_jax.vl.config import MlpKind, VLTextConfig
from ernie_jax.vl.moe import ModalityIsolatedMoE


class MRopeAttention(Attention):
    """The text models' causal GQA attention (same parameters), rotated by precomputed 3D-RoPE angles."""

    def __call__(self, x: jax.Array, angles: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
        """x [B, T, D], angles [B, T, H/2] fp32, segment_ids [B, T] (0 = padding) -> [B, T, D]."""
        q, k, v = self._project_qkv(x)
        q = rotate_pairs(q, angles)
        k = rotate_pairs(k, angles)
        return self._project_out(self._attend(q, k, v, segment_ids))

    def cached(self, x, angles, layer_cache: LayerKV, fill, row_start) -> tuple[jax.Array, LayerKV]:
        """T new tokens over a KV cache (generation), as the text models' `Attention.cached` but with 3D-RoPE
        angles [B, T, H/2]: keys and values go to slots fill .. fill+T-1 of every (left-padded) row."""
        q, k, v = self._project_qkv(x)
        q, k = rotate_pairs(q, angles), rotate_pairs(k, angles)
        keys = jax.lax.dynamic_update_slice_in_dim(layer_cache.keys, k.astype(layer_cache.keys.dtype), fill, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(
            layer_cache.values, v.astype(layer_cache.values.dtype), fill, axis=1
        )
        keys = sharding.shard(keys, "batch", "seq", "kv_heads", "head_dim")  # [B, S, K, H]
        values = sharding.shard(values, "batch", "seq", "kv_heads", "head_dim")
        return self._project_out(cached_attention(q, keys, values, fill, row_start)), LayerKV(keys, values)


class VLDecoderLayer(nnx.Module):
    """Pre-norm block: h += Attn(norm(h)); h += FFN(norm(h)), the FFN dense SwiGLU or the two-pool MoE."""

    def __init__(self, cfg: VLTextConfig, kind: MlpKind, options: ModelOptions, *, dtype, param_dtype, stack=(),
                 rngs=None):  # fmt: skip
        text = cfg.as_ernie_config()
        common = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        self.kind = kind
        self.input_norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack, rngs=rngs)
        self.attn = MRopeAttention(text, options=options, **common)
        self.post_attn_norm = RMSNorm(
            cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, stack=stack, rngs=rngs
        )
        if kind == "sparse":
            self.ffn = ModalityIsolatedMoE(cfg, options=options, **common)
        else:
            self.ffn = MLP(text, cfg.intermediate_size, use_bias=cfg.use_bias, **common)

    def __call__(self, h, angles, segment_ids, is_vision, token_mask):
        h = h + self.attn(self.input_norm(h), angles, segment_ids).astype(h.dtype)  # [B, T, D]
        normed = self.post_attn_norm(h)
        if self.kind == "sparse":
            y, stats = self.ffn(normed, is_vision, token_mask)
        else:
            y, stats = self.ffn(normed), None
        return h + y.astype(h.dtype), stats

    def cached(self, h, angles, layer_cache: LayerKV, fill, row_start, is_vision) -> tuple[jax.Array, LayerKV]:
        """The same block over new tokens with a KV cache (generation); MoE layers stay dropless."""
        attn_out, layer_cache = self.attn.cached(self.input_norm(h), angles, layer_cache, fill, row_start)
        h = h + attn_out.astype(h.dtype)  # [B, T, D]
        normed = self.post_attn_norm(h)
        y = self.ffn(normed, is_vision, None)[0] if self.kind == "sparse" else self.ffn(normed)
        return h + y.astype(h.dtype), layer_cache


class PoolSite:
    """One expert pool seen as a layer position of its group (`.ffn` is the pool, holding its correction bias)."""

    def __init__(self, pool):
        self.ffn = pool


class DecoderGroup(nnx.Module):
    """`repeats` consecutive layers of one kind, parameters stacked on a leading axis, run with lax.scan."""

    def __init__(self, cfg: VLTextConfig, kind: MlpKind, repeats: int, options: ModelOptions, *, dtype, param_dtype,
                 rngs=None):  # fmt: skip
        self.kind = kind
        self.options = options
        self.layer = VLDecoderLayer(
            cfg, kind, options, dtype=dtype, param_dtype=param_dtype, stack=(repeats,), rngs=rngs
        )

    @property
    def layers(self) -> tuple:
        """Where this group's correction biases sit, in the order of its router statistics ((None,) dense,
        (text, vision) MoE): each entry's `.ffn.correction_bias` [R, E] is the bias its statistics update. That is
        the nesting `ernie_jax.moe.update_correction_biases` walks, so the trainer's aux-free update reaches both
        pools without reading state paths."""
        if self.kind != "sparse":
            return (self.layer,)
        moe = self.layer.ffn
        return (PoolSite(moe.text), PoolSite(moe.vision))

    def __call__(self, h, angles, segment_ids, is_vision, token_mask):
        """Returns h and, for MoE groups, the (text, vision) RouterStats stacked over the group's layers [R]."""
        graphdef, state = nnx.split(self.layer)

        def body(carry, layer_state):
            carry, stats = nnx.merge(graphdef, layer_state)(carry, angles, segment_ids, is_vision, token_mask)
            return sharding.shard(carry, "batch", "seq", "act_embed"), stats

        if self.options.remat != "none":
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.options.remat], prevent_cse=False)
        return jax.lax.scan(body, h, state, unroll=not self.options.scan_layers)

    def cached(self, h, angles, group_cache: LayerKV, fill, row_start, is_vision) -> tuple[jax.Array, LayerKV]:
        """Scan the layers with their caches (stacked [R, B, S, K, H]) as inputs and the updated caches as outputs."""
        graphdef, state = nnx.split(self.layer)

        def body(carry, layer_inputs):
            layer_state, layer_cache = layer_inputs
            carry, layer_cache = nnx.merge(graphdef, layer_state).cached(
                carry, angles, layer_cache, fill, row_start, is_vision
            )
            return sharding.shard(carry, "batch", "seq", "act_embed"), layer_cache

        return jax.lax.scan(body, h, (state, group_cache), unroll=not self.options.scan_layers)
