"""Weight-only quantization: int8 for inference, int8 or NF4 for the frozen base of QLoRA.

A quantized weight replaces an `nnx.Param` by a `QuantizedWeight` module holding two variables, `QuantCodes` and
`QuantScales` (both `QuantizedVariable`, not `nnx.Param`: the optimizer never sees them, and filters select them by
type). Each carries `logical_axes` metadata, so `sharding.state_shardings` places the codes exactly like the weight
they replace. Layers read a weight through `weight_value(w, dtype)`, which dequantises inside the matmul that uses
it (per layer inside the layer scan, so a whole bf16 stack never exists at once).

A weight is [*stack, *lead, *in, *out] (stack: the scan's "layers" axis; lead: the expert axis; in: the contracted
axes; out: the output channels), as `ernie_jax.lora` describes its adapters.

- int8: symmetric, one fp32 scale per output channel (per expert): scale = max |W| over the `in` axes / 127,
  codes = round(W / scale) in [-127, 127]. Scales keep the `in` axes as size-1 dims (logical axis None), so
  dequantisation is codes * scales by broadcasting.
- nf4 (QLoRA's NormalFloat4): blocks of NF4_BLOCK values along the last `in` axis (the one next to the output
  channels) share an fp32 absmax scale; each value is the index of the nearest of 16 NF4 levels of W / absmax.
  Two indices are packed per byte (even element in the low nibble), along that same axis: without packing NF4
  would take a byte per value, as much as int8 and twice its error, and its only point is half int8's memory.
  The scales' block axis is replicated (logical axis None): a block count need not divide the FSDP axis. QLoRA's
  double quantization of the scales is not done (fp32 scales cost 1/16 byte per value).

What stays unquantized: the router weight and correction bias (fp32, so top-k selections match the full model
exactly; they are tiny), norms and biases (vectors), embeddings and the LM head (one lookup and one matmul whose
logits' error every token would see; `quantize` targets the decoder's matmuls, where the bytes are).
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding

QuantKind = Literal["int8", "nf4"]
QUANT_KINDS = ("int8", "nf4")
NF4_BLOCK = 64

# The 16 NormalFloat4 levels (QLoRA, Dettmers et al. 2023, appendix E; bitsandbytes' table): quantiles of N(0, 1)
# scaled to [-1, 1], with an exact zero.
NF4_LEVELS = np.array(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    np.float32,
)


class QuantizedVariable(nnx.Variable):
    """Frozen quantized storage (codes or scales). Not an nnx.Param: never differentiated or optimised."""


class QuantCodes(QuantizedVariable):
    """int8 codes, or NF4 indices packed two per uint8."""


class QuantScales(QuantizedVariable):
    """fp32 scales: per output channel (int8) or per block (nf4)."""


# ---------------------------------------------------------------- the math: plain functions on arrays


def quantize_int8(w: jax.Array, in_axes: tuple[int, ...]) -> tuple[jax.Array, jax.Array]:
    """(codes int8 like w, scales fp32 with `in_axes` kept as size 1): W ~ codes * scales."""
    w32 = w.astype(jnp.float32)
    absmax = jnp.max(jnp.abs(w32), axis=in_axes, keepdims=True)
    scales = jnp.where(absmax > 0, absmax / 127.0, 1.0)  # an all-zero channel: any scale, codes are 0
    codes = jnp.clip(jnp.round(w32 / scales), -127, 127).astype(jnp.int8)
    return codes, scales


def dequantize_int8(codes: jax.Array, scales: jax.Array, dtype) -> jax.Array:
    """codes * scales in fp32, rounded once to `dtype` (scales broadcast over the contracted axes)."""
    return (codes.astype(jnp.float32) * scales).astype(dtype)


def nf4_block(size: int) -> int:
    """Block length along an axis of `size`: NF4_BLOCK, or the largest power of two dividing both (tiny test
    models); it must be even, since two values pack into a byte."""
    block = math.gcd(NF4_BLOCK, size)
    if block % 2:
        raise ValueError(f"nf4: the blocked axis has odd size {size}; two values pack into each byte")
    return block


def quantize_nf4(w: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    """(codes uint8 with `axis` halved, scales fp32 with `axis` divided by the block): blocks along `axis`."""
    axis = axis % w.ndim
    size = w.shape[axis]
    block = nf4_block(size)
    w32 = w.astype(jnp.float32)
    blocked = w32.reshape(*w.shape[:axis], size // block, block, *w.shape[axis + 1 :])  # [..., nb, block, ...]
    absmax = jnp.max(jnp.abs(blocked), axis=axis + 1)  # [..., nb, ...]
    scales = jnp.where(absmax > 0, absmax, 1.0)
    normed = (blocked / jnp.expand_dims(scales, axis + 1)).reshape(w.shape)  # in [-1, 1]
    midpoints = jnp.asarray((NF4_LEVELS[1:] + NF4_LEVELS[:-1]) / 2)  # [15]: nearest level by bisection
    index = jnp.searchsorted(midpoints, normed).astype(jnp.uint8)  # [..., size, ...] in 0..15
    pairs = index.reshape(*w.shape[:axis], size // 2, 2, *w.shape[axis + 1 :])
    even = jnp.take(pairs, 0, axis=axis + 1)
    odd = jnp.take(pairs, 1, axis=axis + 1)
    return (even | (odd << 4)).astype(jnp.uint8), scales


def dequantize_nf4(codes: jax.Array, scales: jax.Array, axis: int, dtype) -> jax.Array:
    """NF4_LEVELS[index] * block absmax in fp32, rounded once to `dtype`; `axis` is the blocked (packed) axis."""
    axis = axis % codes.ndim
    index = jnp.stack([codes & 0x0F, codes >> 4], axis=axis + 1)  # [..., size/2, 2, ...]
    shape = (*codes.shape[:axis], codes.shape[axis] * 2, *codes.shape[axis + 1 :])
    values = jnp.asarray(NF4_LEVELS)[index.astype(jnp.int32)].reshape(shape)  # [..., size, ...]
    nb = scales.shape[axis]
    blocked = values.reshape(*shape[:axis], nb, shape[axis] // nb, *shape[axis + 1 :])
    return (blocked * jnp.expand_dims(scales, axis + 1)).reshape(shape).astype(dtype)


# ---------------------------------------------------------------- the module a quantized weight becomes


class QuantizedWeight(nnx.Module):
    """A weight [*stack, *lead, *in, *out] stored quantized; `dequantize(dtype)` gives it back.

    Static: `kind`, `in_ndim`/`out_ndim` (counted from the end, so a scan's slice of a stacked weight is read the
    same way), and what the replaced Param was: its dtype, logical axes and weight-decay role (for `to_param`).
    """

    def __init__(self, weight: nnx.Param, kind: QuantKind, *, in_ndim: int, out_ndim: int):
        if kind not in QUANT_KINDS:
            raise ValueError(f"quantize: unknown kind {kind!r}; choose from {', '.join(QUANT_KINDS)}")
        value, meta = weight.get_value(), weight.get_metadata()
        axes = tuple(meta["logical_axes"])
        self.kind = kind
        self.in_ndim, self.out_ndim = in_ndim, out_ndim
        self.dtype = value.dtype
        self.logical_axes = axes
        self.weight_decay = meta.get("weight_decay", True)
        first_in = value.ndim - out_ndim - in_ndim
        if kind == "int8":
            codes, scales = quantize_int8(value, tuple(range(first_in, value.ndim - out_ndim)))
            scale_axes = tuple(None if first_in <= i < value.ndim - out_ndim else a for i, a in enumerate(axes))
        else:
            blocked = value.ndim - out_ndim - 1
            codes, scales = quantize_nf4(value, blocked)
            scale_axes = tuple(None if i == blocked else a for i, a in enumerate(axes))
        self.codes = QuantCodes(codes, logical_axes=axes)
        self.scales = QuantScales(scales, logical_axes=scale_axes)

    @property
    def shape(self) -> tuple[int, ...]:
        """The weight's shape (of the slice a scan body sees, inside one)."""
        shape = list(self.codes.shape)
        if self.kind == "nf4":
            shape[len(shape) - self.out_ndim - 1] *= 2
        return tuple(shape)

    def dequantize(self, dtype=None) -> jax.Array:
        """The weight in `dtype` (default: the replaced Param's dtype)."""
        dtype = self.dtype if dtype is None else dtype
        codes, scales = self.codes[...], self.scales[...]
        if self.kind == "int8":
            return dequantize_int8(codes, scales, dtype)
        return dequantize_nf4(codes, scales, codes.ndim - self.out_ndim - 1, dtype)

    def to_param(self, value: jax.Array | None = None) -> nnx.Param:
        """An nnx.Param with the replaced weight's metadata, holding `value` (default: the dequantised weight)."""
        value = self.dequantize() if value is None else value
        return nnx.Param(value, logical_axes=self.logical_axes, weight_decay=self.weight_decay)


def weight_value(weight, dtype) -> jax.Array:
    """A matmul weight's value in `dtype`: the Param's array, or a QuantizedWeight dequantised right here."""
    if isinstance(weight, QuantizedWeight):
        return weight.dequantize(dtype)
    return weight[...].astype(dtype)


def weight_dtype(weight):
    """The dtype the weight holds its values in (for a QuantizedWeight: the replaced Param's)."""
    return weight.dtype if isinstance(weight, QuantizedWeight) else weight.get_value().dtype


# ---------------------------------------------------------------- whole models


def matmul_weights(model: nnx.Module) -> list[tuple[nnx.Module, str, int, int]]:
    """(module, attribute, in ndim, out ndim) for every decoder matmul weight: attention projections, dense and
    shared-expert MLPs, routed experts. Not the router (fp32 for exact routing), norms, embeddings or LM head."""
    from ernie_jax.layers import MLP, Attention  # late: layers reads weights through this module
    from ernie_jax.moe import RoutedExperts

    shapes = {
        Attention: {"wq": (1, 2), "wk": (1, 2), "wv": (1, 2), "wo": (2, 1)},
        MLP: {"gate": (1, 1), "up": (1, 1), "down": (1, 1)},
        RoutedExperts: {"w_gate": (1, 1), "w_up": (1, 1), "w_down": (1, 1)},  # [*stack, E, in, out]
    }
    found = []
    for _, module in nnx.iter_modules(model):
        for cls, attrs in shapes.items():
            if isinstance(module, cls):
                found += [(module, name, i, o) for name, (i, o) in attrs.items()]
    return found


def _check_text_model(model, what: str) -> None:
    from ernie_jax.model import ErnieForCausalLM

    if not isinstance(model, ErnieForCausalLM):
        raise ValueError(
            f"{what}: quantized weights are supported for the text models only, not {type(model).__name__}"
        )


def _placed(var: nnx.Variable, mesh, rules) -> None:
    """Put a fresh variable on the sharding its logical axes give on `mesh` (no-op while tracing)."""
    value = var.get_value()
    if mesh is None or isinstance(value, jax.core.Tracer):
        return
    axes = var.get_metadata()["logical_axes"]
    var.set_value(jax.device_put(value, sharding.named_sharding(axes, mesh, rules, value.shape)))


def quantize(model: nnx.Module, kind: QuantKind = "int8", *, rules=None) -> nnx.Module:
    """Quantize `model`'s decoder matmul weights in place (int8 or nf4, see the module docstring); returns it.

    Weights already on a mesh stay there: codes and scales are placed by their logical axes. LoRA adapters, if
    attached, are untouched (QLoRA: frozen quantized base, trainable adapters).
    """
    _check_text_model(model, "quantize")
    if kind not in QUANT_KINDS:
        raise ValueError(f"quantize: unknown kind {kind!r}; choose from {', '.join(QUANT_KINDS)}")
    rules = sharding.DEFAULT_RULES if rules is None else rules
    for module, name, in_ndim, out_ndim in matmul_weights(model):
        weight = getattr(module, name)
        if isinstance(weight, QuantizedWeight):
            raise ValueError(f"quantize: {type(module).__name__}.{name} is already quantized ({weight.kind})")
        value = weight.get_value()
        mesh = getattr(getattr(value, "sharding", None), "mesh", None)
        mesh = mesh if isinstance(mesh, jax.sharding.Mesh) and mesh.size > 1 else None
        quantized = QuantizedWeight(weight, kind, in_ndim=in_ndim, out_ndim=out_ndim)
        _placed(quantized.codes, mesh, rules)
        _placed(quantized.scales, mesh, rules)
        setattr(module, name, quantized)  # the full-precision Param is dropped here, one weight at a time
    return model


def dequantize(model: nnx.Module) -> nnx.Module:
    """Every QuantizedWeight of `model` back to an nnx.Param in its original dtype, in place; returns model."""
    for module, name, _, _ in matmul_weights(model):
        weight = getattr(module, name)
        if isinstance(weight, QuantizedWeight):
            setattr(module, name, weight.to_param())
    return model


def cast_weights(model: nnx.Module, dtype) -> nnx.Module:
    """The decoder matmul weights (those `quantize` would take) cast to `dtype`, in place, shardings kept."""
    for module, name, _, _ in matmul_weights(model):
        weight = getattr(module, name)
        weight.set_value(weight.get_value().astype(dtype))
    return model


def nbytes(tree) -> int:
    """Bytes of every array (or ShapeDtypeStruct) in a pytree, e.g. `nnx.state(model)`."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
