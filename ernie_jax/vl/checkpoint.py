"""Load and save ERNIE 4.5 VL checkpoints: config.json + safetensors in the layout transformers' save_pretrained writes.

Loading streams like the text models' loader: every parameter is built with `jax.make_array_from_callback` from the
memory-mapped safetensors files, one HF tensor at a time, so the checkpoint is never held whole in host memory;
with `mesh=` each device reads only its own slice.
"""

from __future__ import annotations

import logging
import os

import jax
import jax.numpy as jnp

import sharding
from ernie_jax.hf.checkpoint import SafetensorsReader
from ernie_jax.hf.transfer import DEFAULT_MAX_SHARD_BYTES, load_parameters, validate_tensors, write_checkpoint
from ernie_jax.options import ModelOptions
from ernie_jax.vl.config import VLConfig
from ernie_jax.vl.model import ErnieVLForConditionalGeneration, abstract_model
from ernie_jax.vl.names import is_ignored_hf_key, tensor_maps

log = logging.getLogger(__name__)


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
    validate_tensors(reader, maps, lambda key: is_ignored_hf_key(key, cfg))
    param_dtype = dtype if param_dtype is None else param_dtype
    abstract = abstract_model(cfg, dtype=dtype, param_dtype=param_dtype, options=options)
    model = load_parameters(reader, abstract, maps, param_dtype=param_dtype, mesh=mesh, rules=rules, progress=progress)
    log.info("Loaded %s from %s", cfg.model_type, path)
    return model


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
    cfg = model.config
    names = write_checkpoint(
        model,
        tensor_maps(cfg),
        cfg.to_hf_config(),
        path,
        dtype=dtype,
        max_shard_bytes=max_shard_bytes,
        progress=progress,
        dtype_key="dtype",
    )
    log.info("Saved %s to %s (%d file(s))", cfg.model_type, path, len(names))
