"""LoRA adapters: low-rank updates W + s * A @ B on attention, dense MLP, shared-expert and routed-expert weights.

Adapters are attached to a built model (`add_adapters`), so a released checkpoint loads unchanged and the adapters
are added on top. Their parameters are `LoRAParam` variables (a subclass of `nnx.Param`), so filters select them:
`nnx.state(model, LoRAParam)` is exactly what LoRA training optimises. B starts at zero, so step 0 is the base model.

For a weight of shape [*in, *out] (e.g. wq [D, N, H]: in = (D,), out = (N, H); wo [N, H, D]: in = (N, H)),
A is [*in, r] and B is [r, *out]; routed experts carry a leading expert axis, A [E, D, r] and B [E, r, F]. A model
scanned in layer groups stacks its adapters on the same leading [R] axis as the weights they adapt.

Attention, dense MLP and shared experts apply the adapter unmerged: y = x W + s (x A) B. Routed experts fold it into
the expert weights before the grouped matmul, W_e + s A_e B_e, which is the same product per expert and lets the
dropless, Pallas and expert-parallel paths (sharding/) run unchanged; its cost is one [E, D, F] temporary per
adapted expert weight per layer. Adapter dropout (`lora.dropout`, training only) drops elements of the unmerged
adapters' input x; the folded expert adapters have no such input, so dropout with `experts` targeted is refused.
The train step derives the dropout keys from the run's seed and the step number, so a resumed run draws the same
masks as an uninterrupted one.

The adapter of a weight attribute `w` lives in the attribute `w_lora` of the same module (None when absent).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from ernie_jax import quant
from ernie_jax.config import ConfigError
from ernie_jax.quant import QuantizedWeight, weight_dtype, weight_value

ATTENTION_TARGETS = {"q_proj": "wq", "k_proj": "wk", "v_proj": "wv", "o_proj": "wo"}
MLP_TARGETS = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
EXPERT_TARGETS = {"gate_proj": "w_gate", "up_proj": "w_up", "down_proj": "w_down"}
ALL_TARGETS = (*ATTENTION_TARGETS, *MLP_TARGETS, "experts")
ADAPTER_SUFFIX = "_lora"
BASE_DTYPES = ("param", "bfloat16", "int8", "nf4")


class LoRAParam(nnx.Param):
    """A LoRA adapter matrix (A or B): the only parameters a LoRA run trains."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """LoRA on the weights named by `targets` (ERNIEKit's defaults: rank 8, alpha 2 * rank, every projection).

    targets: q_proj, k_proj, v_proj, o_proj (attention); gate_proj, up_proj, down_proj (dense MLPs and shared
    experts); experts (also adapt the routed experts' gate/up/down projections named in targets).
    """

    rank: int = 0  # 0 disables LoRA (full fine-tuning)
    alpha: float | None = None  # None: 2 * rank
    targets: tuple[str, ...] = ALL_TARGETS
    dropout: float = 0.0  # dropout on each adapter's input x, in training only (PEFT's lora_dropout)
    rslora: bool = False  # scale alpha / sqrt(rank) instead of alpha / rank
    # The frozen base's decoder matmul weights: "param" as loaded (fp32 master weights), "bfloat16", or quantized
    # (ernie_jax.quant) "int8" / "nf4": QLoRA. Router, norms, embeddings and the LM head stay as loaded.
    base_dtype: Literal["param", "bfloat16", "int8", "nf4"] = "param"

    def __post_init__(self):
        if self.rank < 0:
            raise ConfigError(f"lora.rank: must be >= 0 (0 disables LoRA), got {self.rank}")
        unknown = sorted(set(self.targets) - set(ALL_TARGETS))
        if unknown:
            raise ConfigError(f"lora.targets: unknown {unknown}; choose from {', '.join(ALL_TARGETS)}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora.dropout: must be in [0, 1), got {self.dropout}")
        if self.base_dtype not in BASE_DTYPES:
            raise ConfigError(f"lora.base_dtype: one of {', '.join(BASE_DTYPES)}, got {self.base_dtype!r}")
        if self.base_dtype != "param" and not self.enabled:
            raise ConfigError(
                f"lora.base_dtype={self.base_dtype}: a frozen base needs adapters to train; set lora.rank > 0"
            )

    @property
    def enabled(self) -> bool:
        return self.rank > 0

    @property
    def resolved_alpha(self) -> float:
        return float(2 * self.rank if self.alpha is None else self.alpha)

    @property
    def scale(self) -> float:
        """The factor s of W + s * A @ B: alpha / rank, or alpha / sqrt(rank) with rsLoRA."""
        return self.resolved_alpha / (math.sqrt(self.rank) if self.rslora else self.rank)


class LoRAAdapter(nnx.Module):
    """A [*lead, *in, r] and B [*lead, r, *out] for one weight [*lead, *in, *out] (lead: the expert axis, if any)."""

    def __init__(
        self,
        weight: nnx.Param | QuantizedWeight,
        *,
        stack_ndim: int,
        lead_ndim: int,
        in_ndim: int,
        cfg: LoRAConfig,
        key,
    ):
        axes = weight.logical_axes if isinstance(weight, QuantizedWeight) else weight.get_metadata()["logical_axes"]
        shape = weight.shape
        split_in, split_out = stack_ndim + lead_ndim, stack_ndim + lead_ndim + in_ndim
        lead_shape, in_shape, out_shape = shape[:split_in], shape[split_in:split_out], shape[split_out:]
        lead_axes, in_axes, out_axes = axes[:split_in], axes[split_in:split_out], axes[split_out:]
        fan_in = math.prod(in_shape)
        # PEFT's default init of A (kaiming-uniform with a = sqrt(5)): U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
        bound = 1.0 / math.sqrt(fan_in)
        a = jax.random.uniform(key, (*lead_shape, *in_shape, cfg.rank), jnp.float32, -bound, bound)
        self.a = LoRAParam(a, logical_axes=(*lead_axes, *in_axes, None), weight_decay=True)
        b = jnp.zeros((*lead_shape, cfg.rank, *out_shape), jnp.float32)  # zero: the adapted model starts as the base
        self.b = LoRAParam(b, logical_axes=(*lead_axes, None, *out_axes), weight_decay=True)
        self.in_ndim = in_ndim
        self.scale = cfg.scale
        self.dropout = cfg.dropout

    def __call__(self, x: jax.Array, dropout_key: jax.Array | None = None) -> jax.Array:
        """s * (dropout(x) A) B for x [..., *in] -> [..., *out], in x's dtype (unstacked adapter, no lead axis).

        dropout_key: None (evaluation, generation) applies no dropout; a key drops each input element with
        probability `dropout` and scales the kept ones by 1 / (1 - dropout), as PEFT's lora_dropout does."""
        if dropout_key is not None and self.dropout:
            keep = jax.random.bernoulli(dropout_key, 1.0 - self.dropout, x.shape)
            x = jnp.where(keep, x / jnp.asarray(1.0 - self.dropout, x.dtype), jnp.zeros((), x.dtype))
        low = jnp.tensordot(x, self.a[...].astype(x.dtype), axes=self.in_ndim)  # [..., r]
        return jnp.tensordot(low, self.b[...].astype(x.dtype), axes=1) * jnp.asarray(self.scale, x.dtype)

    def delta(self) -> jax.Array:
        """s * A @ B [*batch, *in, *out] in fp32, batched over every leading axis (stack and experts)."""
        a, b = self.a[...].astype(jnp.float32), self.b[...].astype(jnp.float32)
        product = lambda a_, b_: jnp.tensordot(a_, b_, axes=1)  # [*in, r] x [r, *out] -> [*in, *out]
        for _ in range(a.ndim - self.in_ndim - 1):
            product = jax.vmap(product)
        return self.scale * product(a, b)


def adapted(weight: nnx.Param | QuantizedWeight, adapter: LoRAAdapter | None, dtype=None) -> jax.Array:
    """The weight's value with its adapter folded in (W + s * A @ B, fp32 sum), or the weight alone, in `dtype`
    (default: the weight's own). A quantized base (QLoRA) is dequantised here, one layer's slice at a time."""
    dtype = weight_dtype(weight) if dtype is None else dtype
    if adapter is None:
        return weight_value(weight, dtype)
    return (weight_value(weight, jnp.float32) + adapter.delta()).astype(dtype)


def dropout_keys(key: jax.Array | None, count: int) -> list[jax.Array | None]:
    """`count` independent keys from `key` (one per adapter of a module), or Nones when there is no key."""
    return [None if key is None else jax.random.fold_in(key, i) for i in range(count)]


def _targets(model, cfg: LoRAConfig):
    """(module, weight attribute, stack ndim, lead ndim, in ndim) for every weight `cfg.targets` selects."""
    from ernie_jax.layers import MLP, Attention
    from ernie_jax.moe import MoEBlock

    out = []
    for group in model.groups:
        for layer in group.layers:
            for _, module in nnx.iter_modules(layer):
                if isinstance(module, Attention):
                    for target, name in ATTENTION_TARGETS.items():
                        if target in cfg.targets:
                            out.append((module, name, 1, 0, 2 if name == "wo" else 1))
                elif isinstance(module, MLP):
                    out += [(module, name, 1, 0, 1) for t, name in MLP_TARGETS.items() if t in cfg.targets]
                elif isinstance(module, MoEBlock) and "experts" in cfg.targets:
                    out += [(module, name, 1, 1, 1) for t, name in EXPERT_TARGETS.items() if t in cfg.targets]
    return out


def add_adapters(model, cfg: LoRAConfig, *, seed: int = 0, mesh=None):
    """Attach fresh adapters (B = 0) to `model` in place, placed on `mesh` by their logical axes; returns model."""
    if not cfg.enabled:
        return model
    targets = _targets(model, cfg)
    if cfg.dropout and any(lead_ndim for _, _, _, lead_ndim, _ in targets):
        raise ConfigError(
            "lora.dropout: routed-expert adapters are folded into the expert weights, where dropout on a token's "
            "input has no equivalent (PEFT refuses lora_dropout on expert parameters too); set lora.dropout=0, or "
            "leave the experts out: lora.targets=" + ",".join(t for t in cfg.targets if t != "experts")
        )
    key = jax.random.key(seed)
    for i, (module, name, stack_ndim, lead_ndim, in_ndim) in enumerate(targets):
        adapter = LoRAAdapter(
            getattr(module, name),
            stack_ndim=stack_ndim,
            lead_ndim=lead_ndim,
            in_ndim=in_ndim,
            cfg=cfg,
            key=jax.random.fold_in(key, i),
        )
        setattr(module, name + ADAPTER_SUFFIX, nnx.data(adapter))
    if mesh is not None:
        nnx.update(model, sharding.shard_state(nnx.state(model, LoRAParam), mesh))
    return model


def adapters(model):
    """(module, weight attribute, adapter) for every adapter attached to `model`."""
    found = []
    for _, module in nnx.iter_modules(model):
        for attr, value in list(vars(module).items()):
            if attr.endswith(ADAPTER_SUFFIX) and isinstance(value, LoRAAdapter):
                found.append((module, attr[: -len(ADAPTER_SUFFIX)], value))
    return found


def merge_adapters(model):
    """A copy of `model` with every adapter folded into its weight (W + s * A @ B in fp32) and removed: the plain
    base architecture, which `save_pretrained` writes and transformers loads. A quantized base (QLoRA) comes back
    as Params in the dtype it was loaded in: dequantised, plus the adapters where there are some."""
    merged = nnx.clone(model)
    for module, name, adapter in adapters(merged):
        weight = getattr(module, name)
        if isinstance(weight, QuantizedWeight):
            setattr(module, name, weight.to_param(adapted(weight, adapter)))
        else:
            weight.set_value(adapted(weight, adapter))
        setattr(module, name + ADAPTER_SUFFIX, None)
    return quant.dequantize(merged)


def adapter_state(params: nnx.State) -> nnx.State:
    """The LoRA parameters of a model's parameter state."""
    return nnx.filter_state(params, LoRAParam)


def convert_base(model, cfg: LoRAConfig):
    """The frozen base's decoder matmul weights in `cfg.base_dtype`, in place (after `add_adapters`, before
    training): cast to bfloat16, or quantized for QLoRA (their QuantizedWeights are not Params, so nothing but the
    adapters can train). Weights on a mesh stay on it. Returns model."""
    if cfg.base_dtype == "bfloat16":
        return quant.cast_weights(model, jnp.bfloat16)
    if cfg.base_dtype in quant.QUANT_KINDS:
        return quant.quantize(model, cfg.base_dtype)
    return model
