"""The MoE FFN module: router + routed experts (+ shared experts), on one device or expert-parallel on a mesh."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from ernie_jax.config import ErnieConfig
from ernie_jax.layers import MLP, make_param, normal_init, zeros_init
from ernie_jax.lora import adapted
from ernie_jax.moe.dispatch import dropless_moe
from ernie_jax.moe.expert_parallel import expert_parallel_moe
from ernie_jax.moe.routing import CorrectionBias, RouterStats, RouterWeight, route, router_stats
from ernie_jax.options import ModelOptions


class RoutedExperts(nnx.Module):
    """A router, its correction bias and E routed SwiGLU experts: the part of an MoE layer that routes.

    Weights: router [D, E] fp32 (`RouterWeight`), correction_bias [E] fp32 (`CorrectionBias`), w_gate/w_up
    [E, D, F], w_down [E, F, D]. The text models' `MoEBlock` adds shared experts; the VL model holds one pool per
    modality. Expert-parallel on an active mesh, dropless on one device; both per `options`.
    """

    def __init__(
        self,
        *,
        hidden_size: int,
        num_experts: int,
        width: int,
        k: int,
        norm_min: float,
        initializer_range: float,
        dtype,
        param_dtype,
        stack=(),
        rngs: nnx.Rngs | None = None,
        options: ModelOptions = ModelOptions(),
    ):
        d, e, f = hidden_size, num_experts, width
        init = normal_init(initializer_range)
        self.dtype = dtype
        self.k = k
        self.num_experts = e
        self.norm_min = norm_min
        self.options = options
        # Router and its bias stay fp32 whatever the parameter dtype (as released and as transformers keeps them).
        self.router = make_param(
            rngs, init, (d, e), ("embed", "router_experts"), jnp.float32, stack, param_type=RouterWeight
        )
        bias = make_param(rngs, zeros_init, (e,), ("router_experts",), jnp.float32, stack)
        self.correction_bias = CorrectionBias(bias[...], **bias.get_metadata())
        self.w_gate = make_param(rngs, init, (e, d, f), ("experts", "embed", "expert_mlp"), param_dtype, stack)
        self.w_up = make_param(rngs, init, (e, d, f), ("experts", "embed", "expert_mlp"), param_dtype, stack)
        self.w_down = make_param(rngs, init, (e, f, d), ("experts", "expert_mlp", "embed"), param_dtype, stack)
        # Per-expert LoRA adapters (ernie_jax.lora), folded into the expert weights before the grouped matmuls.
        self.w_gate_lora = self.w_up_lora = self.w_down_lora = None

    def route_and_run(
        self, x: jax.Array, *, stats_mask: jax.Array | None = None, member: jax.Array | None = None
    ) -> tuple[jax.Array, RouterStats]:
        """x [N, D] -> ([N, D] in x's dtype, this router's statistics over `stats_mask` [N] (None: every token)).

        member [N] bool: the tokens this pool serves (a VL modality); the others are routed nowhere (their k
        assignments go to the sentinel expert E with weight 0, which no group counts) and get zero rows.
        """
        routing = route(x, self.router[...], self.correction_bias[...], k=self.k, norm_min=self.norm_min)
        stats = router_stats(routing, k=self.k, token_mask=stats_mask)
        if member is not None:
            routing = routing._replace(
                experts=jnp.where(member[:, None], routing.experts, self.num_experts),  # [N, k]
                weights=jnp.where(member[:, None], routing.weights, 0.0),
            )
        w_gate, w_up, w_down = (
            # One layer's expert weights in the compute dtype (dequantised here when int8/nf4, adapters folded
            # in): the grouped matmul below and the expert-parallel paths take plain arrays.
            adapted(w, adapter, self.dtype)  # [E, D, F], [E, D, F], [E, F, D]
            for w, adapter in (
                (self.w_gate, self.w_gate_lora),
                (self.w_up, self.w_up_lora),
                (self.w_down, self.w_down_lora),
            )
        )
        ctx = sharding.active()
        if ctx is None or ctx.mesh.size == 1:
            return dropless_moe(x, routing, w_gate, w_up, w_down, options=self.options), stats
        y, dropped = expert_parallel_moe(
            x,
            routing.experts,
            routing.weights,
            w_gate,
            w_up,
            w_down,
            mesh=ctx.mesh,
            rules=ctx.rules,
            options=self.options,
            return_dropped=True,
        )
        return y, stats._replace(dropped=dropped)


class MoEBlock(RoutedExperts):
    """The text models' MoE FFN: routed experts plus shared experts (one MLP of width k_shared * F, unweighted)."""

    def __init__(
        self,
        cfg: ErnieConfig,
        *,
        dtype,
        param_dtype,
        stack=(),
        rngs: nnx.Rngs | None = None,
        options: ModelOptions = ModelOptions(),
    ):
        super().__init__(
            hidden_size=cfg.hidden_size,
            num_experts=cfg.moe_num_experts,
            width=cfg.moe_intermediate_size,
            k=cfg.moe_k,
            norm_min=cfg.moe_norm_min,
            initializer_range=cfg.initializer_range,
            dtype=dtype,
            param_dtype=param_dtype,
            stack=stack,
            rngs=rngs,
            options=options,
        )
        common = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        self.shared = (
            MLP(cfg, cfg.shared_expert_size, use_bias=cfg.use_bias, **common) if cfg.moe_num_shared_experts else None
        )

    def __call__(
        self, x: jax.Array, token_mask: jax.Array | None = None, dropout_key: jax.Array | None = None
    ) -> tuple[jax.Array, RouterStats]:
        """x [B, T, D]; token_mask [B, T] (1 = real token) -> ([B, T, D], RouterStats over the real tokens).
        dropout_key: the shared experts' LoRA dropout key in training (None: none)."""
        b, t, d = x.shape
        flat = x.reshape(b * t, d).astype(self.dtype)  # [N, D]
        y, stats = self.route_and_run(flat, stats_mask=None if token_mask is None else token_mask.reshape(-1))
        if self.shared is not None:
            y = y + self.shared(flat, dropout_key)
        return y.reshape(b, t, d), stats


def update_correction_biases(model: nnx.Module, loads: list, rate: float) -> None:
    """Aux-loss-free balancing, in place: bias += rate * sign(mean_e(load) - load_e) per MoE layer (Paddle's rule).

    `loads` nests like the "router_stats" that `model(..., return_aux=True)` returns: per layer group, per position
    of the group's pattern, the RouterStats' `tokens_per_expert` stacked over the group's repeats [R, E] (None for
    a dense position). That is the nesting of `model.groups[g].layers[p]`, so each block meets its own counts
    without reading a state path; a correction bias that no counts reach is refused rather than left unbalanced.
    """
    reached = set()
    for group, group_loads in zip(model.groups, loads, strict=True):
        for layer, load in zip(group.layers, group_loads, strict=True):
            if load is None:
                continue
            bias = layer.ffn.correction_bias  # [R, E]
            bias.set_value(bias.get_value() + rate * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load))
            reached.add(id(bias))
    stray = [
        ".".join(map(str, path))
        for path, var in nnx.iter_graph(model)
        if isinstance(var, CorrectionBias) and id(var) not in reached
    ]
    if stray:
        raise ValueError(f"correction biases with no router statistics to update them: {', '.join(stray)}")
