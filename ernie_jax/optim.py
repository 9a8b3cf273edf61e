"""Optimizer: global-norm clipping + AdamW with warmup and cosine/linear decay; no decay on norms and biases.

The router correction bias is not an `nnx.Param` (it is a `CorrectionBias` variable), so the optimizer never sees it:
the aux-free rule in train_step.py updates it.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from ernie_jax.train_config import OptimConfig

_BIAS_NAMES = {"bq", "bk", "bv", "bo", "lm_head_bias"}


def lr_schedule(cfg: OptimConfig, total_steps: int) -> optax.Schedule:
    warmup = min(cfg.warmup_steps, max(total_steps - 1, 0))
    floor = cfg.lr * cfg.min_lr_ratio
    decay_steps = max(total_steps - warmup, 1)
    if cfg.decay == "cosine":
        decay = optax.cosine_decay_schedule(cfg.lr, decay_steps, alpha=cfg.min_lr_ratio)
    elif cfg.decay == "linear":
        decay = optax.linear_schedule(cfg.lr, floor, decay_steps)
    else:
        decay = optax.constant_schedule(cfg.lr)
    if warmup == 0:
        return decay
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, warmup), decay], [warmup])


def decays(path: tuple, var: nnx.Variable) -> bool:
    """Weight decay applies to matrices only: not to norm scales or biases."""
    name = str(path[-1])
    axes = var.get_metadata().get("logical_axes", ())
    return not (name in _BIAS_NAMES or name.endswith("_bias") or (axes and axes[-1] == "norm"))


def make_optimizer(cfg: OptimConfig, total_steps: int, params: nnx.State) -> optax.GradientTransformation:
    mask = nnx.map_state(lambda path, var: var.replace(decays(path, var)), params)
    mask = jax.tree.map(bool, mask)
    chain = []
    if cfg.clip_norm > 0:
        chain.append(optax.clip_by_global_norm(cfg.clip_norm))
    chain.append(
        optax.adamw(
            lr_schedule(cfg, total_steps), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=cfg.weight_decay, mask=mask
        )
    )
    return optax.chain(*chain)
