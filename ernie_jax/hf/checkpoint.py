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
import shutil
import tempfile
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import safetensors
import safetensors.numpy
from flax import nnx
from tqdm.auto import tqdm

import sharding
from ernie_jax.config import ConfigError, ErnieConfig
from ernie_jax.hf.names import TensorMap, is_ignored_hf_key, tensor_maps
from ernie_jax.model import ErnieForCausalLM, ModelOptions, abstract_model

log = logging.getLogger(__name__)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


class CheckpointError(ValueError):
    """The checkpoint does not match the config (missing, extra or mis-shaped tensors) or is unreadable."""


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


def _validate(reader: SafetensorsReader, cfg: ErnieConfig, maps: list[TensorMap]) -> None:
    expected: dict[str, tuple[int, ...]] = {}
    for m in maps:
        for key in m.hf_keys.reshape(-1):
            expected[key] = m.hf_shape
    present = set(reader.keys())
    missing = [k for k in expected if k not in present]
    if missing:
        raise CheckpointError(
            f"{reader.directory}: {len(missing)} tensor(s) the config needs are missing from the checkpoint, "
            f"e.g. {missing[:5]}. Is config.json from the same model?"
        )
    ignored = sorted(k for k in present if k not in expected and is_ignored_hf_key(k, cfg))
    extra = sorted(k for k in present if k not in expected and not is_ignored_hf_key(k, cfg))
    if extra:
        raise CheckpointError(
            f"{reader.directory}: {len(extra)} tensor(s) in the checkpoint are not part of this config's model, "
            f"e.g. {extra[:5]}. Is config.json from the same model?"
        )
    mtp = [k for k in ignored if "mtp" in k]
    if mtp:
        log.info("Skipping %d multi-token-prediction tensors (%s, ...): MTP is not modelled.", len(mtp), mtp[0])
    for key, want in expected.items():
        got = reader.shape(key)
        if got != want:
            raise CheckpointError(f"{key}: checkpoint has shape {list(got)}, the config expects {list(want)}")


def _loader(reader: SafetensorsReader, m: TensorMap, np_dtype):
    lead = m.hf_keys.ndim

    def fill(index: tuple[slice, ...]) -> np.ndarray:
        keys = m.hf_keys[index[:lead]] if lead else m.hf_keys
        rest = index[lead:]
        if lead == 0:
            return np.ascontiguousarray(m.to_local(reader.read(str(keys)))[rest].astype(np_dtype))
        out = None
        for idx in np.ndindex(keys.shape):
            piece = m.to_local(reader.read(keys[idx]))[rest].astype(np_dtype)
            if out is None:
                out = np.empty((*keys.shape, *piece.shape), np_dtype)
            out[idx] = piece
        return out

    return fill


def from_pretrained(
    path: str | os.PathLike,
    dtype=jnp.bfloat16,
    mesh: jax.sharding.Mesh | None = None,
    *,
    param_dtype=None,
    rules=sharding.DEFAULT_RULES,
    options: ModelOptions = ModelOptions(),
    progress: bool = True,
) -> ErnieForCausalLM:
    """Load a Hugging Face ERNIE 4.5 checkpoint directory into an `ErnieForCausalLM`.

    Args:
      path: directory with config.json and model.safetensors or model.safetensors.index.json + shards.
      dtype: compute dtype, and parameter dtype unless `param_dtype` is given (training: fp32 master weights).
        The router weight and correction bias always stay fp32.
      mesh: if given, every parameter is placed on its sharding (sharding.rules) as it is read.
    """
    with reading_checkpoint(path):
        if _model_type(path) == VL_MODEL_TYPE:  # the multimodal model has its own bridge (imported late: it uses ours)
            from ernie_jax import vl

            return vl.from_pretrained(
                path, dtype, mesh, param_dtype=param_dtype, rules=rules, options=options, progress=progress
            )
        return _load(path, dtype, mesh, param_dtype, rules, options, progress)


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
    maps = tensor_maps(cfg)
    _validate(reader, cfg, maps)
    param_dtype = dtype if param_dtype is None else param_dtype
    graphdef, state = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, options=options))
    flat = dict(nnx.to_flat_state(state))
    if set(flat) != {m.path for m in maps}:
        raise AssertionError(f"internal: HF name map out of sync with the model: {set(flat) ^ {m.path for m in maps}}")
    default_sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    total = sum(int(np.prod(m.shape)) for m in maps)
    with tqdm(total=total, unit="param", unit_scale=True, desc="loading", disable=not progress) as bar:
        for m in maps:
            var = flat[m.path]
            np_dtype = np.dtype(jnp.float32 if m.keep_fp32 else param_dtype)
            if mesh is None:
                target = default_sharding
            else:
                target = sharding.named_sharding(var.get_metadata()["logical_axes"], mesh, rules, m.shape, m.name)
            value = jax.make_array_from_callback(m.shape, target, _loader(reader, m, np_dtype))
            flat[m.path] = var.replace(value)
            bar.update(int(np.prod(m.shape)))
    state = nnx.from_flat_state(list(flat.items()))
    model = nnx.merge(graphdef, state)
    log.info("Loaded %s (%s) from %s", cfg.model_type, f"{cfg.num_params():,} params", path)
    return model


def _hf_tensors(model: ErnieForCausalLM, out_dtype) -> Iterator[tuple[str, TensorMap, tuple, np.dtype]]:
    for m in tensor_maps(model.config):
        dt = np.dtype(jnp.float32 if m.keep_fp32 else out_dtype)
        for idx in np.ndindex(m.hf_keys.shape):
            yield str(m.hf_keys[idx]), m, idx, dt


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
    path = os.fspath(path)
    cfg = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    out_dtype = dtype or flat[("embed",)].get_value().dtype
    plan = list(_hf_tensors(model, out_dtype))
    shards: list[list[tuple[str, TensorMap, tuple, np.dtype]]] = [[]]
    size = 0
    for item in plan:
        nbytes = int(np.prod(item[1].hf_shape)) * item[3].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += nbytes
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ernie-save-", dir=path)
    weight_map: dict[str, str] = {}
    slab_key, slab = None, None
    try:
        with tqdm(total=len(plan), unit="tensor", desc="saving", disable=not progress) as bar:
            for name, items in zip(names, shards, strict=True):
                tensors = {}
                for key, m, idx, dt in items:
                    # Fetch one repeat's slab at a time (e.g. all experts of one layer), not one tensor per expert.
                    lead0 = idx[:1]
                    if slab_key != (m.path, lead0):
                        value = flat[m.path].get_value()
                        slab = np.asarray(jax.device_get(value[lead0] if lead0 else value))
                        slab_key = (m.path, lead0)
                    local = slab[idx[1:]] if len(idx) > 1 else slab
                    tensors[key] = np.ascontiguousarray(m.to_hf(np.asarray(local)).astype(dt))
                    weight_map[key] = name
                    bar.update(1)
                safetensors.numpy.save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            hf_cfg = cfg.to_hf_config()
            hf_cfg["torch_dtype"] = str(np.dtype(out_dtype).name)
            json.dump(hf_cfg, f, indent=2)
        if len(shards) > 1:
            total = sum(int(np.prod(m.hf_shape)) * dt.itemsize for _, m, _, dt in plan)
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f, indent=2)
        # Remove files a previous save left that this layout does not use, then move ours in, index last.
        stale = [n for n in os.listdir(path) if n.endswith(".safetensors") or n == INDEX_FILE]
        for n in stale:
            if n not in names:
                os.remove(os.path.join(path, n))
        for n in [*names, "config.json", *([INDEX_FILE] if len(shards) > 1 else [])]:
            os.replace(os.path.join(tmp, n), os.path.join(path, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Saved %s to %s (%d file(s))", cfg.model_type, path, len(names))
