"""The functional train step: loss, gradient accumulation, AdamW, aux-free bias update, non-finite guard.

The state comes from `ernie_jax.training.state` (split by variable type: fp32 master `params`, the router
correction `biases`, the static `graphdef`). The step is a pure function of arrays, jitted with explicit
shardings by `state.jit_train_step`; the batch follows `ernie_jax.data.schema`.

In a LoRA run (`lora.rank > 0`) only the adapters (`LoRAParam`) are differentiated and optimised: the step splits
`params` by variable type into the trainable adapters and the frozen base, and the router biases stay as loaded.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from ernie_jax.data import BATCH_KEYS
from ernie_jax.lora import LoRAParam
from ernie_jax.moe import CorrectionBias, update_correction_biases
from ernie_jax.training.config import TrainConfig
from ernie_jax.training.losses import (
    chunked_cross_entropy_sum,
    cross_entropy_sum,
    mtp_targets,
    orthogonal_loss,
    sum_router_stats,
    total_loss,
)

Batch = dict[str, jax.Array]  # the schema of ernie_jax/data/schema.py: [B, T] arrays


def trainable_filter(cfg: TrainConfig):
    """The variable type the optimizer updates: the adapters of a LoRA run, else every parameter."""
    return LoRAParam if cfg.lora.enabled else nnx.Param


def trainable_params(params: nnx.State, cfg: TrainConfig) -> nnx.State:
    """The part of `params` that gets gradients and optimizer state."""
    return nnx.filter_state(params, trainable_filter(cfg))


def modality_inputs(batch: Batch) -> Batch:
    """The batch arrays past the text schema (a VL batch's 3D positions, token types and image patches), passed to
    the model by their names (ernie_jax.data.schema); a text batch has none."""
    return {key: value for key, value in batch.items() if key not in BATCH_KEYS}


def make_train_step(graphdef: nnx.GraphDef, cfg: TrainConfig, optimizer: optax.GradientTransformation):
    """Returns step(params, biases, opt_state, batch) -> (params, biases, opt_state, metrics).

    opt_state is the optimizer's state for `trainable_params(params, cfg)`."""
    coef = cfg.moe_loss
    accum = cfg.optim.grad_accum
    trainable_type = trainable_filter(cfg)
    # A LoRA run leaves the base model as loaded, routing included, so the adapters apply to it unchanged.
    bias_update_rate = 0.0 if cfg.lora.enabled else coef.bias_update_rate

    seq_len, depth = cfg.data.seq_len, cfg.mtp.depth

    def loss_fn(trainable, frozen, biases, batch: Batch, num_tokens: jax.Array, dropout_key=None):
        model = nnx.merge(graphdef, trainable, frozen, biases)
        params = nnx.merge_state(trainable, frozen)

        def ce_sum_of(h, targets, mask):  # the LM head and the masked CE sum, a chunk at a time if asked
            if cfg.loss_chunk:
                return chunked_cross_entropy_sum(h, model.logits_from_hidden, targets, mask, cfg.loss_chunk)
            return cross_entropy_sum(model.logits_from_hidden(h), targets, mask)

        main = {k: v[:, :seq_len] for k, v in batch.items()} if depth else batch  # rows carry T + depth tokens
        mtp = dict(return_mtp_logits=True, mtp_input_ids=batch["input_ids"]) if depth else {}
        outputs = model(
            main["input_ids"],
            positions=main["positions"],
            segment_ids=main["segment_ids"],
            return_aux=True,
            return_hidden=True,
            **mtp,
            **({} if dropout_key is None else dict(dropout_key=dropout_key)),  # LoRA adapter dropout
            **modality_inputs(main),
        )
        h, mtp_hidden, aux = outputs if depth else (outputs[0], [], outputs[1])  # [B, T, D], depth x [B, T, D]
        ce_sum = ce_sum_of(h, main["targets"], main["loss_mask"])
        # CE is normalised by the whole global batch's token count, so accumulation is exact; router terms are
        # per micro-batch means, averaged over micro-batches. Each MTP depth is normalised by its own count.
        terms = dict(
            aux_loss=sum_router_stats(aux["router_stats"], "aux_loss") / accum,
            z_loss=sum_router_stats(aux["router_stats"], "z_loss") / accum,
            ortho_loss=orthogonal_loss(params) / accum,
        )
        loss = total_loss(coef, ce_sum / num_tokens[0], terms["aux_loss"], terms["z_loss"], terms["ortho_loss"])
        if depth:
            depth_ce = [
                ce_sum_of(hd, targets, mask) / count
                for hd, (targets, mask), count in zip(
                    mtp_hidden, mtp_targets(batch, seq_len, depth), num_tokens[1:], strict=True
                )
            ]
            terms["mtp_loss"] = sum(depth_ce) / depth
            loss = loss + cfg.mtp.loss_weight * terms["mtp_loss"]
        counts = [[None if s is None else s.tokens_per_expert for s in group] for group in aux["router_stats"]]
        dropped = sum_router_stats(aux["router_stats"], "dropped")
        return loss, dict(ce_sum=ce_sum, counts=counts, dropped=dropped, **terms)

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(params, biases, opt_state, batch: Batch, step_index: jax.Array):
        # Learned tokens of the whole global batch: the main model's, then each MTP depth's. [1 + depth]
        masks = [batch["loss_mask"][:, :seq_len], *(mask for _, mask in mtp_targets(batch, seq_len, depth))]
        num_tokens = jnp.maximum(jnp.stack([jnp.sum(m) for m in masks]), 1.0)
        trainable, frozen = nnx.split_state(params, trainable_type, ...)  # frozen is empty unless LoRA
        # Adapter dropout keys come from the seed and the step number alone, so a resumed run draws the same.
        step_key = jax.random.fold_in(jax.random.key(cfg.seed), step_index) if cfg.lora.dropout else None
        if accum == 1:
            (_, metrics_sum), grads_sum = grad_fn(trainable, frozen, biases, batch, num_tokens, step_key)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)
            micro_keys = None if step_key is None else jax.random.split(step_key, accum)

            def one(carry, inputs):
                mb, key = inputs
                (_, metrics), grads = grad_fn(trainable, frozen, biases, mb, num_tokens, key)
                return jax.tree.map(jnp.add, carry, (grads, metrics)), None

            first = jax.tree.map(lambda x: x[0], micro)
            metrics_shape = jax.eval_shape(lambda: loss_fn(trainable, frozen, biases, first, num_tokens))[1]
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (trainable, metrics_shape))
            (grads_sum, metrics_sum), _ = jax.lax.scan(one, zeros, (micro, micro_keys))
        grads = grads_sum
        ce = metrics_sum["ce_sum"] / num_tokens[0]
        loss = total_loss(coef, ce, metrics_sum["aux_loss"], metrics_sum["z_loss"], metrics_sum["ortho_loss"])
        if depth:
            loss = loss + cfg.mtp.loss_weight * metrics_sum["mtp_loss"]
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        new_biases = _updated_biases(graphdef, params, biases, metrics_sum["counts"], bias_update_rate)
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        # A non-finite step never changes the state, whatever cfg.nonfinite says (the host counts it, or stops):
        # so no checkpoint can be written from a poisoned state.
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
        new_trainable, new_opt_state, new_biases = (
            keep(new_trainable, trainable),
            keep(new_opt_state, opt_state),
            keep(new_biases, biases),
        )
        new_params = nnx.merge_state(new_trainable, frozen)
        load = _load_stats(metrics_sum["counts"])
        metrics = dict(
            loss=loss,
            ce=ce,
            aux_loss=metrics_sum["aux_loss"],
            z_loss=metrics_sum["z_loss"],
            ortho_loss=metrics_sum["ortho_loss"],
            grad_norm=grad_norm,
            finite=finite,
            tokens=num_tokens[0],
            **({"mtp_loss": metrics_sum["mtp_loss"]} if depth else {}),
            moe_dropped=metrics_sum["dropped"],  # assignments a bounded EP buffer dropped (mesh.moe_buffer_factor)
            **load,
        )
        return new_params, new_biases, new_opt_state, metrics

    return step


def _updated_biases(graphdef, params, biases: nnx.State, counts: list, rate: float) -> nnx.State:
    """The correction biases after the aux-free rule (ernie_jax.moe.update_correction_biases), which meets each
    MoE block's statistics through the model's own structure, not through state paths."""
    if rate == 0:
        return biases
    # copy=True: the update writes into the merged model's variables, which must not be `biases`' own (the
    # non-finite guard compares against the old biases).
    model = nnx.merge(graphdef, params, biases, copy=True)
    update_correction_biases(model, counts, rate)
    return nnx.state(model, CorrectionBias)


def _load_stats(counts: list) -> dict[str, jax.Array]:
    """Per MoE layer: max load / mean load (1 = balanced), plus the counts themselves for logging."""
    loads = [c for group in counts for c in group if c is not None]
    if not loads:
        return {}
    per_layer = jnp.concatenate(loads, axis=0)  # [n_moe_layers (group order), E]
    imbalance = jnp.max(per_layer, axis=-1) / jnp.maximum(jnp.mean(per_layer, axis=-1), 1e-9)
    return dict(expert_load=per_layer, load_imbalance=imbalance)


def as_metrics_dict(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k == "expert_load":
            continue
        v = jax.device_get(v)
        out[k] = [float(x) for x in v] if getattr(v, "ndim", 0) else float(v)
    return out
