"""ERNIE 4.5 mixture-of-experts FFN: routing, dropless expert compute and router statistics.

Routing (facts sheet §2, transformers `Ernie4_5_MoeTopKRouter`, Paddle `topk_gate`):
  1. logits = x_fp32 @ W_router (fp32, no bias)                                     [N, E]
  2. probs = softmax(logits) over all experts
  3. selection: top-k of (probs + e_score_correction_bias); the bias affects selection only
  4. weights: the *unbiased* probs of the selected experts / max(sum, moe_norm_min)
Routed experts are SwiGLU MLPs; shared experts (one MLP of width k_shared * F) are added unweighted.

Everything here except `MoEBlock` is a plain function on arrays, so the expert-parallel shard_map path
(sharding/) can reuse routing and swap the expert compute.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

import pallas_kernels
import sharding
from ernie_jax.config import ErnieConfig
from ernie_jax.layers import MLP, make_param, normal_init, zeros_init
from ernie_jax.lora import adapted
from sharding.permute import inverse_permutation, permute_rows, repeat_rows


class CorrectionBias(nnx.Variable):
    """Aux-loss-free balancing bias (`moe_statics.e_score_correction_bias`): not a gradient-trained parameter."""


class Routing(NamedTuple):
    weights: jax.Array  # [N, k] fp32 mixing weights (unbiased probs, renormalised)
    experts: jax.Array  # [N, k] int32 selected experts
    probs: jax.Array  # [N, E] fp32 softmax over all experts
    logits: jax.Array  # [N, E] fp32 router logits


class RouterStats(NamedTuple):
    """Per-layer router statistics, returned as values so training can log them and update the bias."""

    tokens_per_expert: jax.Array  # [E] fp32 count of dispatched (biased top-k) assignments
    aux_loss: jax.Array  # [] load-balance loss E * sum_e f_e * P_e (= k when balanced)
    z_loss: jax.Array  # [] mean logsumexp(logits)^2
    dropped: jax.Array  # [] assignments dropped by a bounded expert-parallel buffer (0 when dropless)


def route(x: jax.Array, router_w: jax.Array, correction_bias: jax.Array, *, k: int, norm_min: float) -> Routing:
    """Select k experts per token. x [N, D], router_w [D, E] fp32, correction_bias [E] fp32."""
    logits = jnp.einsum("ND,DE->NE", x.astype(jnp.float32), router_w.astype(jnp.float32))
    probs = jax.nn.softmax(logits, axis=-1)
    _, experts = jax.lax.top_k(probs + correction_bias.astype(jnp.float32), k)  # [N, k]
    chosen = jnp.take_along_axis(probs, experts, axis=-1)
    weights = chosen / jnp.maximum(chosen.sum(axis=-1, keepdims=True), norm_min)
    return Routing(weights, experts.astype(jnp.int32), probs, logits)


def router_stats(routing: Routing, *, k: int, token_mask: jax.Array | None = None) -> RouterStats:
    """Load counts, aux load-balance loss (Paddle form: counts from top-k on unbiased probs) and z-loss.

    token_mask [N] (1 = real token) excludes padding from every statistic.
    """
    n, e = routing.probs.shape
    mask = jnp.ones((n,), jnp.float32) if token_mask is None else token_mask.astype(jnp.float32)
    denom = jnp.maximum(mask.sum(), 1.0)
    dispatched = jax.nn.one_hot(routing.experts, e, dtype=jnp.float32).sum(axis=1)  # [N, E]
    tokens_per_expert = jnp.einsum("NE,N->E", dispatched, mask)
    _, unbiased = jax.lax.top_k(routing.probs, k)
    unbiased_counts = jnp.einsum("NE,N->E", jax.nn.one_hot(unbiased, e, dtype=jnp.float32).sum(axis=1), mask)
    mean_prob = jnp.einsum("NE,N->E", routing.probs, mask) / denom
    aux = e * jnp.sum(jax.lax.stop_gradient(unbiased_counts / denom) * mean_prob)
    z = jnp.sum(jax.nn.logsumexp(routing.logits, axis=-1) ** 2 * mask) / denom
    return RouterStats(tokens_per_expert, aux, z, jnp.zeros((), jnp.float32))


def sort_by_expert(experts: jax.Array, num_experts: int) -> tuple[jax.Array, jax.Array]:
    """Order of the N*k assignments grouped by expert, and the group sizes [E]."""
    flat = experts.reshape(-1)  # [N*k]
    order = jnp.argsort(flat, stable=True)
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    return order, group_sizes


def expert_swiglu(
    xs: jax.Array,
    group_sizes: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    gmm_impl: str = "auto",
    expected_rows: int | None = None,
) -> jax.Array:
    """SwiGLU of rows sorted by expert: xs [M, D], w_gate/w_up [E, D, F], w_down [E, F, D] -> [M, D].

    expected_rows: how many of the M rows the local experts get under balanced routing (an expert-parallel buffer
    is sized for the worst case); only the kernels' cost estimates use it.
    """
    gmm = functools.partial(pallas_kernels.gmm, implementation=gmm_impl, cost_rows=expected_rows)
    gate = gmm(xs, w_gate, group_sizes)  # [M, F]
    up = gmm(xs, w_up, group_sizes)
    return gmm(jax.nn.silu(gate) * up, w_down, group_sizes)


def dropless_moe(
    x: jax.Array,
    routing: Routing,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    gmm_impl: str = "auto",
) -> jax.Array:
    """Every assignment is computed (no capacity): sort by expert, grouped matmul, unsort, weight, sum.

    x [N, D] -> [N, D] in x's dtype.
    """
    n, d = x.shape
    k = routing.experts.shape[-1]
    order, group_sizes = sort_by_expert(routing.experts, w_gate.shape[0])
    inverse = inverse_permutation(order)
    # Permutations of the k-repeated rows: gathers forward and backward, no [N*k, D] scatters.
    xs = permute_rows(repeat_rows(x, k), order, inverse)  # [N*k, D], rows grouped by expert
    ys = expert_swiglu(xs, group_sizes, w_gate, w_up, w_down, gmm_impl=gmm_impl)  # [N*k, D]
    unsorted = permute_rows(ys, inverse, order).reshape(n, k, d)  # [N, k, D]
    out = jnp.einsum("NKD,NK->ND", unsorted.astype(jnp.float32), routing.weights)
    return out.astype(x.dtype)


def dense_moe_oracle(
    x: jax.Array, routing: Routing, w_gate: jax.Array, w_up: jax.Array, w_down: jax.Array
) -> jax.Array:
    """Every expert on every token, then mask: E/k times the FLOPs. The test oracle for dispatch paths."""
    gate = jnp.einsum("ND,EDF->NEF", x, w_gate)
    up = jnp.einsum("ND,EDF->NEF", x, w_up)
    ys = jnp.einsum("NEF,EFD->NED", jax.nn.silu(gate) * up, w_down)
    combine = jnp.einsum("NK,NKE->NE", routing.weights, jax.nn.one_hot(routing.experts, w_gate.shape[0]))
    return jnp.einsum("NED,NE->ND", ys.astype(jnp.float32), combine).astype(x.dtype)


class MoEBlock(nnx.Module):
    """Router + routed experts (+ shared experts). Weights: w_gate/w_up [E, D, F], w_down [E, F, D]."""

    def __init__(
        self,
        cfg: ErnieConfig,
        *,
        dtype,
        param_dtype,
        stack=(),
        rngs: nnx.Rngs | None = None,
        gmm_impl: str = "auto",
    ):
        d, e, f = cfg.hidden_size, cfg.moe_num_experts, cfg.moe_intermediate_size
        init = normal_init(cfg.initializer_range)
        self.dtype = dtype
        self.k = cfg.moe_k
        self.norm_min = cfg.moe_norm_min
        self.gmm_impl = gmm_impl
        # Router and its bias stay fp32 whatever the parameter dtype (as released and as transformers keeps them).
        self.router = make_param(rngs, init, (d, e), ("embed", "router_experts"), jnp.float32, stack)
        bias = make_param(rngs, zeros_init, (e,), ("router_experts",), jnp.float32, stack)
        self.correction_bias = CorrectionBias(bias[...], **bias.get_metadata())
        self.w_gate = make_param(rngs, init, (e, d, f), ("experts", "embed", "expert_mlp"), param_dtype, stack)
        self.w_up = make_param(rngs, init, (e, d, f), ("experts", "embed", "expert_mlp"), param_dtype, stack)
        self.w_down = make_param(rngs, init, (e, f, d), ("experts", "expert_mlp", "embed"), param_dtype, stack)
        # Per-expert LoRA adapters (ernie_jax.lora), folded into the expert weights before the grouped matmuls.
        self.w_gate_lora = self.w_up_lora = self.w_down_lora = None
        self.shared = (
            MLP(
                cfg,
                cfg.shared_expert_size,
                use_bias=cfg.use_bias,
                dtype=dtype,
                param_dtype=param_dtype,
                stack=stack,
                rngs=rngs,
            )
            if cfg.moe_num_shared_experts
            else None
        )

    def __call__(self, x: jax.Array, token_mask: jax.Array | None = None) -> tuple[jax.Array, RouterStats]:
        b, t, d = x.shape
        flat = x.reshape(b * t, d).astype(self.dtype)  # [N, D]
        routing = route(flat, self.router[...], self.correction_bias[...], k=self.k, norm_min=self.norm_min)
        stats = router_stats(routing, k=self.k, token_mask=None if token_mask is None else token_mask.reshape(-1))
        w_gate, w_up, w_down = (
            adapted(w, adapter).astype(self.dtype)  # [E, D, F], [E, D, F], [E, F, D]
            for w, adapter in (
                (self.w_gate, self.w_gate_lora),
                (self.w_up, self.w_up_lora),
                (self.w_down, self.w_down_lora),
            )
        )
        ctx = sharding.active()
        if ctx is not None and ctx.mesh.size > 1:
            expert_fn = functools.partial(expert_swiglu, gmm_impl=self.gmm_impl)
            y, dropped = sharding.expert_parallel_moe(
                flat,
                routing.experts,
                routing.weights,
                w_gate,
                w_up,
                w_down,
                mesh=ctx.mesh,
                rules=ctx.rules,
                transport=ctx.moe_transport,
                buffer_factor=ctx.moe_buffer_factor,
                return_dropped=True,
                expert_fn=expert_fn,
            )
            stats = stats._replace(dropped=dropped)
        else:
            y = dropless_moe(flat, routing, w_gate, w_up, w_down, gmm_impl=self.gmm_impl)
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.reshape(b, t, d), stats
