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

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.layers import MLP
from ernie_jax.moe import RoutedExperts, RouterStats
from ernie_jax.options import ModelOptions
from ernie_jax.vl.config import VLTextConfig


class ModalityIsolatedMoE(nnx.Module):
    """Text pool for text tokens, vision pool for image/video tokens, shared experts (width F_text * n) for all."""

    def __init__(self, cfg: VLTextConfig, *, dtype, param_dtype, stack=(), rngs=None, options=ModelOptions()):
        common = dict(dtype=dtype, param_dtype=param_dtype, stack=stack, rngs=rngs)
        pool = dict(
            hidden_size=cfg.hidden_size,
            num_experts=cfg.moe_num_experts,
            k=cfg.moe_k,
            norm_min=cfg.moe_norm_min,
            initializer_range=cfg.initializer_range,
            options=options,
            **common,
        )
        # One modality's router, correction bias and routed experts each (vision experts are narrower).
        self.text = RoutedExperts(width=cfg.moe_intermediate_size[0], **pool)
        self.vision = RoutedExperts(width=cfg.moe_intermediate_size[1], **pool)
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
        y_text, text_stats = self.text.route_and_run(flat, member=~vision, stats_mask=real & ~vision)
        y_vision, vision_stats = self.vision.route_and_run(flat, member=vision, stats_mask=real & vision)
        y = y_text + y_vision
        if self.shared is not None:
            y = y + self.shared(flat)
        return y.reshape(b, t, d), (text_stats, vision_stats)
