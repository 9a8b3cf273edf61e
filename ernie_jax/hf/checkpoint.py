"""Load and save Hugging Face ERNIE 4.5 checkpoints (config.json + safetensors, single file or sharded).

Loading streams: each parameter is built with `jax.make_array_from_callback`, so every device shard is filled
straight from the memory-mapped safetensors files, one HF tensor at a time. No full copy of the checkpoint is ever
held in host memory, which lets a 21B model load on a host with less RAM than twice its size.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy

import sharding
from ernie_jax import quant
from ernie_jax.config import ConfigError, ErnieConfig
from ernie_jax.generation.config import GenerationConfig
from ernie_jax.hf.names import is_ignored_hf_key, tensor_maps
from ernie_jax.hf.transfer import (
    DEFAULT_MAX_SHARD_BYTES,
    INDEX_FILE,
    SINGLE_FILE,
    CheckpointError,
    load_parameters,
    validate_tensors,
    write_checkpoint,
)
from ernie_jax.model import ErnieForCausalLM, abstract_model
from ernie_jax.options import ModelOptions

log = logging.getLogger(__name__)


@contextlib.contextmanager
def reading_checkpoint(path: str | os.PathLike):
    """Turn any failure to read `path` into one `CheckpointError` that names it (and keeps the cause chained)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise CheckpointError(f"{path}: no such directory; pass a Hugging Face checkpoint directory")
    if not os.path.isdir(path):
        raise CheckpointError(
            f"{path}: is a file; pass the checkpoint directory that holds config.json and the safetensors files"
        )
    try:
        yield path
    except (CheckpointError, ConfigError):
        raise
    except (OSError, ValueError, safetensors.SafetensorError) as e:  # UnicodeDecodeError is a ValueError
        first = (str(e).strip().splitlines() or [""])[0][:300]
        raise CheckpointError(f"{path}: cannot read the checkpoint ({type(e).__name__}: {first})") from e


class SafetensorsReader:
    """Tensor-by-tensor access to a directory's safetensors files (memory-mapped)."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = os.fspath(directory)
        index_path = os.path.join(self.directory, INDEX_FILE)
        single_path = os.path.join(self.directory, SINGLE_FILE)
        if os.path.exists(index_path):
            with open(index_path) as f:
                weight_map: dict[str, str] = json.load(f)["weight_map"]
        elif os.path.exists(single_path):
            weight_map = None  # filled from the file's own keys below
        else:
            found = sorted(os.listdir(self.directory)) if os.path.isdir(self.directory) else []
            raise CheckpointError(
                f"{self.directory}: no {SINGLE_FILE} or {INDEX_FILE} found (directory holds {found[:10]}). "
                "ernie_jax reads safetensors checkpoints as written by transformers' save_pretrained."
            )
        self._handles: dict[str, safetensors.safe_open] = {}
        if weight_map is None:
            handle = self._open(SINGLE_FILE)
            weight_map = {k: SINGLE_FILE for k in handle.keys()}  # noqa: SIM118 - safe_open is not a mapping
        self.weight_map = weight_map

    def _open(self, filename: str):
        if filename not in self._handles:
            path = os.path.join(self.directory, filename)
            if not os.path.exists(path):
                raise CheckpointError(f"{path}: listed in {INDEX_FILE} but missing; the checkpoint is incomplete")
            self._handles[filename] = safetensors.safe_open(path, framework="np")
        return self._handles[filename]

    def keys(self) -> list[str]:
        return list(self.weight_map)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._open(self.weight_map[key]).get_slice(key).get_shape())

    def read(self, key: str) -> np.ndarray:
        return self._open(self.weight_map[key]).get_tensor(key)


def from_pretrained(
    path: str | os.PathLike,
    dtype=jnp.bfloat16,
    mesh: jax.sharding.Mesh | None = None,
    *,
    param_dtype=None,
    rules=sharding.DEFAULT_RULES,
    options: ModelOptions = ModelOptions(),
    progress: bool = True,
    quantize: str | None = None,
) -> ErnieForCausalLM:
    """Load a Hugging Face ERNIE 4.5 checkpoint directory into an `ErnieForCausalLM`.

    Args:
      path: directory with config.json and model.safetensors or model.safetensors.index.json + shards.
      dtype: compute dtype, and parameter dtype unless `param_dtype` is given (training: fp32 master weights).
        The router weight and correction bias always stay fp32.
      mesh: if given, every parameter is placed on its sharding (sharding.rules) as it is read.
      quantize: "int8" (or "nf4"): the decoder's matmul and expert weights are stored quantized
        (`ernie_jax.quant`), each converted right after loading, and dequantised inside the matmuls. Text models.
    """
    if quantize is not None and quantize not in quant.QUANT_KINDS:
        raise ValueError(f"from_pretrained: quantize={quantize!r}; choose from {', '.join(quant.QUANT_KINDS)}")
    with reading_checkpoint(path):
        if _model_type(path) == VL_MODEL_TYPE:  # the multimodal model has its own bridge (imported late: it uses ours)
            if quantize is not None:
                raise ConfigError(f"{path}: quantize={quantize!r} is supported for the text models only, not VL")
            from ernie_jax import vl

            return vl.from_pretrained(
                path, dtype, mesh, param_dtype=param_dtype, rules=rules, options=options, progress=progress
            )
        model = _load(path, dtype, mesh, param_dtype, rules, options, progress)
        if quantize is not None:
            quant.quantize(model, quantize, rules=rules)
        # Sampling and EOS defaults for ernie_jax.generate (None when the checkpoint has no generation_config.json).
        model.generation_config = GenerationConfig.from_pretrained(path)
        return model


VL_MODEL_TYPE = "ernie4_5_vl_moe"


def _model_type(path: str) -> str | None:
    config = os.path.join(path, "config.json")
    if not os.path.isfile(config):
        return None  # from_hf_config names the missing file
    with open(config) as f:
        return json.load(f).get("model_type")


def saved_dtype(path: str | os.PathLike) -> str | None:
    """The dtype a checkpoint's config.json says its tensors were saved in ("bfloat16", ...), if it says."""
    try:
        with open(os.path.join(path, "config.json")) as f:
            hf = json.load(f)
    except (OSError, ValueError):
        return None
    value = hf.get("dtype") or hf.get("torch_dtype")
    return value if isinstance(value, str) else None


def _load(path, dtype, mesh, param_dtype, rules, options, progress) -> ErnieForCausalLM:
    cfg = ErnieConfig.from_hf_config(path)
    reader = SafetensorsReader(path)
    names = reader.keys()
    if cfg.num_nextn_predict_layers and not any("mtp" in name for name in names):
        # transformers keeps the config key but drops the MTP tensors when it saves: the main model is all there.
        log.warning(
            "%s: config.json has num_nextn_predict_layers=%d but the checkpoint holds no MTP tensors (transformers "
            "drops them when it saves); loaded without an MTP head",
            path,
            cfg.num_nextn_predict_layers,
        )
        cfg = cfg.replace(num_nextn_predict_layers=0)
    maps = tensor_maps(cfg)
    ignored = validate_tensors(reader, maps, lambda key: is_ignored_hf_key(key, cfg))
    mtp = [k for k in ignored if "mtp" in k]
    if mtp:
        log.info(
            "Skipping %d multi-token-prediction tensors (%s, ...): config.json has num_nextn_predict_layers=%d; set "
            "it to the checkpoint's MTP depth to load them",
            len(mtp),
            mtp[0],
            cfg.num_nextn_predict_layers,
        )
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, options=options)
    model = load_parameters(reader, abstract, maps, param_dtype=param_dtype, mesh=mesh, rules=rules, progress=progress)
    log.info("Loaded %s (%s) from %s", cfg.model_type, f"{cfg.num_params():,} params", path)
    return model


def save_pretrained(
    model,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> None:
    """Write `model` (text or VL) as a transformers checkpoint: config.json plus per-expert safetensors (sharded
    with an index past `max_shard_bytes`). Files are written under a temporary name and moved into place only when
    complete, the index last, so an interrupted save never leaves a checkpoint that looks whole.

    Args:
      dtype: dtype of the written tensors (default: the model's parameter dtype); router weight and correction
        bias are always written fp32.
    """
    from ernie_jax import vl

    if isinstance(model, vl.ErnieVLForConditionalGeneration):
        return vl.save_pretrained(model, path, dtype=dtype, max_shard_bytes=max_shard_bytes, progress=progress)
    cfg = model.config
    names = write_checkpoint(
        model,
        tensor_maps(cfg),
        cfg.to_hf_config(),
        path,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
    )
    log.info("Saved %s to %s (%d file(s))", cfg.model_type, path, len(names))
