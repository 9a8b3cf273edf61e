"""The peer every CPU benchmark measures against (transformers' PyTorch ERNIE with the same weights as ours), and
what the CPU benchmarks time on our side: the tiny preset's model, run as the preset trains it, and its step."""

from __future__ import annotations

import tempfile

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import ernie_jax
from ernie_jax.config import ErnieConfig
from ernie_jax.model import with_options
from ernie_jax.training.config import load_preset
from ernie_jax.training.losses import cross_entropy_sum


def tiny_benchmark_model() -> tuple[ErnieConfig, dict]:
    """(the tiny preset's model config without its MTP head, the preset's run options that change speed: its remat
    policy and scan_layers, as `with_options` keywords). transformers has no MTP head, so every side-by-side CPU
    benchmark measures the main model only."""
    preset = load_preset("tiny")
    options = preset.model_options()
    return preset.model.replace(num_nextn_predict_layers=0), dict(remat=options.remat, scan_layers=options.scan_layers)


def train_step(graphdef, optimizer: optax.GradientTransformation):
    """(params, rest, opt_state, inputs [B, T], targets [B, T]) -> (params, opt_state, loss): mean next-token
    cross-entropy, its gradient and one optimizer update; the step the CPU benchmarks jit and time."""

    def step(params, rest, opt_state, inputs, targets):
        def loss_fn(p):
            logits = nnx.merge(graphdef, p, rest)(inputs)  # [B, T, V]
            return cross_entropy_sum(logits, targets, jnp.ones(targets.shape)) / targets.size

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def tiny_pair(seed: int = 0):
    """(config, transformers model in fp32, ernie-jax model in fp32): the tiny preset's architecture (a shrunk
    21B-A3B layout) with random weights that transformers draws and writes, and ernie-jax loads."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg, options = tiny_benchmark_model()
    hf_cfg = cfg.to_hf_config()
    model_type = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures")
    torch.manual_seed(seed)
    torch_model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_cfg)).float()
    path = tempfile.mkdtemp(prefix="ernie-bench-")
    torch_model.save_pretrained(path)
    # Run as the preset trains it (its remat policy and layer scan); inference is unaffected by remat.
    ours = with_options(ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False), **options)
    return cfg, torch_model, ours
