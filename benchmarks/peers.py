"""The peer every CPU benchmark measures against: transformers' PyTorch ERNIE with the same weights as ours."""

from __future__ import annotations

import tempfile

import jax.numpy as jnp

import ernie_jax
from ernie_jax.config import ErnieConfig
from ernie_jax.model import with_options
from ernie_jax.training.config import load_preset


def tiny_pair(seed: int = 0):
    """(config, transformers model in fp32, ernie-jax model in fp32): the tiny preset's architecture (a shrunk
    21B-A3B layout) with random weights that transformers draws and writes, and ernie-jax loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    # transformers has no MTP head: the pair is the main model only.
    preset = load_preset("tiny")
    cfg: ErnieConfig = preset.model.replace(num_nextn_predict_layers=0)
    hf_cfg = cfg.to_hf_config()
    model_type = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures")
    torch.manual_seed(seed)
    torch_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_cfg)).float()
    path = tempfile.mkdtemp(prefix="ernie-bench-")
    torch_model.save_pretrained(path)
    # Run as the preset trains it (its remat policy); inference is unaffected by remat.
    ours = with_options(ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False), remat=preset.remat)
    return cfg, torch_model, ours
