"""ERNIE 4.5 VL architecture: frozen, validated dataclasses for the text decoder, the vision tower and the whole model.

Field names follow transformers' `Ernie4_5_VLMoeTextConfig`, `Ernie4_5_VLMoeVisionConfig` and `Ernie4_5_VLMoeConfig`
so a `config.json` written by `save_pretrained` reads field for field. Shape letters are those of
`ernie_jax/config.py`, plus: P patches (vision tokens before merging), Dv vision hidden, M merged-patch width
(Dv * spatial_merge_size**2), C pixel values per patch (in_channels * patch_size**2).
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Literal

from ernie_jax.config import ConfigError, ErnieConfig

MlpKind = Literal["dense", "sparse"]
VISION_ACTIVATIONS = ("quick_gelu", "gelu", "silu")


def _require(condition: bool, owner: str, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{owner}.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class VLTextConfig:
    """The language model: an ERNIE 4.5 decoder whose MoE layers hold a text and a vision expert pool."""

    vocab_size: int = 103424
    hidden_size: int = 2560
    intermediate_size: int = 12288
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int = 4
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    max_position_embeddings: int = 131072
    rope_theta: float = 500000.0
    # 3D RoPE: rotary frequency pairs given to height, width and time (sum = head_dim / 2). Height and width take
    # alternate frequencies of the first h + w, time takes the last t.
    mrope_section: tuple[int, int, int] = (22, 22, 20)
    rms_norm_eps: float = 1e-5
    use_bias: bool = False
    hidden_act: str = "silu"
    initializer_range: float = 0.02
    pad_token_id: int | None = None
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    moe_num_experts: int = 64  # per pool: text and vision each have this many routed experts
    moe_k: int = 6
    moe_intermediate_size: tuple[int, int] = (1536, 512)  # (text experts, vision experts)
    moe_num_shared_experts: int = 2
    moe_norm_min: float = 1e-12
    router_aux_loss_coef: float = 0.001
    mlp_layer_types: tuple[MlpKind, ...] | None = None  # None: layer 0 dense, the rest sparse (transformers' default)

    def __post_init__(self) -> None:
        owner = "VLTextConfig"
        if self.mlp_layer_types is None:
            object.__setattr__(self, "mlp_layer_types", ("dense",) + ("sparse",) * (self.num_hidden_layers - 1))
        object.__setattr__(self, "mlp_layer_types", tuple(self.mlp_layer_types))
        object.__setattr__(self, "mrope_section", tuple(self.mrope_section))
        object.__setattr__(self, "moe_intermediate_size", tuple(self.moe_intermediate_size))
        _require(
            len(self.mlp_layer_types) == self.num_hidden_layers,
            owner,
            "mlp_layer_types",
            f"has {len(self.mlp_layer_types)} entries for {self.num_hidden_layers} layers; give one per layer, e.g. "
            f"mlp_layer_types={','.join(('dense',) + ('sparse',) * (self.num_hidden_layers - 1))} (layer 0 dense)",
        )
        bad = sorted(set(self.mlp_layer_types) - {"dense", "sparse"})
        _require(not bad, owner, "mlp_layer_types", f"entries must be 'dense' or 'sparse', got {bad}")
        _require(
            len(self.moe_intermediate_size) == 2 and min(self.moe_intermediate_size) > 0,
            owner,
            "moe_intermediate_size",
            f"must be two positive widths (text experts, vision experts), got {self.moe_intermediate_size}",
        )
        _require(
            1 <= self.moe_k <= self.moe_num_experts,
            owner,
            "moe_k",
            f"must be in [1, moe_num_experts={self.moe_num_experts}], got {self.moe_k}",
        )
        _require(self.moe_num_shared_experts >= 0, owner, "moe_num_shared_experts", "must be >= 0")
        _require(self.moe_norm_min > 0, owner, "moe_norm_min", "must be positive")
        # The shared building blocks validate heads, head_dim, eps and the activation with their own messages.
        self.as_ernie_config()
        _require(len(self.mrope_section) == 3, owner, "mrope_section", f"must be (h, w, t), got {self.mrope_section}")
        h, w, t = self.mrope_section
        _require(
            h == w and h > 0 and t > 0,
            owner,
            "mrope_section",
            f"must be (h, w, t) with h == w > 0 and t > 0 (transformers' layout), got {self.mrope_section}",
        )
        _require(
            h + w + t == self.resolved_head_dim // 2,
            owner,
            "mrope_section",
            f"{self.mrope_section} must sum to head_dim / 2 = {self.resolved_head_dim // 2}",
        )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim if self.head_dim is not None else self.hidden_size // self.num_attention_heads

    @property
    def shared_expert_size(self) -> int:
        return self.moe_intermediate_size[0] * self.moe_num_shared_experts

    def as_ernie_config(self) -> ErnieConfig:
        """The dense text-model config whose attention, norms and MLPs this decoder shares (ernie_jax.layers)."""
        return ErnieConfig(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            max_position_embeddings=self.max_position_embeddings,
            rope_theta=self.rope_theta,
            rms_norm_eps=self.rms_norm_eps,
            use_bias=self.use_bias,
            hidden_act=self.hidden_act,
            initializer_range=self.initializer_range,
            moe_num_experts=0,
        )

    @property
    def layer_groups(self) -> tuple[tuple[MlpKind, int], ...]:
        """Runs of consecutive layers of one kind, ((kind, repeats), ...) in layer order; each run is one scan."""
        groups: list[tuple[MlpKind, int]] = []
        for kind in self.mlp_layer_types:
            if groups and groups[-1][0] == kind:
                groups[-1] = (kind, groups[-1][1] + 1)
            else:
                groups.append((kind, 1))
        return tuple(groups)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """The vision transformer (patch embedding, 2D rotary blocks) and the merge factors of the resampler."""

    depth: int = 32
    hidden_size: int = 1280
    num_heads: int = 16
    intermediate_size: int = 5120  # transformers: 4 * 1280 when absent, whatever hidden_size is
    hidden_act: str = "quick_gelu"
    in_channels: int = 3
    patch_size: int = 14
    spatial_merge_size: int = 2
    temporal_merge_size: int = 2
    rms_norm_eps: float = 1e-6  # the LayerNorm eps of the tower and the resampler (transformers' name)
    rope_theta: float = 10000.0
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        owner = "VisionConfig"
        for name in ("depth", "hidden_size", "num_heads", "intermediate_size", "in_channels", "patch_size"):
            _require(getattr(self, name) > 0, owner, name, f"must be positive, got {getattr(self, name)}")
        _require(
            self.hidden_size % self.num_heads == 0,
            owner,
            "num_heads",
            f"{self.num_heads} must divide hidden_size={self.hidden_size}",
        )
        _require(
            self.head_dim % 4 == 0,
            owner,
            "hidden_size",
            f"head_dim {self.head_dim} must be a multiple of 4 (2D RoPE: a quarter of it per axis, rotated by halves)",
        )
        _require(
            self.hidden_act in VISION_ACTIVATIONS,
            owner,
            "hidden_act",
            f"must be one of {VISION_ACTIVATIONS}, got {self.hidden_act!r}",
        )
        _require(self.spatial_merge_size >= 1, owner, "spatial_merge_size", "must be >= 1")
        # transformers' resampler pairs frames (even, odd) explicitly: only a temporal merge of 2 is defined.
        _require(self.temporal_merge_size == 2, owner, "temporal_merge_size", "only 2 is supported (as transformers)")
        _require(self.rms_norm_eps > 0, owner, "rms_norm_eps", "must be positive")
        _require(self.rope_theta > 0, owner, "rope_theta", "must be positive")

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """C: pixel values per flattened patch (the processor's `pixel_values` row)."""
        return self.in_channels * self.patch_size**2

    @property
    def merged_dim(self) -> int:
        """M: one merged token's width, the spatial_merge_size**2 patches it covers side by side."""
        return self.hidden_size * self.spatial_merge_size**2


@dataclasses.dataclass(frozen=True)
class VLConfig:
    """ERNIE 4.5 VL (`ernie4_5_vl_moe`): text decoder + vision tower + resampler, and the placeholder token ids."""

    text: VLTextConfig = VLTextConfig()
    vision: VisionConfig = VisionConfig()
    image_token_id: int = 100295
    image_start_token_id: int = 101304
    image_end_token_id: int = 101305
    video_token_id: int = 103367
    video_start_token_id: int = 101306
    video_end_token_id: int = 101307
    tie_word_embeddings: bool = True  # the top-level flag is the one transformers ties the head by

    def __post_init__(self) -> None:
        for name in (
            "image_token_id",
            "image_start_token_id",
            "image_end_token_id",
            "video_token_id",
            "video_start_token_id",
            "video_end_token_id",
        ):
            value = getattr(self, name)
            _require(
                0 <= value < self.text.vocab_size,
                "VLConfig",
                name,
                f"{value} is outside the vocabulary [0, {self.text.vocab_size})",
            )
        _require(
            self.image_token_id != self.video_token_id,
            "VLConfig",
            "video_token_id",
            "must differ from image_token_id (placeholders are told apart by id)",
        )

    @property
    def model_type(self) -> str:
        return "ernie4_5_vl_moe"

    # ----------------------------------------------------------------------------------------------------------
    # What the trainer and the AOT report read from a model config (the text models' ErnieConfig names).
    @property
    def vocab_size(self) -> int:
        return self.text.vocab_size

    @property
    def hidden_size(self) -> int:
        return self.text.hidden_size

    @property
    def num_hidden_layers(self) -> int:
        return self.text.num_hidden_layers

    @property
    def num_attention_heads(self) -> int:
        return self.text.num_attention_heads

    @property
    def resolved_head_dim(self) -> int:
        return self.text.resolved_head_dim

    @property
    def eos_token_id(self) -> int | None:
        return self.text.eos_token_id

    @property
    def pad_token_id(self) -> int | None:
        return self.text.pad_token_id

    @property
    def num_nextn_predict_layers(self) -> int:
        return 0  # ERNIE 4.5 VL has no multi-token-prediction head

    def _param_counts(self) -> dict[str, int]:
        """Parameter counts by part: embed (+ untied head), decoder attention/norms/dense/shared, each pool's
        routed experts (and routers), vision tower and resampler."""
        t, v = self.text, self.vision
        d, hd = t.hidden_size, t.resolved_head_dim
        bias = int(t.use_bias)
        attn = d * hd * (2 * t.num_attention_heads + 2 * t.num_key_value_heads)
        attn += bias * hd * (t.num_attention_heads + 2 * t.num_key_value_heads) + bias * d
        dense = 3 * d * t.intermediate_size + bias * (2 * t.intermediate_size + d)
        shared = 3 * d * t.shared_expert_size + bias * (2 * t.shared_expert_size + d) if t.moe_num_shared_experts else 0
        n_moe = sum(kind == "sparse" for kind in t.mlp_layer_types)
        expert = [3 * d * width for width in t.moe_intermediate_size]  # one routed expert of each pool
        dv, fv = v.hidden_size, v.intermediate_size
        block = 4 * dv + 3 * dv * dv + 3 * dv + dv * dv + dv + dv * fv + fv + fv * dv + dv
        m = v.merged_dim
        resampler = 2 * (m * m + m) + 2 * m + (2 * m * m + m) + (m * m + m) + 2 * m + m * d + d + d
        return dict(
            embed=t.vocab_size * d * (1 if self.tie_word_embeddings else 2),
            decoder=t.num_hidden_layers * (attn + 2 * d) + d + (t.num_hidden_layers - n_moe) * dense + n_moe * shared,
            routers=n_moe * 2 * d * t.moe_num_experts,
            text_experts=n_moe * t.moe_num_experts * expert[0],
            vision_experts=n_moe * t.moe_num_experts * expert[1],
            text_active=n_moe * t.moe_k * expert[0],
            vision=v.patch_dim * dv + v.depth * block + 2 * dv + resampler,
        )

    def num_params(self) -> int:
        """Every parameter: decoder with both expert pools, vision tower and resampler."""
        c = self._param_counts()
        return c["embed"] + c["decoder"] + c["routers"] + c["text_experts"] + c["vision_experts"] + c["vision"]

    def num_active_params(self, include_embedding: bool = True) -> int:
        """Parameters a text token passes through: the decoder with k text experts per MoE layer (no vision
        tower, no vision pool). Image tokens pass through k narrower vision experts instead."""
        c = self._param_counts()
        embed = c["embed"] if include_embedding else 0
        return embed + c["decoder"] + c["routers"] // 2 + c["text_active"]

    def vision_flops_per_patch(self, frame_patches: int) -> float:
        """Training FLOPs per image patch through the vision tower and resampler: 6 * their parameters (the
        resampler's per merged token, spread over its m^2 patches) + attention within frames of `frame_patches`."""
        c = self._param_counts()
        v = self.vision
        tower = v.patch_dim * v.hidden_size + v.depth * (
            3 * v.hidden_size**2 + v.hidden_size**2 + 2 * v.hidden_size * v.intermediate_size
        )
        resampler = (c["vision"] - tower) / v.spatial_merge_size**2
        attention = v.depth * 12 * frame_patches * v.hidden_size  # bidirectional: QK^T and AV, fwd + bwd
        return 6.0 * (tower + resampler) + attention

    def replace(self, **changes: Any) -> VLConfig:
        return dataclasses.replace(self, **changes)

    # ----------------------------------------------------------------------------------------------------------
    # Hugging Face config.json
    @classmethod
    def from_hf_config(cls, hf: dict[str, Any] | str | os.PathLike) -> VLConfig:
        """Read a transformers `ernie4_5_vl_moe` config.json, a directory holding one, or its dict."""
        if not isinstance(hf, dict):
            path = os.fspath(hf)
            if os.path.isdir(path):
                path = os.path.join(path, "config.json")
            with open(path) as f:
                hf = json.load(f)
        model_type = hf.get("model_type")
        if model_type != "ernie4_5_vl_moe":
            raise ConfigError(
                f"VLConfig.from_hf_config: model_type {model_type!r} is not 'ernie4_5_vl_moe' (transformers' layout; "
                "Baidu's Paddle-format 'ernie4_5_moe_vl' config is not read)"
            )
        text_hf = dict(hf.get("text_config") or {})
        vision_hf = dict(hf.get("vision_config") or {})
        top = {f.name: hf[f.name] for f in dataclasses.fields(cls) if f.name not in ("text", "vision") and f.name in hf}
        return cls(text=_text_from_hf(text_hf), vision=_vision_from_hf(vision_hf), **top)

    def to_hf_config(self) -> dict[str, Any]:
        """A transformers 5.x config.json dict (what `Ernie4_5_VLMoeConfig.save_pretrained` writes)."""
        t, v = self.text, self.vision
        text = {
            "model_type": "ernie4_5_vl_moe_text",
            "vocab_size": t.vocab_size,
            "hidden_size": t.hidden_size,
            "intermediate_size": t.intermediate_size,
            "num_hidden_layers": t.num_hidden_layers,
            "num_attention_heads": t.num_attention_heads,
            "num_key_value_heads": t.num_key_value_heads,
            "hidden_act": t.hidden_act,
            "max_position_embeddings": t.max_position_embeddings,
            "initializer_range": t.initializer_range,
            "rms_norm_eps": t.rms_norm_eps,
            "rope_parameters": {
                "rope_type": "default",
                "rope_theta": t.rope_theta,
                "mrope_section": list(t.mrope_section),
            },
            "use_bias": t.use_bias,
            "moe_intermediate_size": list(t.moe_intermediate_size),
            "moe_k": t.moe_k,
            "moe_num_experts": t.moe_num_experts,
            "moe_num_shared_experts": t.moe_num_shared_experts,
            "moe_norm_min": t.moe_norm_min,
            "router_aux_loss_coef": t.router_aux_loss_coef,
            "mlp_layer_types": list(t.mlp_layer_types),
            "tie_word_embeddings": self.tie_word_embeddings,
            "pad_token_id": t.pad_token_id,
            "bos_token_id": t.bos_token_id,
            "eos_token_id": t.eos_token_id,
        }
        if t.head_dim is not None:
            text["head_dim"] = t.head_dim
        vision = {
            "model_type": "ernie4_5_vl_moe_vision",
            "depth": v.depth,
            "hidden_size": v.hidden_size,
            "num_heads": v.num_heads,
            "intermediate_size": v.intermediate_size,
            "hidden_act": v.hidden_act,
            "in_channels": v.in_channels,
            "patch_size": v.patch_size,
            "spatial_merge_size": v.spatial_merge_size,
            "temporal_merge_size": v.temporal_merge_size,
            "rms_norm_eps": v.rms_norm_eps,
            "rope_parameters": {"rope_type": "axial", "rope_theta": v.rope_theta},
            "initializer_range": v.initializer_range,
        }
        out: dict[str, Any] = {
            "architectures": ["Ernie4_5_VLMoeForConditionalGeneration"],
            "model_type": self.model_type,
            "text_config": text,
            "vision_config": vision,
            "tie_word_embeddings": self.tie_word_embeddings,
        }
        for name in ("image_token_id", "image_start_token_id", "image_end_token_id"):
            out[name] = getattr(self, name)
        for name in ("video_token_id", "video_start_token_id", "video_end_token_id"):
            out[name] = getattr(self, name)
        return out


def _rope(hf: dict[str, Any], default_type: str) -> dict[str, Any]:
    rope = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    rope_type = rope.get("rope_type", rope.get("type", default_type))
    if rope_type != default_type:
        raise ConfigError(f"VLConfig.from_hf_config: rope_type {rope_type!r} is not supported (only {default_type!r})")
    if "rope_theta" not in rope and "rope_theta" in hf:
        rope["rope_theta"] = hf["rope_theta"]
    return rope


def _text_from_hf(hf: dict[str, Any]) -> VLTextConfig:
    rope = _rope(hf, "default")
    kwargs: dict[str, Any] = {}
    if "rope_theta" in rope:
        kwargs["rope_theta"] = float(rope["rope_theta"])
    if rope.get("mrope_section") is not None:
        kwargs["mrope_section"] = tuple(rope["mrope_section"])
    skip = {"rope_theta", "mrope_section"}
    for f in dataclasses.fields(VLTextConfig):
        if f.name not in skip and hf.get(f.name) is not None:
            kwargs[f.name] = hf[f.name]
    if kwargs.get("num_key_value_heads") is None:
        kwargs["num_key_value_heads"] = kwargs.get("num_attention_heads", VLTextConfig.num_attention_heads)
    if isinstance(kwargs.get("moe_num_experts"), list | tuple):
        experts = set(kwargs["moe_num_experts"])
        if len(experts) != 1:
            raise ConfigError(f"VLTextConfig.moe_num_experts: pools of different sizes {experts} are not supported")
        kwargs["moe_num_experts"] = experts.pop()
    for name in ("eos_token_id", "moe_k"):
        if isinstance(kwargs.get(name), list | tuple):
            kwargs[name] = kwargs[name][0]
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        kwargs.setdefault(name, None)
    return VLTextConfig(**kwargs)


def _vision_from_hf(hf: dict[str, Any]) -> VisionConfig:
    rope = _rope(hf, "axial")
    kwargs: dict[str, Any] = {}
    if "rope_theta" in rope:
        kwargs["rope_theta"] = float(rope["rope_theta"])
    aliases = {"num_attention_heads": "num_heads", "num_hidden_layers": "depth"}
    for key, value in hf.items():
        name = aliases.get(key, key)
        if name != "rope_theta" and name in {f.name for f in dataclasses.fields(VisionConfig)} and value is not None:
            kwargs[name] = value
    if isinstance(kwargs.get("patch_size"), list | tuple):
        sizes = set(kwargs["patch_size"])
        if len(sizes) != 1:
            raise ConfigError(f"VisionConfig.patch_size: only square patches are supported, got {kwargs['patch_size']}")
        kwargs["patch_size"] = sizes.pop()
    return VisionConfig(**kwargs)
