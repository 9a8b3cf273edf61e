"""The train state, built in one place for the trainer (real arrays) and the AOT report (abstract ones).

    state = build_train_state(cfg, mesh)                      # weights on their shardings, optimizer initialised
    state = build_train_state(cfg, mesh, abstract=True,       # ShapeDtypeStructs carrying the same shardings
                              platform="tpu")                 # (kernels traced for a TPU slice from a CPU host)
    step = jit_train_step(cfg, state, mesh)                   # the jitted step over exactly these shardings

The model is split by variable type: `params` (every nnx.Param: fp32 master weights, plus LoRA adapters when
lora.rank > 0, plus the frozen base's `QuantizedVariable`s (codes and scales) when lora.base_dtype is int8 or
nf4), `biases` (the router `CorrectionBias`es, updated by the aux-free rule, not by the optimizer) and the static
graphdef. The optimizer state covers `trainable_params(params, cfg)`: all parameters, or only the adapters of a
LoRA run; quantized weights are not Params, so no filter of trainable parameters can select them. They ride in
`params` (the step's frozen part, checkpointed with it) rather than in a group of their own, so the step and
the loop carry them without knowing about them.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding

import sharding
from ernie_jax.config import ConfigError, ErnieConfig
from ernie_jax.data import BATCH_DTYPES, VL_BATCH_DTYPES, batch_keys
from ernie_jax.data.schema import VL_PATCH_KEYS
from ernie_jax.hf.checkpoint import from_pretrained
from ernie_jax.lora import add_adapters, convert_base
from ernie_jax.model import ErnieForCausalLM
from ernie_jax.moe import CorrectionBias
from ernie_jax.quant import QuantizedVariable
from ernie_jax.training.config import TrainConfig
from ernie_jax.training.optim import make_optimizer
from ernie_jax.training.step import make_train_step, trainable_params
from ernie_jax.vl import ErnieVLForConditionalGeneration, VLConfig


@dataclasses.dataclass
class TrainState:
    """What a train step reads and writes, with the shardings it lives on (arrays or ShapeDtypeStructs)."""

    graphdef: nnx.GraphDef
    params: nnx.State
    biases: nnx.State
    opt_state: Any
    optimizer: optax.GradientTransformation
    model_config: ErnieConfig  # the preset's, or the --init-from-hf checkpoint's architecture
    param_shardings: nnx.State
    bias_shardings: nnx.State
    opt_shardings: Any


def split_model(model: nnx.Module) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graphdef, params, biases): every nnx.Param and frozen quantized weight, and the router correction biases."""
    graphdef, params, biases = nnx.split(model, (nnx.Param, QuantizedVariable), CorrectionBias)
    return graphdef, params, biases


def model_creator(cfg: TrainConfig, platform: str = "auto"):
    """A no-argument function building the preset's model (fp32 master weights, compute in cfg.dtype) with its
    LoRA adapters (B = 0) when lora.rank > 0, and its frozen base in lora.base_dtype."""

    # The model class follows the config's type: an ErnieConfig is a text model, a VLConfig ERNIE-4.5-VL.
    model_class = ErnieVLForConditionalGeneration if isinstance(cfg.model, VLConfig) else ErnieForCausalLM

    def create():
        model = model_class(
            cfg.model,
            rngs=nnx.Rngs(cfg.seed),
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.float32,
            options=cfg.model_options(platform),
        )
        return convert_base(add_adapters(model, cfg.lora, seed=cfg.seed), cfg.lora)

    return create


def build_model(cfg: TrainConfig, mesh: Mesh) -> ErnieForCausalLM:
    """The model with real weights, every parameter born on its sharding: from --init-from-hf, or initialised."""
    if cfg.init_from_hf:
        model = from_pretrained(
            cfg.init_from_hf,
            dtype=jnp.dtype(cfg.dtype),
            param_dtype=jnp.float32,
            mesh=mesh,
            options=cfg.model_options(),
        )
        # QLoRA: the loaded base is quantized here, before training, each weight on its mesh placement.
        return convert_base(add_adapters(model, cfg.lora, seed=cfg.seed, mesh=mesh), cfg.lora)
    create = model_creator(cfg)
    graphdef, abstract_state = nnx.split(nnx.eval_shape(create))
    state = jax.jit(lambda: nnx.state(create()), out_shardings=sharding.state_shardings(abstract_state, mesh))()
    return nnx.merge(graphdef, state)


def build_train_state(
    cfg: TrainConfig, mesh: Mesh, *, abstract: bool = False, platform: str = "auto", model: nnx.Module | None = None
) -> TrainState:
    """The train state of `cfg` on `mesh`. abstract: ShapeDtypeStructs (nothing allocated), for AOT compiles;
    `platform` is then the platform kernels are traced for. model: an already built model to start from."""
    if model is None:
        model = nnx.eval_shape(model_creator(cfg, platform)) if abstract else build_model(cfg, mesh)
    graphdef, params, biases = split_model(model)
    param_sh = sharding.state_shardings(params, mesh)
    bias_sh = sharding.state_shardings(biases, mesh)
    trainable = trainable_params(params, cfg)
    trainable_sh = trainable_params(param_sh, cfg)
    optimizer = make_optimizer(cfg.optim, cfg.steps, trainable)
    # Adam moments on their parameters' shardings, scalars replicated (jit alone would leave them unsharded).
    opt_sh = opt_state_shardings(optimizer, trainable, trainable_sh, mesh)
    if abstract:
        with_sharding = lambda tree, shardings: jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings
        )
        params, biases = with_sharding(params, param_sh), with_sharding(biases, bias_sh)
        opt_state = with_sharding(jax.eval_shape(optimizer.init, trainable), opt_sh)
    else:
        opt_state = jax.jit(optimizer.init, out_shardings=opt_sh)(trainable)
    return TrainState(graphdef, params, biases, opt_state, optimizer, model.config, param_sh, bias_sh, opt_sh)


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


def batch_shapes(cfg: TrainConfig) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """(shape, dtype) of every array of the global batch (ernie_jax.data.schema): [B, T] for the text keys; VL
    batches add [B, T] token keys and [B, P] / [B, P, C] image patch keys."""
    rows, dtypes = cfg.data.global_batch_size, {**BATCH_DTYPES, **VL_BATCH_DTYPES}
    out = {}
    for key in batch_keys(cfg.data.format):
        if key in VL_PATCH_KEYS:
            shape = (rows, cfg.data.vision_patches) + ((cfg.model.vision.patch_dim,) if key == "pixel_values" else ())
        else:
            shape = (rows, cfg.run_data.row_len)
        out[key] = (shape, dtypes[key])
    return out


def batch_shardings(cfg: TrainConfig, mesh: Mesh) -> dict[str, NamedSharding]:
    """Every batch array split over the batch axes by its rows (a pixel row [P, C] travels with its token row)."""
    batch_sharding(cfg, mesh)  # checks that the batch divides over the shards
    return {
        key: sharding.named_sharding(("batch",) + (None,) * (len(shape) - 1), mesh)
        for key, (shape, _) in batch_shapes(cfg).items()
    }


def abstract_batch(cfg: TrainConfig, mesh: Mesh) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch of the schema (ernie_jax.data.schema) as ShapeDtypeStructs on its shardings."""
    shardings = batch_shardings(cfg, mesh)
    return {
        key: jax.ShapeDtypeStruct(shape, dtype, sharding=shardings[key])
        for key, (shape, dtype) in batch_shapes(cfg).items()
    }


def jit_train_step(cfg: TrainConfig, state: TrainState, mesh: Mesh):
    """The trainer's step, jitted with explicit in/out shardings (so it compiles once) and donated state:
    step(params, biases, opt_state, batch, step_index) -> (params, biases, opt_state, metrics)."""
    batch_sh = batch_shardings(cfg, mesh)
    scalar_sh = sharding.replicated(mesh)
    shardings = (state.param_shardings, state.bias_shardings, state.opt_shardings)
    return jax.jit(
        make_train_step(state.graphdef, cfg, state.optimizer),
        donate_argnums=(0, 1, 2),
        in_shardings=(*shardings, batch_sh, scalar_sh),
        out_shardings=(*shardings, None),
    )
