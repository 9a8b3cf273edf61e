"""The functional train step: loss, gradient accumulation, AdamW, aux-free bias update, non-finite guard.

State is split once with `nnx.split(model, nnx.Param, CorrectionBias)`: fp32 master `params` (optimised),
`biases` (router correction biases, updated by the sign rule) and the static `graphdef`. The step is a pure
function of arrays, jitted with explicit shardings by the trainer.

In a LoRA run (`lora.rank > 0`) only the adapters (`LoRAParam`) are differentiated and optimised: the step splits
`params` by variable type into the trainable adapters and the frozen base, and the router biases stay as loaded.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import sharding
from ernie_jax.config import ErnieConfig
from ernie_jax.lora import LoRAParam
from ernie_jax.moe import CorrectionBias
from ernie_jax.train_config import TrainConfig

Batch = dict[str, jax.Array]  # input_ids, targets, segment_ids, positions [B, T] int32; loss_mask [B, T] float32


def cross_entropy_sum(logits: jax.Array, targets: jax.Array, mask: jax.Array) -> jax.Array:
    """Sum over masked tokens of -log softmax(logits)[target], in fp32. logits [B, T, V]."""
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((log_z - target_logit) * mask)


def chunked_cross_entropy_sum(
    h: jax.Array, head_fn: Callable[[jax.Array], jax.Array], targets: jax.Array, mask: jax.Array, chunk: int
) -> jax.Array:
    """cross_entropy_sum(head_fn(h), targets, mask), computed `chunk` tokens of the sequence at a time.

    The logits [B, T, V] in fp32 are the largest temporary of a training step (13.5 GB per chip for 21B-A3B at
    8 x 4096 tokens), so they are never formed whole: lax.scan runs one chunk after another, and jax.checkpoint on
    the chunk body makes the backward pass recompute that chunk's logits instead of keeping every chunk's as a
    residual. `head_fn` (h [B, C, D] -> logits [B, C, V]) closes over the head weights; scan's transpose carries
    their gradient across chunks and sums it, in the weights' dtype. h [B, T, D]; targets, mask [B, T].
    """
    b, t = targets.shape
    if chunk <= 0 or t % chunk:
        raise ValueError(f"loss_chunk: {chunk} must be a positive divisor of the sequence length {t}")
    n = t // chunk

    def to_chunks(x):  # [B, T, ...] -> [N, B, C, ...]: scan walks the leading axis
        return jnp.swapaxes(x.reshape(b, n, chunk, *x.shape[2:]), 0, 1)

    @functools.partial(jax.checkpoint, prevent_cse=False)  # inside scan there is nothing for CSE to merge
    def body(total, xs):
        h_c, targets_c, mask_c = xs  # [B, C, D], [B, C], [B, C]
        h_c = sharding.shard(h_c, "batch", "seq", "act_embed")
        return total + cross_entropy_sum(head_fn(h_c), targets_c, mask_c), None

    xs = (to_chunks(h), to_chunks(targets), to_chunks(mask))
    total, _ = jax.lax.scan(body, jnp.zeros((), jnp.float32), xs)
    return total


def router_orthogonal_loss(router_w: jax.Array) -> jax.Array:
    """Paddle's orthogonal loss per layer: rows of W [E, D] L2-normalised, mean of (W W^T - I)^2. router_w [R, D, E]."""
    w = jnp.swapaxes(router_w.astype(jnp.float32), -1, -2)  # [R, E, D]
    w = w / jnp.maximum(jnp.linalg.norm(w, axis=-1, keepdims=True), 1e-12)
    gram = jnp.einsum("RED,RFD->REF", w, w) - jnp.eye(w.shape[-2])
    return jnp.sum(jnp.mean(gram**2, axis=(-1, -2)))


def _moe_routers(params: nnx.State) -> list[jax.Array]:
    return [v.get_value() for path, v in nnx.to_flat_state(params) if path[-1] == "router"]


def _sum_stats(router_stats: list, field: str) -> jax.Array:
    leaves = [getattr(s, field) for group in router_stats for s in group if s is not None]
    return sum(jnp.sum(x) for x in leaves) if leaves else jnp.zeros(())


def trainable_filter(cfg: TrainConfig):
    """The variable type the optimizer updates: the adapters of a LoRA run, else every parameter."""
    return LoRAParam if cfg.lora.enabled else nnx.Param


def trainable_params(params: nnx.State, cfg: TrainConfig) -> nnx.State:
    """The part of `params` that gets gradients and optimizer state."""
    return nnx.filter_state(params, trainable_filter(cfg))


def make_train_step(graphdef: nnx.GraphDef, cfg: TrainConfig, optimizer: optax.GradientTransformation):
    """Returns step(params, biases, opt_state, batch) -> (params, biases, opt_state, metrics).

    opt_state is the optimizer's state for `trainable_params(params, cfg)`."""
    coef = cfg.moe_loss
    accum = cfg.optim.grad_accum
    trainable_type = trainable_filter(cfg)
    # A LoRA run leaves the base model as loaded, routing included, so the adapters apply to it unchanged.
    bias_update_rate = 0.0 if cfg.lora.enabled else coef.bias_update_rate

    def loss_fn(trainable, frozen, biases, batch: Batch, num_tokens: jax.Array):
        model = nnx.merge(graphdef, trainable, frozen, biases)
        params = nnx.merge_state(trainable, frozen)
        h, aux = model(
            batch["input_ids"],
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            return_aux=True,
            return_hidden=True,
        )  # [B, T, D]
        if cfg.loss_chunk:
            ce_sum = chunked_cross_entropy_sum(
                h, model.logits_from_hidden, batch["targets"], batch["loss_mask"], cfg.loss_chunk
            )
        else:
            ce_sum = cross_entropy_sum(model.logits_from_hidden(h), batch["targets"], batch["loss_mask"])
        aux_loss = _sum_stats(aux["router_stats"], "aux_loss")
        z_loss = _sum_stats(aux["router_stats"], "z_loss")
        ortho = sum((router_orthogonal_loss(w) for w in _moe_routers(params)), jnp.zeros(()))
        # CE is normalised by the whole global batch's token count, so accumulation is exact; router terms are
        # per micro-batch means, averaged over micro-batches.
        loss = ce_sum / num_tokens + (coef.aux_loss_coef * aux_loss + coef.z_loss_coef * z_loss) / accum
        loss = loss + coef.ortho_loss_coef * ortho / accum
        counts = [[None if s is None else s.tokens_per_expert for s in group] for group in aux["router_stats"]]
        dropped = _sum_stats(aux["router_stats"], "dropped")
        return loss, dict(
            ce_sum=ce_sum,
            aux_loss=aux_loss / accum,
            z_loss=z_loss / accum,
            ortho_loss=ortho / accum,
            counts=counts,
            dropped=dropped,
        )

    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

    def step(params, biases, opt_state, batch: Batch, step_index: jax.Array):
        num_tokens = jnp.maximum(jnp.sum(batch["loss_mask"]), 1.0)
        trainable, frozen = nnx.split_state(params, trainable_type, ...)  # frozen is empty unless LoRA
        if accum == 1:
            (_, metrics_sum), grads_sum = grad_fn(trainable, frozen, biases, batch, num_tokens)
        else:
            micro = jax.tree.map(lambda x: x.reshape(accum, x.shape[0] // accum, *x.shape[1:]), batch)

            def one(carry, mb):
                (_, metrics), grads = grad_fn(trainable, frozen, biases, mb, num_tokens)
                return jax.tree.map(jnp.add, carry, (grads, metrics)), None

            first = jax.tree.map(lambda x: x[0], micro)
            metrics_shape = jax.eval_shape(lambda: loss_fn(trainable, frozen, biases, first, num_tokens))[1]
            zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (trainable, metrics_shape))
            (grads_sum, metrics_sum), _ = jax.lax.scan(one, zeros, micro)
        grads = grads_sum
        ce = metrics_sum["ce_sum"] / num_tokens
        loss = ce + coef.aux_loss_coef * metrics_sum["aux_loss"] + coef.z_loss_coef * metrics_sum["z_loss"]
        loss = loss + coef.ortho_loss_coef * metrics_sum["ortho_loss"]
        grad_norm = optax.tree.norm(grads)
        updates, new_opt_state = optimizer.update(grads, opt_state, trainable)
        new_trainable = optax.apply_updates(trainable, updates)
        new_biases = _update_biases(biases, metrics_sum["counts"], bias_update_rate)
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
            tokens=num_tokens,
            moe_dropped=metrics_sum["dropped"],  # assignments a bounded EP buffer dropped (mesh.moe_buffer_factor)
            **load,
        )
        return new_params, new_biases, new_opt_state, metrics

    return step


def _update_biases(biases: nnx.State, counts: list, rate: float) -> nnx.State:
    """Aux-loss-free balancing: bias += rate * sign(mean_e(load) - load_e), per layer (Paddle's callback)."""
    if rate == 0:
        return biases

    def one(path, var):
        g, p = path[1], path[3]  # ("groups", g, "layers", p, "ffn", "correction_bias")
        load = counts[g][p]  # [R, E]
        delta = rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)
        return var.replace(var.get_value() + delta)

    return nnx.map_state(one, biases)


def _load_stats(counts: list) -> dict[str, jax.Array]:
    """Per MoE layer: max load / mean load (1 = balanced), plus the counts themselves for logging."""
    loads = [c for group in counts for c in group if c is not None]
    if not loads:
        return {}
    per_layer = jnp.concatenate(loads, axis=0)  # [n_moe_layers (group order), E]
    imbalance = jnp.max(per_layer, axis=-1) / jnp.maximum(jnp.mean(per_layer, axis=-1), 1e-9)
    return dict(expert_load=per_layer, load_imbalance=imbalance)


def split_model(model) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    graphdef, params, biases = nnx.split(model, nnx.Param, CorrectionBias)
    return graphdef, params, biases


def model_flops_per_token(cfg: ErnieConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 * active params (the head counted once) + causal attention scores and values."""
    attn = 6 * cfg.num_hidden_layers * seq_len * cfg.num_attention_heads * cfg.resolved_head_dim  # causal: half of 12
    return 6.0 * cfg.num_active_params(include_embedding=True) + attn


def as_metrics_dict(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k == "expert_load":
            continue
        v = jax.device_get(v)
        out[k] = [float(x) for x in v] if getattr(v, "ndim", 0) else float(v)
    return out
