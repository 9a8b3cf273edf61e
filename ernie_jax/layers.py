"""Building blocks of an ERNIE 4.5 decoder layer: RMSNorm, interleaved RoPE, GQA attention, SwiGLU MLP.

Weights are stored as [in, out] (y = x @ W). Every parameter carries `logical_axes` metadata; `sharding/`
maps those names to mesh axes. A module built with `stack=(R,)` holds R layers' parameters stacked on a
leading "layers" axis for `lax.scan`; its forward code sees one layer's slice.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
import sharding
from ernie_jax.config import ErnieConfig
from ernie_jax.lora import dropout_keys
from ernie_jax.options import ModelOptions
from ernie_jax.quant import weight_value

Initializer = Callable[[jax.Array, Sequence[int], jnp.dtype], jax.Array]


def make_param(
    rngs: nnx.Rngs | None,
    init: Initializer,
    shape: Sequence[int],
    logical_axes: Sequence[str],
    dtype: jnp.dtype,
    stack: Sequence[int] = (),
    *,
    weight_decay: bool | None = None,
    param_type: type[nnx.Param] = nnx.Param,
) -> nnx.Param:
    """A parameter of `shape` (plus leading `stack` dims) tagged with its logical axis names and its role.

    weight_decay: whether AdamW decays it (the optimizer reads this metadata, never the parameter's name);
    default: matrices and larger decay, vectors (norm scales, biases) do not. param_type: a subclass of
    nnx.Param naming a role that filters select (e.g. `ernie_jax.moe.RouterWeight`).
    """
    full_shape = (*stack, *shape)
    full_axes = ("layers",) * len(stack) + tuple(logical_axes)
    assert len(full_shape) == len(full_axes), (full_shape, full_axes)
    key = rngs.params() if rngs is not None else jax.random.key(0)
    decay = len(shape) >= 2 if weight_decay is None else weight_decay
    return param_type(init(key, full_shape, dtype), logical_axes=full_axes, weight_decay=decay)


def normal_init(std: float) -> Initializer:
    return jax.nn.initializers.normal(stddev=std)


zeros_init: Initializer = jax.nn.initializers.zeros
ones_init: Initializer = jax.nn.initializers.ones


class RMSNorm(nnx.Module):
    """x * rsqrt(mean(x^2) + eps) in fp32, cast back to the input dtype, then scaled (as transformers does)."""

    def __init__(self, dim: int, eps: float, *, param_dtype, stack=(), rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = make_param(rngs, ones_init, (dim,), ("norm",), param_dtype, stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        weight = self.weight[...]
        return weight.astype(jnp.promote_types(weight.dtype, x.dtype)) * normed.astype(x.dtype)


def rope_inv_freq(head_dim: int, theta: float) -> jax.Array:
    """inv_freq[i] = theta^(-2i/H), i < H/2, in fp32."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(theta) ** exponents)


def apply_interleaved_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """Rotate pairs (2i, 2i+1) by positions * inv_freq[i] (ERNIE's GLM-style RoPE), computed in fp32.

    Args:
      x: [B, T, N, H] queries or keys, raw released weight order (no q/k permutation).
      positions: [B, T] integer positions.
    """
    angles = positions.astype(jnp.float32)[..., None] * rope_inv_freq(x.shape[-1], theta)  # [B, T, H/2]
    return rotate_pairs(x, angles)


def rotate_pairs(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate pairs (2i, 2i+1) of x [B, T, N, H] by angles [B, T, H/2], in fp32, back in x's dtype."""
    b, t, n, h = x.shape
    cos = jnp.cos(angles)[:, :, None, :]  # [B, T, 1, H/2]
    sin = jnp.sin(angles)[:, :, None, :]
    pairs = x.astype(jnp.float32).reshape(b, t, n, h // 2, 2)
    even, odd = pairs[..., 0], pairs[..., 1]
    rotated = jnp.stack([even * cos - odd * sin, odd * cos + even * sin], axis=-1)
    return rotated.reshape(b, t, n, h).astype(x.dtype)


def attention_kernel(
    q: jax.Array, k: jax.Array, v: jax.Array, segment_ids: jax.Array | None, options: ModelOptions, *, causal=True
) -> jax.Array:
    """The attention kernel the run options pick (pallas_kernels.flash_attention); per shard when a mesh is active,
    because XLA cannot partition a Pallas call. q [B, T, N, H], k/v [B, S, K, H], segment_ids [B, T] -> [B, T, N, H].
    """
    attend = lambda q_, k_, v_, seg: pallas_kernels.flash_attention(
        q_,
        k_,
        v_,
        causal=causal,
        segment_ids=seg,
        implementation=options.attention_impl,
        platform=options.platform,
    )
    ctx = sharding.active()
    if ctx is not None and ctx.mesh.size > 1:
        return sharding.sharded_attention(attend, q, k, v, segment_ids, ctx)
    return attend(q, k, v, segment_ids)


class Attention(nnx.Module):
    """Causal grouped-query self-attention; K/V heads are never repeated in memory."""

    def __init__(
        self,
        cfg: ErnieConfig,
        *,
        dtype,
        param_dtype,
        stack=(),
        rngs: nnx.Rngs | None = None,
        options: ModelOptions = ModelOptions(),
    ):
        d, n, kv, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
        init = normal_init(cfg.initializer_range)
        self.dtype = dtype
        self.rope_theta = cfg.rope_theta
        self.options = options
        self.wq = make_param(rngs, init, (d, n, h), ("embed", "q_heads", "head_dim"), param_dtype, stack)
        self.wk = make_param(rngs, init, (d, kv, h), ("embed", "kv_heads", "head_dim"), param_dtype, stack)
        self.wv = make_param(rngs, init, (d, kv, h), ("embed", "kv_heads", "head_dim"), param_dtype, stack)
        self.wo = make_param(rngs, init, (n, h, d), ("q_heads", "head_dim", "embed"), param_dtype, stack)
        # LoRA adapters (ernie_jax.lora.add_adapters attaches them); None: the plain projection.
        self.wq_lora = self.wk_lora = self.wv_lora = self.wo_lora = None
        self.use_bias = cfg.use_bias
        if cfg.use_bias:
            no_decay = dict(weight_decay=False)  # biases, though stored per head as [N, H]
            self.bq = make_param(rngs, zeros_init, (n, h), ("q_heads", "head_dim"), param_dtype, stack, **no_decay)
            self.bk = make_param(rngs, zeros_init, (kv, h), ("kv_heads", "head_dim"), param_dtype, stack, **no_decay)
            self.bv = make_param(rngs, zeros_init, (kv, h), ("kv_heads", "head_dim"), param_dtype, stack, **no_decay)
            self.bo = make_param(rngs, zeros_init, (d,), ("embed",), param_dtype, stack)

    def _project_qkv(self, x: jax.Array, dropout_key=None) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Queries [B, T, N, H] and keys, values [B, T, K, H], before any rotary embedding.

        dropout_key: the LoRA adapters' dropout key in training (None: no dropout)."""
        x = x.astype(self.dtype)  # [B, T, D]
        q = jnp.einsum("BTD,DNH->BTNH", x, weight_value(self.wq, self.dtype))
        k = jnp.einsum("BTD,DKH->BTKH", x, weight_value(self.wk, self.dtype))
        v = jnp.einsum("BTD,DKH->BTKH", x, weight_value(self.wv, self.dtype))
        adapters = (self.wq_lora, self.wk_lora, self.wv_lora)
        q, k, v = (
            y if adapter is None else y + adapter(x, key)  # [B, T, N or K, H]
            for y, adapter, key in zip((q, k, v), adapters, dropout_keys(dropout_key, 3), strict=True)
        )
        if self.use_bias:
            q = q + self.bq[...].astype(self.dtype)
            k = k + self.bk[...].astype(self.dtype)
            v = v + self.bv[...].astype(self.dtype)
        return q, k, v

    def _rotated_qkv(self, x: jax.Array, positions: jax.Array, dropout_key=None) -> tuple[jax.Array, ...]:
        """`_project_qkv` with ERNIE's interleaved RoPE applied to queries and keys at `positions` [B, T]."""
        q, k, v = self._project_qkv(x, dropout_key)
        q = apply_interleaved_rope(q, positions, self.rope_theta)
        k = apply_interleaved_rope(k, positions, self.rope_theta)
        return q, k, v

    def _attend(self, q, k, v, segment_ids: jax.Array | None) -> jax.Array:
        return attention_kernel(q, k, v, segment_ids, self.options)

    def _project_out(self, out: jax.Array, dropout_key=None) -> jax.Array:
        out = out.astype(self.dtype)  # [B, T, N, H]
        y = jnp.einsum("BTNH,NHD->BTD", out, weight_value(self.wo, self.dtype))
        if self.wo_lora is not None:
            y = y + self.wo_lora(out, dropout_key)
        if self.use_bias:
            y = y + self.bo[...].astype(self.dtype)
        return y

    def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array | None, dropout_key=None):
        """x [B, T, D] -> [B, T, D]; dropout_key: the LoRA adapters' dropout key in training (None: none)."""
        in_key, out_key = dropout_keys(dropout_key, 2)
        q, k, v = self._rotated_qkv(x, positions, in_key)
        return self._project_out(self._attend(q, k, v, segment_ids), out_key)

    def cached(
        self,
        x: jax.Array,
        positions: jax.Array,
        layer_cache: LayerKV,
        fill: jax.Array,
        row_start: jax.Array,
        slot_ok: jax.Array | None = None,
    ) -> tuple[jax.Array, LayerKV]:
        """Attention of T new tokens over a KV cache, for generation (prefill: T = prompt, decode: T = 1).

        The new keys and values are written at cache slots fill .. fill+T-1 (the same slots in every row: rows
        are left-padded), then the queries attend to every filled slot of their row up to their own.

        Args:
          x: [B, T, D] new tokens' hidden states; positions: [B, T] their RoPE positions.
          layer_cache: this layer's keys and values, each [B, S, K, H].
          fill: [] int32, slots already filled.
          row_start: [B] int32, each row's first real slot (its left padding is never attended to).
          slot_ok: [B, S] bool or None: slots a row may read at all (speculative decoding leaves rejected drafts'
            slots behind as holes).
        """
        q, k, v = self._rotated_qkv(x, positions)
        keys = jax.lax.dynamic_update_slice_in_dim(layer_cache.keys, k.astype(layer_cache.keys.dtype), fill, axis=1)
        values = jax.lax.dynamic_update_slice_in_dim(
            layer_cache.values, v.astype(layer_cache.values.dtype), fill, axis=1
        )
        keys = sharding.shard(keys, "batch", "seq", "kv_heads", "head_dim")  # [B, S, K, H]
        values = sharding.shard(values, "batch", "seq", "kv_heads", "head_dim")
        out = cached_attention(q, keys, values, fill, row_start, slot_ok)
        return self._project_out(out), LayerKV(keys, values)


class LayerKV(NamedTuple):
    """One attention layer's cache (or a layer group's, stacked [R, ...] for the scan): keys, values [B, S, K, H].

    K/V heads are stored once (K of them), not repeated to the N query heads.
    """

    keys: jax.Array
    values: jax.Array


def cached_attention(
    q: jax.Array,
    keys: jax.Array,
    values: jax.Array,
    fill: jax.Array,
    row_start: jax.Array,
    slot_ok: jax.Array | None = None,
):
    """Causal GQA attention of queries at slots fill .. fill+T-1 over cache slots [row_start, query slot].

    q [B, T, N, H]; keys, values [B, S, K, H]; fill [] int32; row_start [B] int32; slot_ok [B, S] bool or None
    (slots a row may read; None: all) -> [B, T, N, H] in q's dtype.
    Logits and softmax in fp32, as the training kernels do. A query with no visible slot (a padding position in
    prefill) gets a uniform average rather than NaN: its output is never read.
    """
    b, t, n, h = q.shape
    s, kv = keys.shape[1], keys.shape[2]
    grouped = q.reshape(b, t, kv, n // kv, h)  # [B, T, K, G, H]
    logits = jnp.einsum("BTKGH,BSKH->BKGTS", grouped, keys, preferred_element_type=jnp.float32) * h**-0.5
    query_slot = fill + jnp.arange(t)  # [T]
    slot = jnp.arange(s)  # [S]
    visible = (slot[None, None, :] <= query_slot[None, :, None]) & (slot[None, None, :] >= row_start[:, None, None])
    if slot_ok is not None:
        visible = visible & slot_ok[:, None, :]  # [B, T, S]
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)  # [B, K, G, T, S]
    probs = jax.nn.softmax(logits, axis=-1).astype(values.dtype)
    out = jnp.einsum("BKGTS,BSKH->BTKGH", probs, values, preferred_element_type=jnp.float32)
    return out.reshape(b, t, n, h).astype(q.dtype)


class MLP(nnx.Module):
    """SwiGLU: down(silu(x @ gate) * (x @ up)). Used for dense layers and for the MoE shared experts."""

    def __init__(
        self,
        cfg: ErnieConfig,
        width: int,
        *,
        use_bias: bool,
        dtype,
        param_dtype,
        stack=(),
        rngs: nnx.Rngs | None = None,
        axis: str = "mlp",
    ):
        d = cfg.hidden_size
        init = normal_init(cfg.initializer_range)
        self.dtype = dtype
        self.use_bias = use_bias
        self.gate = make_param(rngs, init, (d, width), ("embed", axis), param_dtype, stack)
        self.up = make_param(rngs, init, (d, width), ("embed", axis), param_dtype, stack)
        self.down = make_param(rngs, init, (width, d), (axis, "embed"), param_dtype, stack)
        self.gate_lora = self.up_lora = self.down_lora = None  # LoRA adapters, attached by ernie_jax.lora
        if use_bias:
            self.gate_bias = make_param(rngs, zeros_init, (width,), (axis,), param_dtype, stack)
            self.up_bias = make_param(rngs, zeros_init, (width,), (axis,), param_dtype, stack)
            self.down_bias = make_param(rngs, zeros_init, (d,), ("embed",), param_dtype, stack)

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """x [..., D] -> [..., D]; dropout_key: the LoRA adapters' dropout key in training (None: none)."""
        gate_key, up_key, down_key = dropout_keys(dropout_key, 3)
        lead = x.shape[:-1]
        # One row axis: with [B, T, D] rows, XLA:CPU computed the weight gradients from transposed copies of the
        # [B, T, F] gradients (a slow 3-D transpose per step); with [N, D] rows the dots read them in place.
        x = x.reshape(-1, x.shape[-1]).astype(self.dtype)  # [N, D]
        gate = jnp.einsum("...D,DF->...F", x, weight_value(self.gate, self.dtype))
        up = jnp.einsum("...D,DF->...F", x, weight_value(self.up, self.dtype))
        if self.gate_lora is not None:
            gate = gate + self.gate_lora(x, gate_key)
        if self.up_lora is not None:
            up = up + self.up_lora(x, up_key)
        if self.use_bias:
            gate = gate + self.gate_bias[...].astype(self.dtype)
            up = up + self.up_bias[...].astype(self.dtype)
        hidden = jax.nn.silu(gate) * up  # [N, F]
        y = jnp.einsum("...F,FD->...D", hidden, weight_value(self.down, self.dtype))
        if self.down_lora is not None:
            y = y + self.down_lora(hidden, down_key)
        if self.use_bias:
            y = y + self.down_bias[...].astype(self.dtype)
        return y.reshape(*lead, y.shape[-1])  # [..., D]
