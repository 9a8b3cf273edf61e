"""Load and save ERNIE 4.5 VL checkpoints: config.json + safetensors in the layout transformers' save_pretrained writes.

Loading streams like the text models' loader: every parameter is built with `jax.make_array_from_callback` from the
memory-mapped safetensors files, one HF tensor at a time, so the checkpoint is never held whole in host memory;
with `mesh=` each device reads only its own slice.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from tqdm.auto import tqdm

import sharding
from ernie_jax.hf.checkpoint import INDEX_FILE, SINGLE_FILE, CheckpointError, SafetensorsReader
from ernie_jax.model import ModelOptions
from ernie_jax.vl.config import VLConfig
from ernie_jax.vl.model import ErnieVLForConditionalGeneration, abstract_model
from ernie_jax.vl.names import VLTensorMap, is_ignored_hf_key, tensor_maps

log = logging.getLogger(__name__)

DEFAULT_MAX_SHARD_BYTES = 5 * 2**30


def _validate(reader: SafetensorsReader, cfg: VLConfig, maps: list[VLTensorMap]) -> None:
    expected = {key: m.hf_shape for m in maps for key in m.hf_keys.reshape(-1)}
    present = set(reader.keys())
    missing = [k for k in expected if k not in present]
    if missing:
        raise CheckpointError(
            f"{reader.directory}: {len(missing)} tensor(s) the config needs are missing from the checkpoint, "
            f"e.g. {missing[:5]}. Is config.json from the same model?"
        )
    extra = sorted(k for k in present if k not in expected and not is_ignored_hf_key(k, cfg))
    if extra:
        raise CheckpointError(
            f"{reader.directory}: {len(extra)} tensor(s) in the checkpoint are not part of this config's model, "
            f"e.g. {extra[:5]}. Is config.json from the same model?"
        )
    for key, want in expected.items():
        got = reader.shape(key)
        if got != want:
            raise CheckpointError(f"{key}: checkpoint has shape {list(got)}, the config expects {list(want)}")


def _filler(reader: SafetensorsReader, m: VLTensorMap, np_dtype):
    """The callback that fills one device's slice of parameter `m`, reading only the HF tensors it covers."""
    lead = m.hf_keys.ndim

    def read_local(key: str) -> np.ndarray:
        try:
            return m.to_local(reader.read(key))
        except Exception as err:  # a tensor that reads but does not transform: name it
            raise CheckpointError(f"{key}: cannot be read into {m.name}: {err}") from err

    def fill(index: tuple[slice, ...]) -> np.ndarray:
        rest = index[lead:]
        if lead == 0:
            return np.ascontiguousarray(read_local(str(m.hf_keys))[rest].astype(np_dtype))
        keys = m.hf_keys[index[:lead]]
        out = None
        for idx in np.ndindex(keys.shape):
            piece = read_local(keys[idx])[rest].astype(np_dtype)
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
) -> ErnieVLForConditionalGeneration:
    """Load an `ernie4_5_vl_moe` checkpoint directory (config.json + model.safetensors or an index with shards).

    Args:
      dtype: compute dtype, and parameter dtype unless `param_dtype` is given. Routers and correction biases
        always stay fp32.
      mesh: if given, every parameter is placed on its sharding (sharding.rules) as it is read.
    """
    cfg = VLConfig.from_hf_config(path)
    reader = SafetensorsReader(path)
    maps = tensor_maps(cfg)
    _validate(reader, cfg, maps)
    param_dtype = dtype if param_dtype is None else param_dtype
    graphdef, state = nnx.split(abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, options=options))
    flat = dict(nnx.to_flat_state(state))
    if set(flat) != {m.path for m in maps}:
        raise AssertionError(f"internal: VL name map out of sync with the model: {set(flat) ^ {m.path for m in maps}}")
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
            flat[m.path] = var.replace(jax.make_array_from_callback(m.shape, target, _filler(reader, m, np_dtype)))
            bar.update(int(np.prod(m.shape)))
    model = nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))
    log.info("Loaded %s from %s", cfg.model_type, path)
    return model


def _hf_tensor_plan(maps: list[VLTensorMap]) -> dict[str, list[tuple[VLTensorMap, tuple[int, ...]]]]:
    """HF name -> the (parameter, lead index) slices it is made of (two for the shared correction-bias tensor)."""
    plan: dict[str, list[tuple[VLTensorMap, tuple[int, ...]]]] = {}
    for m in maps:
        for idx in np.ndindex(m.hf_keys.shape):
            plan.setdefault(str(m.hf_keys[idx]), []).append((m, idx))
    return plan


def save_pretrained(
    model: ErnieVLForConditionalGeneration,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
) -> None:
    """Write `model` as a transformers `ernie4_5_vl_moe` checkpoint (config.json + safetensors, sharded with an index
    past `max_shard_bytes`). Files are written under temporary names and moved into place when complete, the index
    last. dtype: of the written tensors (default: the parameters'); routers and correction biases stay fp32."""
    path = os.fspath(path)
    cfg = model.config
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    out_dtype = np.dtype(dtype or flat[("embed",)].get_value().dtype)
    plan = _hf_tensor_plan(tensor_maps(cfg))
    nbytes = {
        key: int(np.prod(parts[0][0].hf_shape)) * (4 if parts[0][0].keep_fp32 else out_dtype.itemsize)
        for key, parts in plan.items()
    }
    shards: list[list[str]] = [[]]
    size = 0
    for key in plan:
        if shards[-1] and size + nbytes[key] > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(key)
        size += nbytes[key]
    names = (
        [SINGLE_FILE]
        if len(shards) == 1
        else [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
    )
    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ernie-vl-save-", dir=path)
    slabs: dict[tuple, np.ndarray] = {}  # one layer's (or the whole parameter's) values fetched at a time

    def local_value(m: VLTensorMap, idx: tuple[int, ...]) -> np.ndarray:
        slab_key = (m.path, idx[:1])
        if slab_key not in slabs:
            slabs.clear()
            value = flat[m.path].get_value()
            slabs[slab_key] = np.asarray(jax.device_get(value[idx[:1]] if idx else value))
        slab = slabs[slab_key]
        return slab[idx[1:]] if len(idx) > 1 else slab

    weight_map: dict[str, str] = {}
    try:
        with tqdm(total=len(plan), unit="tensor", desc="saving", disable=not progress) as bar:
            for name, keys in zip(names, shards, strict=True):
                tensors = {}
                for key in keys:
                    parts = plan[key]
                    dt = np.dtype(np.float32) if parts[0][0].keep_fp32 else out_dtype
                    if parts[0][0].part is None:
                        m, idx = parts[0]
                        tensor = m.to_hf(local_value(m, idx))
                    else:  # rows of one HF tensor held by several parameters
                        tensor = np.zeros(parts[0][0].hf_shape, dt)
                        for m, idx in parts:
                            tensor[m.part] = m.to_hf(local_value(m, idx))
                    tensors[key] = np.ascontiguousarray(np.asarray(tensor).astype(dt))
                    weight_map[key] = name
                    bar.update(1)
                safetensors.numpy.save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**cfg.to_hf_config(), "dtype": out_dtype.name}, f, indent=2)
        if len(shards) > 1:
            with open(os.path.join(tmp, INDEX_FILE), "w") as f:
                json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, f, indent=2)
        # Remove files a previous save left that this layout does not use, then move ours in, index last.
        for n in os.listdir(path):
            if (n.endswith(".safetensors") or n == INDEX_FILE) and n not in names:
                os.remove(os.path.join(path, n))
        for n in [*names, "config.json", *([INDEX_FILE] if len(shards) > 1 else [])]:
            os.replace(os.path.join(tmp, n), os.path.join(path, n))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log.info("Saved %s to %s (%d file(s))", cfg.model_type, path, len(names))
