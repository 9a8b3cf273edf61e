"""The heterogeneous multimodal MoE of ERNIE 4.5 VL: modality-isolated expert pools plus shared experts.

Each MoE layer holds two pools, text and vision, each with its own fp32 router, correction bias and routed experts
(vision experts are narrower). A "hard gate" by token type decides the pool: text tokens (type 0) are routed among
the text experts only, image and video tokens (types 1, 2) among the vision experts only; shared experts and
attention see every token. Within a pool, routing is the text models' (`ernie_jax.moe.route`): fp32 softmax, top-k
on probs + correction bias, unbiased probs renormalised.

Shapes stay static: both pools route every token, and a token of the other modality has its k assignments sent
to the sentinel expert E (one past the pool's last) with weight 0. `bincount(length=E)` ignores the sentinel, so
those assignments sort after every group, the grouped matmul leaves rows past sum(group_sizes) at zero, and the
expert-parallel transports never send them. Router statistics are computed per pool over its own tokens, giving
the per-modality aux and z losses of ERNIE's training recipe.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from ernie_jax.layers import MLP, make_param, normal_init, zeros_init
from ernie_jax.moe import CorrectionBias, RouterStats, dropless_moe, expert_swiglu, route, router_stats
from ernie_jax.vl.config import VLTextConfig


class ExpertPool(nnx.Module):
    """One modality's router, correction bias and routed SwiGLU experts: w_gate/w_up [E, D, F], w_down [E, F, D]."""

    def __init__(self, cfg: VLTextConfig, width: int, *, dtype, param_dtype, stack=(), rngs=None, gmm_impl="auto"):
        d, e = cfg.hidden_size, cfg.moe_num_experts
        init = normal_init(cfg.initializer_range)
        self.dtype = dtype
        self.k = cfg.moe_k
        self.num_experts = e
        self.norm_min = cfg.moe_norm_min
        self.gmm_impl = gmm_impl
        # Router and bias stay fp32 whatever the parameter dtype, as released and as transformers keeps them.
        self.router = make_param(rngs, init, (d, e), ("embed", "router_experts"), jnp.float32, stack)
        bias = make_param(rngs, zeros_init, (e,), ("router_experts",), jnp.float32, stack)
        self.correction_bias = CorrectionBias(bias[...], **bias.get_metadata())
        self.w_gate = make_param(rngs, init, (e, d, width), ("experts", "embed", "expert_mlp"), param_dtype, stack)
        self.w_up = make_param(rngs, init, (e, d, width), ("experts", "embed", "expert_mlp"), param_dtype, stack)
        self.w_down = make_param(rngs, init, (e, width, d), ("experts", "expert_mlp", "embed"), param_dtype, stack)

    def __call__(self, x: jax.Array, member: jax.Array, stats_mask: jax.Array) -> tuple[jax.Array, RouterStats]:
        """x [N, D]; member [N] bool: tokens this pool serves; stats_mask [N] bool: tokens counted in the stats.

        Returns [N, D] (zero rows for non-members) and this pool's router statistics over stats_mask.
        """
        routing = route(x, self.router[...], self.correction_bias[...], k=self.k, norm_min=self.norm_min)
        stats = router_stats(routing, k=self.k, token_mask=stats_mask)
        experts = jnp.where(member[:, None], routing.experts, self.num_experts)  # [N, k]; E = sentinel, no expert
        weights = jnp.where(member[:, None], routing.weights, 0.0)
        w_gate, w_up, w_down = (w[...].astype(self.dtype) for w in (self.w_gate, self.w_up, self.w_down))
        ctx = sharding.active()
        if ctx is not None and ctx.mesh.size > 1:
            y, dropped = sharding.expert_parallel_moe(
                x,
                experts,
                weights,
                w_gate,
                w_up,
                w_down,
                mesh=ctx.mesh,
                rules=ctx.rules,
                transport=ctx.moe_transport,
                buffer_factor=ctx.moe_buffer_factor,
                return_dropped=True,
                expert_fn=functools.partial(expert_swiglu, gmm_impl=self.gmm_impl),
            )
            stats = stats._replace(dropped=dropped)
        else:
            y = dropless_moe(x, routing._replace(experts=experts, weights=weights), w_gate, w_up, w_down,
                             gmm_impl=self.gmm_impl)  # fmt: skip
        return y, stats


class ModalityIsolatedMoE(nnx.Module):
    """Text pool for text tokens, vision pool for image/video tokens, shared experts (width F_text * n) for all."""

    def __init__(self, cfg: VLTextConfig, *, dtype, param_dtype, stack=(), rngs=None, gmm_impl="auto"):
        common = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        self.text = ExpertPool(cfg, cfg.moe_intermediate_size[0], gmm_impl=gmm_impl, **common)
        self.vision = ExpertPool(cfg, cfg.moe_intermediate_size[1], gmm_impl=gmm_impl, **common)
        self.shared = (
            MLP(cfg.as_ernie_config(), cfg.shared_expert_size, use_bias=cfg.use_bias, **common)
            if cfg.moe_num_shared_experts
            else None
        )

    def __call__(
        self, x: jax.Array, is_vision: jax.Array, token_mask: jax.Array | None
    ) -> tuple[jax.Array, tuple[RouterStats, RouterStats]]:
        """x [B, T, D]; is_vision [B, T] bool (the hard gate); token_mask [B, T] (1 = real token) or None.

        Returns [B, T, D] and the (text, vision) router statistics, each over its own real tokens.
        """
        b, t, d = x.shape
        flat = x.reshape(b * t, d)  # [N, D]
        vision = is_vision.reshape(-1)
        real = jnp.ones_like(vision) if token_mask is None else token_mask.reshape(-1).astype(bool)
        y_text, text_stats = self.text(flat, ~vision, real & ~vision)
        y_vision, vision_stats = self.vision(flat, vision, real & vision)
        y = y_text + y_vision
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.reshape(b, t, d), (text_stats, vision_stats)
