"""ERNIE 4.5 text-model architecture: one frozen dataclass for the dense and MoE variants.

Field names follow the Hugging Face configs (`Ernie4_5Config`, `Ernie4_5_MoeConfig`) so that users can read
a released `config.json` next to this file. A model with `moe_num_experts == 0` is the dense `ernie4_5`.

Shape vocabulary used across the package (documented once, here):
    B batch, T query length, S key length, D hidden (embed), V vocab, N query heads, K key/value heads,
    G query heads per kv head (N // K), H head dim, F FFN width, E experts, k experts per token (moe_k),
    L layers, R layers stacked in one scanned group.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any, Literal

LayerKind = Literal["dense", "moe"]


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field and the fix."""


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"ErnieConfig.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class ErnieConfig:
    """Architecture of an ERNIE 4.5 text model (fields and meanings as in the released config.json)."""

    vocab_size: int = 103424
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads (as transformers does)
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    rms_norm_eps: float = 1e-5
    tie_word_embeddings: bool = True
    use_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    pad_token_id: int | None = 0
    bos_token_id: int | None = 1
    eos_token_id: int | None = 2
    # Mixture of experts. moe_num_experts == 0 means a dense model (every layer a SwiGLU MLP).
    moe_num_experts: int = 0
    moe_k: int = 6
    moe_intermediate_size: int = 1536
    moe_num_shared_experts: int = 0
    moe_layer_start_index: int = 1
    moe_layer_end_index: int = -1  # -1: the last layer
    moe_layer_interval: int = 1
    moe_norm_min: float = 1e-12
    # Multi-token-prediction depths (ernie_jax.model.MTPLayer): depth d predicts the token d + 2 ahead. Released
    # -PT checkpoints carry one; 0 builds no MTP head (and a checkpoint's MTP tensors are skipped with a log line).
    num_nextn_predict_layers: int = 0

    def __post_init__(self) -> None:
        for name in (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_hidden_layers",
            "num_attention_heads",
            "num_key_value_heads",
            "max_position_embeddings",
        ):
            _require(getattr(self, name) > 0, name, f"must be positive, got {getattr(self, name)}")
        _require(
            self.num_attention_heads % self.num_key_value_heads == 0,
            "num_key_value_heads",
            f"{self.num_key_value_heads} must divide num_attention_heads={self.num_attention_heads} (GQA groups)",
        )
        if self.head_dim is None:
            _require(
                self.hidden_size % self.num_attention_heads == 0,
                "head_dim",
                f"is None but hidden_size={self.hidden_size} is not divisible by num_attention_heads="
                f"{self.num_attention_heads}; set head_dim explicitly",
            )
        _require(
            self.resolved_head_dim % 2 == 0,
            "head_dim",
            f"must be even for RoPE, got {self.resolved_head_dim}",
        )
        _require(self.rope_theta > 0, "rope_theta", f"must be positive, got {self.rope_theta}")
        _require(self.rms_norm_eps > 0, "rms_norm_eps", f"must be positive, got {self.rms_norm_eps}")
        _require(
            self.hidden_act == "silu",
            "hidden_act",
            f"only 'silu' (SwiGLU) is used by ERNIE 4.5, got {self.hidden_act!r}",
        )
        _require(self.moe_num_experts >= 0, "moe_num_experts", "must be >= 0 (0 = dense model)")
        _require(self.num_nextn_predict_layers >= 0, "num_nextn_predict_layers", "must be >= 0")
        _require(
            all(self.layer_kind(d) == "dense" for d in range(self.num_nextn_predict_layers)),
            "num_nextn_predict_layers",
            "an MTP block is built like decoder layer d, which is an MoE layer when moe_layer_start_index is 0; "
            "MoE MTP blocks are not supported (the released models have dense ones)",
        )
        if self.is_moe:
            _require(
                1 <= self.moe_k <= self.moe_num_experts,
                "moe_k",
                f"must be in [1, moe_num_experts={self.moe_num_experts}], got {self.moe_k}",
            )
            _require(self.moe_intermediate_size > 0, "moe_intermediate_size", "must be positive")
            _require(self.moe_num_shared_experts >= 0, "moe_num_shared_experts", "must be >= 0")
            _require(self.moe_layer_interval >= 1, "moe_layer_interval", "must be >= 1")
            last = self.num_hidden_layers - 1
            _require(
                0 <= self.moe_layer_start_index <= last,
                "moe_layer_start_index",
                f"must be a layer index in [0, {last}], got {self.moe_layer_start_index}",
            )
            _require(
                self.moe_layer_end_index == -1 or self.moe_layer_start_index <= self.moe_layer_end_index <= last,
                "moe_layer_end_index",
                f"must be -1 or in [moe_layer_start_index={self.moe_layer_start_index}, {last}], "
                f"got {self.moe_layer_end_index}",
            )
            _require(self.moe_norm_min > 0, "moe_norm_min", "must be positive")

    # ----------------------------------------------------------------------------------------------------------
    # Derived facts
    @property
    def is_moe(self) -> bool:
        return self.moe_num_experts > 0

    @property
    def model_type(self) -> str:
        return "ernie4_5_moe" if self.is_moe else "ernie4_5"

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def resolved_moe_layer_end_index(self) -> int:
        return self.num_hidden_layers - 1 if self.moe_layer_end_index == -1 else self.moe_layer_end_index

    @property
    def lm_head_has_bias(self) -> bool:
        # transformers gives the MoE lm_head a bias when use_bias (even when tied); the dense one never has one.
        return self.is_moe and self.use_bias

    @property
    def shared_expert_size(self) -> int:
        return self.moe_intermediate_size * self.moe_num_shared_experts

    def layer_kind(self, layer: int) -> LayerKind:
        """The MoE-layer rule of transformers and Paddle: (l+1) % interval == 0 and start <= l <= end."""
        if not self.is_moe:
            return "dense"
        in_range = self.moe_layer_start_index <= layer <= self.resolved_moe_layer_end_index
        return "moe" if in_range and (layer + 1) % self.moe_layer_interval == 0 else "dense"

    @property
    def layer_kinds(self) -> tuple[LayerKind, ...]:
        return tuple(self.layer_kind(i) for i in range(self.num_hidden_layers))

    @property
    def layer_groups(self) -> tuple[tuple[tuple[LayerKind, ...], int], ...]:
        """Split the layers into scanned groups: ((pattern, repeats), ...), layer order preserved.

        21B-A3B gives ((dense,), 1), ((moe,), 27); MoE every second layer gives ((dense, moe), L/2). Each group
        compiles once however many times it repeats, so depth costs no compile time.
        """
        kinds = self.layer_kinds
        periods = sorted({1, self.moe_layer_interval if self.is_moe else 1})
        groups: list[tuple[tuple[LayerKind, ...], int]] = []
        i = 0
        while i < len(kinds):
            best: tuple[int, tuple[LayerKind, ...], int] | None = None  # (covered, pattern, repeats)
            for p in periods:
                pattern = kinds[i : i + p]
                if len(pattern) < p:
                    continue
                repeats = 1
                while kinds[i + repeats * p : i + (repeats + 1) * p] == pattern:
                    repeats += 1
                if best is None or repeats * p > best[0]:
                    best = (repeats * p, pattern, repeats)
            assert best is not None
            groups.append((best[1], best[2]))
            i += best[0]
        return tuple(groups)

    def group_layer_indices(self) -> tuple[tuple[tuple[int, ...], ...], ...]:
        """For each group, for each position in its pattern, the global layer index of every repeat."""
        out = []
        start = 0
        for pattern, repeats in self.layer_groups:
            p = len(pattern)
            out.append(tuple(tuple(start + r * p + j for r in range(repeats)) for j in range(p)))
            start += p * repeats
        return tuple(out)

    # ----------------------------------------------------------------------------------------------------------
    # Parameter counts (analytic; tests check them against the built model and the released sizes)
    def _layer_params(self, kind: LayerKind) -> int:
        d, h = self.hidden_size, self.resolved_head_dim
        n, kv = self.num_attention_heads, self.num_key_value_heads
        b = int(self.use_bias)
        attn = d * n * h + 2 * d * kv * h + n * h * d + b * (n * h + 2 * kv * h + d)
        norms = 2 * d

        def mlp(f: int, bias: bool) -> int:
            return 3 * d * f + int(bias) * (2 * f + d)

        if kind == "dense":
            return attn + norms + mlp(self.intermediate_size, self.use_bias)
        e, f = self.moe_num_experts, self.moe_intermediate_size
        routed = e * 3 * d * f  # fused experts carry no bias in transformers 5.x
        router = d * e + e  # gate weight + correction bias
        shared = mlp(self.shared_expert_size, self.use_bias) if self.moe_num_shared_experts else 0
        return attn + norms + routed + router + shared

    def mtp_params(self) -> int:
        """Parameters of the MTP depths: per depth two norms, the [2D, D] projection (+ bias) and a dense layer."""
        d = self.hidden_size
        per_depth = 2 * d + 2 * d * d + int(self.use_bias) * d + self._layer_params("dense")
        return self.num_nextn_predict_layers * per_depth

    def num_params(self) -> int:
        embed = self.vocab_size * self.hidden_size
        head = 0 if self.tie_word_embeddings else embed
        head += self.vocab_size if self.lm_head_has_bias else 0
        layers = sum(self._layer_params(k) for k in self.layer_kinds)
        return embed + head + self.hidden_size + layers + self.mtp_params()

    def num_active_params(self, include_embedding: bool = True) -> int:
        """Parameters the main model touches per token (routed experts count k of E; the MTP head, used only in
        training with mtp.depth, is left out: the trainer adds it per depth)."""
        total = self.num_params() - self.mtp_params()
        if self.is_moe:
            n_moe = sum(k == "moe" for k in self.layer_kinds)
            inactive = (self.moe_num_experts - self.moe_k) * 3 * self.hidden_size * self.moe_intermediate_size
            total -= n_moe * inactive
        if not include_embedding:
            total -= self.vocab_size * self.hidden_size
        return total

    # ----------------------------------------------------------------------------------------------------------
    # Hugging Face config.json
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike) -> ErnieConfig:
        """Read a released (Baidu) or transformers 5.x `config.json`, a directory holding one, or its dict."""
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                hf = json.load(f)
        hf = dict(hf)
        if "text_config" in hf:
            raise ConfigError(
                "ErnieConfig.from_hf_config: this is a vision-language config (has text_config); only the "
                "text models ernie4_5 / ernie4_5_moe are supported"
            )
        rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ConfigError(f"ErnieConfig.rope_theta: rope_type {rope_type!r} is not supported (only 'default')")
        theta = rope.get("rope_theta", hf.get("rope_theta", 500000.0))
        kwargs: dict[str, Any] = {"rope_theta": float(theta)}
        names = {f.name for f in dataclasses.fields(cls)} - {"rope_theta"}
        for name in names:
            if hf.get(name) is not None:
                kwargs[name] = hf[name]
        kwargs["head_dim"] = hf.get("head_dim")  # absent or null: derived
        if kwargs.get("num_key_value_heads") is None:
            kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", cls.num_attention_heads)
        model_type = hf.get("model_type", "ernie4_5_moe" if "moe_num_experts" in hf else "ernie4_5")
        if model_type not in ("ernie4_5", "ernie4_5_moe"):
            raise ConfigError(f"ErnieConfig.from_hf_config: model_type {model_type!r} is not an ERNIE 4.5 text model")
        if model_type == "ernie4_5":
            kwargs["moe_num_experts"] = 0
        else:
            # Released configs may list per-modality values; the text model uses the first.
            for name in (
                "moe_num_experts",
                "moe_intermediate_size",
                "moe_layer_start_index",
                "moe_layer_end_index",
            ):
                if isinstance(kwargs.get(name), list | tuple):
                    kwargs[name] = kwargs[name][0]
            if isinstance(hf.get("moe_k"), list | tuple):
                kwargs["moe_k"] = hf["moe_k"][0]
            for name, default in (("moe_num_experts", 64), ("moe_k", 6), ("moe_num_shared_experts", 2)):
                kwargs.setdefault(name, default)  # transformers' defaults when the key is absent
        for name in ("eos_token_id",):
            if isinstance(kwargs.get(name), list | tuple):
                kwargs[name] = kwargs[name][0]
        return cls(**kwargs)

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers 5.x config.json dict for this architecture."""
        out: dict[str, Any] = {
            "architectures": ["Ernie4_5_MoeForCausalLM" if self.is_moe else "Ernie4_5ForCausalLM"],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.resolved_head_dim,
            "hidden_act": self.hidden_act,
            "max_position_embeddings": self.max_position_embeddings,
            "rms_norm_eps": self.rms_norm_eps,
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},
            "tie_word_embeddings": self.tie_word_embeddings,
            "use_bias": self.use_bias,
            "initializer_range": self.initializer_range,
            "pad_token_id": self.pad_token_id,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": self.eos_token_id,
            "torch_dtype": "bfloat16",
        }
        if self.num_nextn_predict_layers:
            out["num_nextn_predict_layers"] = self.num_nextn_predict_layers
        if self.is_moe:
            out.update(
                moe_num_experts=self.moe_num_experts,
                moe_k=self.moe_k,
                moe_intermediate_size=self.moe_intermediate_size,
                moe_num_shared_experts=self.moe_num_shared_experts,
                moe_layer_start_index=self.moe_layer_start_index,
                moe_layer_end_index=self.resolved_moe_layer_end_index,
                moe_layer_interval=self.moe_layer_interval,
                moe_norm_min=self.moe_norm_min,
            )
        return out

    def replace(self, **changes: Any) -> ErnieConfig:
        return dataclasses.replace(self, **changes)


# ------------------------------------------------------------------------------------------------------------
# Released architectures (the config.json files Baidu published). Training presets in configs/ build on these.
ERNIE_4_5_0P3B = ErnieConfig(
    vocab_size=103424,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=18,
    num_attention_heads=16,
    num_key_value_heads=2,
    head_dim=128,
    tie_word_embeddings=True,
)

ERNIE_4_5_21B_A3B = ErnieConfig(
    vocab_size=103424,
    hidden_size=2560,
    intermediate_size=12288,
    num_hidden_layers=28,
    num_attention_heads=20,
    num_key_value_heads=4,
    head_dim=None,
    tie_word_embeddings=True,
    moe_num_experts=64,
    moe_k=6,
    moe_intermediate_size=1536,
    moe_num_shared_experts=2,
    moe_layer_start_index=1,
    moe_layer_end_index=27,
    moe_layer_interval=1,
)

ERNIE_4_5_300B_A47B = ErnieConfig(
    vocab_size=103424,
    hidden_size=8192,
    intermediate_size=28672,
    num_hidden_layers=54,
    num_attention_heads=64,
    num_key_value_heads=8,
    head_dim=None,
    tie_word_embeddings=False,
    moe_num_experts=64,
    moe_k=8,
    moe_intermediate_size=3584,
    moe_num_shared_experts=0,
    moe_layer_start_index=3,
    moe_layer_end_index=53,
    moe_layer_interval=1,
)

ARCHITECTURES: dict[str, ErnieConfig] = {
    "ernie-4.5-0.3b": ERNIE_4_5_0P3B,
    "ernie-4.5-21b-a3b": ERNIE_4_5_21B_A3B,
    "ernie-4.5-300b-a47b": ERNIE_4_5_300B_A47B,
}


def human_count(n: int) -> str:
    """12_345_678 -> '12.3M' (for logs)."""
    if n < 1000:
        return str(n)
    exp = min(int(math.log10(n) // 3), 4)
    return f"{n / 10 ** (3 * exp):.1f}{' KMBT'[exp]}"
