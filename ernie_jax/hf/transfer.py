"""Moving parameters between a model and safetensors files, given its `TensorMap`s: one loader, one writer.

The text and VL bridges differ only in their name maps and config files; checking the tensors, streaming them
into (sharded) parameters and writing a checkpoint whole-or-not-at-all happen here, once.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
from flax import nnx
from tqdm.auto import tqdm

import sharding
from ernie_jax.hf.names import TensorMap

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
DEFAULT_MAX_SHARD_BYTES = 5 * 2**30
log = logging.getLogger(__name__)


class CheckpointError(ValueError):
    """The checkpoint does not match the config (missing, extra or mis-shaped tensors) or is unreadable."""


def validate_tensors(reader, maps: list[TensorMap], is_ignored: Callable[[str], bool]) -> list[str]:
    """Every tensor the maps need is there with its shape and nothing unknown is; returns the ignored keys present.

    Raises:
        CheckpointError: naming the missing, extra or mis-shaped tensors.
    """
    expected = {key: m.hf_shape for m in maps for key in m.hf_keys.reshape(-1)}
    present = set(reader.keys())
    missing = [k for k in expected if k not in present]
    if missing:
        raise CheckpointError(
            f"{reader.directory}: {len(missing)} tensor(s) the config needs are missing from the checkpoint, "
            f"e.g. {missing[:5]}. Is config.json from the same model?"
        )
    unknown = sorted(k for k in present if k not in expected)
    extra = [k for k in unknown if not is_ignored(k)]
    if extra:
        raise CheckpointError(
            f"{reader.directory}: {len(extra)} tensor(s) in the checkpoint are not part of this config's model, "
            f"e.g. {extra[:5]}. Is config.json from the same model?"
        )
    transposable = {key for m in maps if m.transposed_ok for key in m.hf_keys.reshape(-1)}
    for key, want in expected.items():
        got = tuple(reader.shape(key))
        if got != tuple(want) and key in transposable and got == tuple(want)[::-1]:
            log.info("%s is stored transposed (%s instead of %s): transposing it on load", key, list(got), list(want))
        elif got != tuple(want):
            raise CheckpointError(f"{key}: checkpoint has shape {list(got)}, the config expects {list(want)}")
    return [k for k in unknown if is_ignored(k)]


def _filler(reader, m: TensorMap, np_dtype):
    """The callback that fills one device's slice of parameter `m`, reading only the HF tensors it covers."""
    lead = m.hf_keys.ndim

    def read_local(key: str) -> np.ndarray:
        try:
            raw = reader.read(key)
            if m.transposed_ok and raw.shape != tuple(m.hf_shape) and raw.shape == tuple(m.hf_shape)[::-1]:
                raw = raw.T  # validate_tensors accepted (and logged) this copy's transposed layout
            return m.to_local(raw)
        except (ValueError, TypeError) as err:  # a tensor that reads but does not transform: name it
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


def check_names_cover(flat_state: dict, maps: list[TensorMap], action: str) -> None:
    """Every variable of the model has a Hugging Face name and every name a variable: a parameter the map does not
    know (an added module, unmerged LoRA adapters) would otherwise be silently left out of a save or a load."""
    ours, named = set(flat_state), {m.path for m in maps}
    if ours == named:
        return
    unnamed = sorted(".".join(map(str, p)) for p in ours - named)
    missing = sorted(".".join(map(str, p)) for p in named - ours)
    raise ValueError(
        f"{action}: the model does not match the Hugging Face layout: "
        + "; ".join(
            part
            for part in (
                unnamed
                and f"no HF name for {', '.join(unnamed)} (merge LoRA adapters with "
                "ernie_jax.lora.merge_adapters; other added modules cannot be written in this layout)",
                missing and f"missing {', '.join(missing)}",
            )
            if part
        )
    )


def load_parameters(reader, abstract: nnx.Module, maps: list[TensorMap], *, param_dtype, mesh, rules, progress):
    """`abstract` (a model of ShapeDtypeStructs) with every parameter read from `reader`, each straight onto its
    sharding (one device when `mesh` is None): `jax.make_array_from_callback` reads only the slice a device holds."""
    graphdef, state = nnx.split(abstract)
    flat = dict(nnx.to_flat_state(state))
    check_names_cover(flat, maps, "from_pretrained")
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
    return nnx.merge(graphdef, nnx.from_flat_state(list(flat.items())))


def write_checkpoint(
    model: nnx.Module,
    maps: list[TensorMap],
    hf_config: dict,
    path: str | os.PathLike,
    *,
    dtype=None,
    max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES,
    progress: bool = True,
    dtype_key: str = "torch_dtype",
) -> list[str]:
    """Write `model`'s parameters as HF tensors named by `maps`, plus config.json; returns the safetensors files.

    Shards past `max_shard_bytes` get an index. Files are written in a temporary directory and moved into place
    only when complete, the index last, so an interrupted save never leaves a checkpoint that looks whole. Tensors
    are written in `dtype` (default: the embedding's), except fp32-kept ones (routers, correction biases), and
    config.json records it under `dtype_key`.
    """
    path = os.fspath(path)
    flat = dict(nnx.to_flat_state(nnx.state(model)))
    check_names_cover(flat, maps, "save_pretrained")
    out_dtype = np.dtype(dtype or flat[("embed",)].get_value().dtype)
    plan: dict[str, list[tuple[TensorMap, tuple[int, ...]]]] = {}  # HF name -> the parameter slices it is made of
    for m in maps:
        for idx in np.ndindex(m.hf_keys.shape):
            plan.setdefault(str(m.hf_keys[idx]), []).append((m, idx))
    dtypes = {key: np.dtype(np.float32) if parts[0][0].keep_fp32 else out_dtype for key, parts in plan.items()}
    nbytes = {key: int(np.prod(parts[0][0].hf_shape)) * dtypes[key].itemsize for key, parts in plan.items()}
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
    slabs: dict[tuple, np.ndarray] = {}  # one repeat's values (e.g. all experts of one layer) fetched at a time

    def local_value(m: TensorMap, idx: tuple[int, ...]) -> np.ndarray:
        slab_key = (m.path, idx[:1])
        if slab_key not in slabs:
            slabs.clear()
            value = flat[m.path].get_value()
            slabs[slab_key] = np.asarray(jax.device_get(value[idx[:1]] if idx else value))
        slab = slabs[slab_key]
        return slab[idx[1:]] if len(idx) > 1 else slab

    os.makedirs(path, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".ernie-save-", dir=path)
    weight_map: dict[str, str] = {}
    try:
        with tqdm(total=len(plan), unit="tensor", desc="saving", disable=not progress) as bar:
            for name, keys in zip(names, shards, strict=True):
                tensors = {}
                for key in keys:
                    parts = plan[key]
                    if parts[0][0].part is None:
                        m, idx = parts[0]
                        tensor = m.to_hf(local_value(m, idx))
                    else:  # rows of one HF tensor held by several parameters
                        tensor = np.zeros(parts[0][0].hf_shape, dtypes[key])
                        for m, idx in parts:
                            tensor[m.part] = m.to_hf(local_value(m, idx))
                    tensors[key] = np.ascontiguousarray(np.asarray(tensor).astype(dtypes[key]))
                    weight_map[key] = name
                    bar.update(1)
                safetensors.numpy.save_file(tensors, os.path.join(tmp, name), metadata={"format": "pt"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump({**hf_config, dtype_key: out_dtype.name}, f, indent=2)
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
    return names
