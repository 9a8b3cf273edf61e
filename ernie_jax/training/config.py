"""Training configuration: frozen, validated dataclasses, plus the command-line override syntax.

A run is `python -m ernie_jax.train --config=NAME [key=value ...]`, where NAME is a preset in `configs/` and each
override is a dotted field path, e.g. `steps=500 optim.lr=1e-3 model.num_hidden_layers=4 mesh.expert=8
data.sources=a.jsonl,b.jsonl`. `--help` lists every field with its type and preset value.
"""

from __future__ import annotations

import dataclasses
import importlib
import re
import types
import typing
from typing import Any, Literal

from ernie_jax.config import ConfigError, ErnieConfig
from ernie_jax.data import DataConfig
from ernie_jax.lora import LoRAConfig
from ernie_jax.options import KERNEL_IMPLEMENTATIONS, MOE_TRANSPORTS, REMAT_CHOICES, ModelOptions, OptionsError
from ernie_jax.vl.config import VLConfig


def _require(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"{field}: {message}")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
    """Device mesh sizes (-1 = the remaining devices) and the expert-parallel token transport."""

    dcn: int = 1
    data: int = -1
    fsdp: int = 1
    expert: int = 1
    tensor: int = 1
    moe_transport: Literal[MOE_TRANSPORTS] = "allgather"  # ragged_a2a: TPU v4+ and GPU only
    # ragged_a2a receive buffer in units of a device's balanced share (N_local * k rows); 0 = the worst case
    # (N_local * k * EP rows, dropless). Assignments past a bounded buffer are dropped and counted (metric
    # moe_dropped); the buffer's memory and every op over it shrink by EP / factor.
    moe_buffer_factor: float = 0.0

    def __post_init__(self):
        # The rules for these two live with the run options (ernie_jax.options); only the key names are ours.
        try:
            ModelOptions(moe_transport=self.moe_transport, moe_buffer_factor=self.moe_buffer_factor)
        except OptionsError as e:
            raise ConfigError(f"mesh.{e.field}: {e.reason}") from None

    @property
    def sizes(self) -> dict[str, int]:
        return dict(dcn=self.dcn, data=self.data, fsdp=self.fsdp, expert=self.expert, tensor=self.tensor)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """AdamW with linear warmup then cosine or linear decay to min_lr_ratio * lr, global-norm clipping."""

    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_steps: int = 100
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = 0.1  # not applied to norms, biases or the router correction bias
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    clip_norm: float = 1.0  # 0 disables clipping
    grad_accum: int = 1  # micro-batches per step (the global batch is split into this many)

    def __post_init__(self):
        _require(self.lr > 0, "optim.lr", f"must be positive, got {self.lr}")
        _require(0 <= self.min_lr_ratio <= 1, "optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}")
        _require(self.warmup_steps >= 0, "optim.warmup_steps", "must be >= 0")
        _require(
            self.decay in ("cosine", "linear", "constant"),
            "optim.decay",
            f"must be 'cosine', 'linear' or 'constant', got {self.decay!r}",
        )
        _require(self.grad_accum >= 1, "optim.grad_accum", f"must be >= 1, got {self.grad_accum}")
        _require(self.clip_norm >= 0, "optim.clip_norm", "must be >= 0 (0 disables clipping)")


@dataclasses.dataclass(frozen=True)
class MoELossConfig:
    """ERNIE's MoE training terms (Paddle's training recipe); 0 disables a term."""

    aux_loss_coef: float = 1e-2  # load balance: E * sum_e f_e * P_e per MoE layer (Paddle default 1e-2)
    z_loss_coef: float = 1e-4  # router z-loss: mean logsumexp(logits)^2
    ortho_loss_coef: float = 1e-3  # router orthogonality of L2-normalised expert rows
    bias_update_rate: float = 1e-3  # aux-free balancing: bias += rate * sign(mean load - load) after each step

    def __post_init__(self):
        for f in dataclasses.fields(self):
            _require(getattr(self, f.name) >= 0, f"moe_loss.{f.name}", "must be >= 0")


@dataclasses.dataclass(frozen=True)
class MTPConfig:
    """Multi-token prediction in training: `depth` MTP depths of the model learn the tokens 2 .. depth + 1 ahead."""

    depth: int = 0  # 0: no MTP loss; at most the model's num_nextn_predict_layers. Rows carry seq_len + depth tokens.
    loss_weight: float = 0.1  # loss += loss_weight * mean over depths of each depth's cross-entropy (Paddle: 0.1)

    def __post_init__(self):
        _require(self.depth >= 0, "mtp.depth", f"must be >= 0 (0 = no MTP), got {self.depth}")
        _require(self.loss_weight >= 0, "mtp.loss_weight", f"must be >= 0, got {self.loss_weight}")


@dataclasses.dataclass(frozen=True)
class CheckpointConfig:
    every: int = 100  # save every N steps (and at the end, and on SIGTERM)
    keep: int = 3  # keep the last K checkpoints
    async_save: bool = True

    def __post_init__(self):
        _require(self.every >= 1, "checkpoint.every", "must be >= 1")
        _require(self.keep >= 1, "checkpoint.keep", "must be >= 1")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    name: str
    model: ErnieConfig | VLConfig  # a VLConfig trains ERNIE-4.5-VL (with data.format=vl_sft)
    data: DataConfig = DataConfig()
    mesh: MeshConfig = MeshConfig()
    optim: OptimConfig = OptimConfig()
    moe_loss: MoELossConfig = MoELossConfig()
    checkpoint: CheckpointConfig = CheckpointConfig()
    mtp: MTPConfig = MTPConfig()
    # lora.rank > 0: train low-rank adapters only (base weights and router biases frozen); see ernie_jax/lora.py
    lora: LoRAConfig = LoRAConfig()
    steps: int = 300
    seed: int = 0
    run_dir: str = "runs/tiny"  # checkpoints, metrics.jsonl and TensorBoard events go here
    # compute dtype (master weights and optimizer state stay fp32)
    dtype: Literal["float32", "bfloat16"] = "float32"
    remat: Literal[REMAT_CHOICES] = "none"  # rematerialisation policy
    # false: unroll each layer group's scan (faster on CPU for a few layers, slower to compile for many)
    scan_layers: bool = True
    # LM head + cross-entropy over this many tokens of each sequence at a time, so the [B, T, V] fp32 logits are
    # never live whole (0 = the whole sequence at once). Must divide data.seq_len.
    loss_chunk: int = 0
    attention_impl: Literal[KERNEL_IMPLEMENTATIONS] = "auto"
    gmm_impl: Literal[KERNEL_IMPLEMENTATIONS] = "auto"
    log_every: int = 10
    # A step whose loss or gradient is not finite never changes the state. "skip": train on (the count is
    # reported, and a run that skipped every update fails); "stop": stop the run with an error.
    nonfinite: Literal["skip", "stop"] = "skip"
    init_from_hf: str | None = None  # start from a Hugging Face checkpoint directory
    export_hf: str | None = None  # write the final model there with save_pretrained
    # dtype of the exported tensors; "auto": the dtype of the --init-from-hf checkpoint, else bfloat16
    export_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    # LoRA runs: write the adapters as a PEFT adapter directory (peft.PeftModel.from_pretrained on the base model)
    export_peft: str | None = None
    sample_prompt: str = "The "
    sample_tokens: int = 64  # greedy sample printed at the end (0 = none)
    # Devices the preset is meant for ("cpu", "tpu", "gpu") and how many; a run elsewhere stops with advice.
    platform: str = "any"
    min_devices: int = 1
    # The command line's persistent compilation cache: a run does not compile again what an earlier run on this host
    # compiled (none = off; JAX_COMPILATION_CACHE_DIR, when set, is used instead). From Python, set JAX's
    # jax_compilation_cache_dir before the process's first compile.
    compile_cache: str | None = "~/.cache/ernie_jax/compiled"

    def __post_init__(self):
        _require(self.steps >= 1, "steps", f"must be >= 1, got {self.steps}")
        _require(self.dtype in ("float32", "bfloat16"), "dtype", f"must be float32 or bfloat16, got {self.dtype!r}")
        try:
            self.model_options()
        except OptionsError as e:
            raise ConfigError(f"{e.field}: {e.reason}") from None
        _require(self.loss_chunk >= 0, "loss_chunk", f"must be >= 0 (0 = no chunking), got {self.loss_chunk}")
        _require(
            self.loss_chunk == 0 or self.data.seq_len % self.loss_chunk == 0,
            "loss_chunk",
            f"{self.loss_chunk} must divide data.seq_len={self.data.seq_len}",
        )
        _require(self.nonfinite in ("skip", "stop"), "nonfinite", f"must be 'skip' or 'stop', got {self.nonfinite!r}")
        _require(self.log_every >= 1, "log_every", "must be >= 1")
        _require(self.export_peft is None or self.lora.enabled, "export_peft", "needs a LoRA run (lora.rank > 0)")
        # With --init-from-hf the checkpoint's architecture decides; the trainer checks the depth against it then.
        _require(
            self.init_from_hf is not None or self.mtp.depth <= self.model.num_nextn_predict_layers,
            "mtp.depth",
            f"{self.mtp.depth} but model.num_nextn_predict_layers={self.model.num_nextn_predict_layers}; set "
            f"model.num_nextn_predict_layers={self.mtp.depth} (a new MTP head) or lower mtp.depth",
        )
        is_vl = isinstance(self.model, VLConfig)
        _require(
            is_vl == (self.data.format == "vl_sft"),
            "data.format",
            "vl_sft trains a VL model (a vl_* preset or --init-from-hf of an ERNIE-4.5-VL checkpoint) and a VL model "
            f"trains on vl_sft rows; got data.format={self.data.format} for a {type(self.model).__name__} model",
        )
        _require(not (is_vl and self.lora.enabled), "lora.rank", "LoRA is not there yet for VL models; set lora.rank=0")
        if is_vl:  # the resampler merges each m x m block of a row's patches into one token
            merge = self.model.vision.spatial_merge_size**2
            _require(
                self.data.vision_patches % merge == 0,
                "data.vision_patches",
                f"{self.data.vision_patches} must be a multiple of spatial_merge_size**2 = {merge}, e.g. "
                f"{-(-self.data.vision_patches // merge) * merge}",
            )
        _require(
            self.data.global_batch_size % self.optim.grad_accum == 0,
            "optim.grad_accum",
            f"{self.optim.grad_accum} must divide data.global_batch_size={self.data.global_batch_size}",
        )

    @property
    def run_data(self):
        """The data config the trainer reads with: rows carry mtp.depth tokens past seq_len for the MTP depths."""
        return self.data.replace(lookahead=self.mtp.depth)

    def model_options(self, platform: str = "auto") -> ModelOptions:
        """How this run's model runs: the one place the run config becomes run options. platform: the platform
        kernels are traced for ("tpu" for the AOT report on a CPU host)."""
        return ModelOptions(
            remat=self.remat,
            scan_layers=self.scan_layers,
            attention_impl=self.attention_impl,
            gmm_impl=self.gmm_impl,
            platform=platform,
            moe_transport=self.mesh.moe_transport,
            moe_buffer_factor=self.mesh.moe_buffer_factor,
        )


# ----------------------------------------------------------------------------------------------------------------------
# Presets and overrides
def load_preset(name: str) -> TrainConfig:
    """`configs/<name>.py`'s get_config()."""
    try:
        module = importlib.import_module(f"configs.{name}")
    except ModuleNotFoundError as e:
        raise ConfigError(
            f"--config={name}: no preset configs/{name}.py; available: {', '.join(list_presets())}"
        ) from e
    return module.get_config()


def list_presets() -> list[str]:
    import os

    import configs

    folder = os.path.dirname(configs.__file__)
    return sorted(f[:-3] for f in os.listdir(folder) if f.endswith(".py") and not f.startswith("_"))


def _parse_value(text: str, annotation: Any, field: str) -> Any:
    hints = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
    if text.lower() in ("none", "null") and type(None) in hints:
        return None
    hints = tuple(h for h in hints if h is not type(None))
    target = hints[0] if hints else str
    origin = typing.get_origin(target)
    if origin is Literal:
        choices = typing.get_args(target)
        if text not in choices:
            raise ConfigError(f"{field}: {text!r} is not one of {', '.join(map(str, choices))}")
        return text
    try:
        if target is bool:
            if text.lower() in ("1", "true", "yes", "on"):
                return True
            if text.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(text)
        if target is int:
            return int(text)
        if target is float:
            return float(text)
        if origin is tuple:
            return tuple(p for p in text.split(",") if p)
        return text
    except ValueError:
        raise ConfigError(f"{field}: cannot read {text!r} as {getattr(target, '__name__', target)}") from None


def apply_overrides(cfg: Any, overrides: list[str], prefix: str = "") -> Any:
    """Apply `a.b=value` overrides to nested frozen dataclasses (each level re-validated)."""
    by_head: dict[str, list[str]] = {}
    changes: dict[str, Any] = {}
    hints = typing.get_type_hints(type(cfg))
    names = {f.name for f in dataclasses.fields(cfg)}
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected key=value, e.g. optim.lr=1e-3")
        key, value = item.split("=", 1)
        head, _, rest = key.partition(".")
        if head not in names:
            raise ConfigError(f"{prefix}{head}: no such field; see --help for the list")
        if rest:
            by_head.setdefault(head, []).append(f"{rest}={value}")
        else:
            changes[head] = _parse_value(value, hints[head], prefix + head)
    for head, items in by_head.items():
        changes[head] = apply_overrides(getattr(cfg, head), items, prefix=f"{prefix}{head}.")
    try:
        return dataclasses.replace(cfg, **changes)
    except ValueError as e:
        # Nested configs name their fields by class ("DataConfig.seq_len"); say it the way it was typed.
        message = re.sub(rf"\b{type(cfg).__name__}\.", prefix, str(e))
        if not prefix:
            message = re.sub(r"\bTrainConfig\.", "", message)
        raise ConfigError(message) from None


def describe_fields(cfg: Any, prefix: str = "") -> list[str]:
    """`name (type) = value` for every leaf field, for --help."""
    lines = []
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            lines += describe_fields(value, prefix + f.name + ".")
        else:
            hint = hints[f.name]
            if typing.get_origin(hint) is Literal:
                kind = " | ".join(map(str, typing.get_args(hint)))
            else:
                kind = getattr(hint, "__name__", str(hint))
            lines.append(f"  {prefix}{f.name} ({kind}) = {value!r}")
    return lines
