"""Optimizer: global-norm clipping + AdamW with warmup and cosine/linear decay; no decay on norms and biases.

Which parameters decay is each parameter's own `weight_decay` metadata, set where it is created
(`ernie_jax.layers.make_param`), never its name. The router correction bias is not an `nnx.Param` (it is a
`CorrectionBias` variable), so the optimizer never sees it: the aux-free rule (`ernie_jax.moe`) updates it.
"""

from __future__ import annotations

import jax
import optax
from flax import nnx

from ernie_jax.training.config import OptimConfig


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
    """The parameter's `weight_decay` metadata (matrices decay; norm scales and biases do not). A parameter made
    without it is refused: guessing from its name or shape would silently decay a bias or spare a matrix."""
    meta = var.get_metadata()
    if "weight_decay" not in meta:
        raise ValueError(
            f"{'.'.join(map(str, path))}: parameter has no weight_decay metadata; create it with "
            "ernie_jax.layers.make_param (or pass weight_decay=True/False to the nnx.Param)"
        )
    return bool(meta["weight_decay"])


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
