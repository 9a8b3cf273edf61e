"""The pieces of the jitted train step shared by the trainer (`ernie_jax.train`) and the AOT compiler
(`ernie_jax.aot`): the model constructor, optimizer-state shardings, the batch sharding and the jitted step."""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

import sharding
from ernie_jax.config import ConfigError, ErnieConfig
from ernie_jax.model import ErnieForCausalLM, ModelOptions
from ernie_jax.train_config import TrainConfig
from ernie_jax.train_step import make_train_step

BATCH_KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")
BATCH_DTYPES = {"input_ids": jnp.int32, "targets": jnp.int32, "segment_ids": jnp.int32, "positions": jnp.int32}


def model_options(cfg: TrainConfig) -> ModelOptions:
    return ModelOptions(remat=cfg.remat, attention_impl=cfg.attention_impl, gmm_impl=cfg.gmm_impl)


def model_creator(cfg: TrainConfig, model_cfg: ErnieConfig | None = None):
    """A no-argument function building the model: fp32 master weights, compute in cfg.dtype."""
    options = model_options(cfg)

    def create():
        return ErnieForCausalLM(
            model_cfg or cfg.model,
            rngs=nnx.Rngs(cfg.seed),
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.float32,
            options=options,
        )

    return create


def _key_str(path) -> tuple[str, ...]:
    return tuple(str(k) for k in path)


def opt_state_shardings(optimizer: optax.GradientTransformation, params, param_shardings, mesh: Mesh):
    """Shardings for `optimizer.init(params)`: every parameter-shaped leaf (Adam moments) takes its parameter's
    sharding, matched by key path suffix and shape; everything else (step counts) is replicated.

    Without this, `jit(optimizer.init)` leaves the moments unsharded (they do not depend on the parameters' data).
    """
    by_path = {}
    for (path, p), s in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(param_shardings), strict=True
    ):
        by_path[_key_str(path)] = (tuple(p.shape), s)
    replicated = sharding.replicated(mesh)
    abstract = jax.eval_shape(optimizer.init, params)

    def one(path, leaf):
        key = _key_str(path)
        for i in range(len(key)):
            hit = by_path.get(key[i:])
            if hit is not None and hit[0] == tuple(leaf.shape):
                return hit[1]
        return replicated

    return jax.tree_util.tree_map_with_path(one, abstract)


def batch_sharding(cfg: TrainConfig, mesh: Mesh) -> NamedSharding:
    """The global batch's sharding ([B, T] over the batch axes); checks that the batch divides the shards."""
    spec = sharding.logical_to_spec(("batch", None), mesh)
    shards = int(np.prod([mesh.shape[a] for a in sharding.rules.axes_tuple(spec[0])] or [1]))
    if cfg.data.global_batch_size % shards:
        raise ConfigError(
            f"data.global_batch_size: {cfg.data.global_batch_size} is not divisible by the {shards} "
            "batch shards of the mesh (data * fsdp * expert)"
        )
    micro = cfg.data.global_batch_size // cfg.optim.grad_accum
    if micro % shards:
        # Each micro-batch is split over the same shards; with a remainder XLA replicates rows and repeats their
        # work (a47b on 128 chips with grad_accum 8: compiled/model FLOPs 2.22 instead of 1.32). Correct, but slow.
        logging.getLogger(__name__).warning(
            "optim.grad_accum: micro-batches of %d rows (%d / %d) do not divide over the %d batch shards of the mesh, "
            "so some rows are computed on several devices; use a grad_accum with global_batch_size / grad_accum a "
            "multiple of %d",
            micro,
            cfg.data.global_batch_size,
            cfg.optim.grad_accum,
            shards,
            shards,
        )
    return NamedSharding(mesh, spec)


def abstract_batch(cfg: TrainConfig, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    shape = (cfg.data.global_batch_size, cfg.data.seq_len)
    sh = batch_sharding(cfg, mesh)
    return {k: jax.ShapeDtypeStruct(shape, BATCH_DTYPES.get(k, jnp.float32), sharding=sh) for k in BATCH_KEYS}


def jit_train_step(cfg: TrainConfig, graphdef, optimizer, mesh: Mesh, param_sh, bias_sh, opt_sh):
    """The trainer's step, jitted with explicit in/out shardings (so it compiles once) and donated state."""
    batch_sh = {k: batch_sharding(cfg, mesh) for k in BATCH_KEYS}
    scalar_sh = sharding.replicated(mesh)
    return jax.jit(
        make_train_step(graphdef, cfg, optimizer),
        donate_argnums=(0, 1, 2),
        in_shardings=(param_sh, bias_sh, opt_sh, batch_sh, scalar_sh),
        out_shardings=(param_sh, bias_sh, opt_sh, None),
    )
