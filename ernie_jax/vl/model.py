"""ERNIE 4.5 VL in Flax NNX: `model(input_ids, pixel_values=..., image_grid_thw=..., ...)` -> logits [B, T, V].

The forward follows transformers' `Ernie4_5_VLMoeForConditionalGeneration`:
  1. token embeddings; image and video placeholders (`image_token_id`, `video_token_id`) are replaced, in order
     over the batch, by the vision tower + resampler outputs for `pixel_values` / `pixel_values_videos`;
  2. 3D RoPE positions from `mm_token_type_ids` and the grids (`rope.rope_index`), or 0..T-1 when there is no
     image or video (also with padding, as transformers);
  3. the decoder, whose MoE layers route by `moe_mm_token_type_ids` (0 text pool, 1/2 vision pool; when it is not
     given every token takes the text pool, as in transformers: the processor returns it);
  4. final RMSNorm and the LM head (tied to the embeddings unless `tie_word_embeddings` is false).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from ernie_jax.layers import LayerKV, RMSNorm, make_param, normal_init
from ernie_jax.model import KVCache
from ernie_jax.moe import RouterStats
from ernie_jax.options import ModelOptions
from ernie_jax.vl.config import VLConfig
from ernie_jax.vl.decoder import DecoderGroup
from ernie_jax.vl.rope import IMAGE, VIDEO, host_ints, mrope_angles, rope_index
from ernie_jax.vl.vision import Resampler, VisionTower, frame_pairs


def moe_token_types(input_ids, cfg: VLConfig) -> np.ndarray:
    """`moe_mm_token_type_ids` as transformers' processor builds it: placeholders and their start/end tokens are
    1 (image) or 2 (video), everything else 0."""
    ids = host_ints(input_ids, "input_ids")
    out = np.zeros_like(ids)
    out[np.isin(ids, [cfg.image_token_id, cfg.image_start_token_id, cfg.image_end_token_id])] = IMAGE
    out[np.isin(ids, [cfg.video_token_id, cfg.video_start_token_id, cfg.video_end_token_id])] = VIDEO
    return out.astype(np.int32)


def scatter_placeholders(h: jax.Array, is_placeholder: jax.Array, features: jax.Array) -> jax.Array:
    """Put features [n, D] into the placeholder slots of h [B, T, D], in row-major order (torch's masked_scatter)."""
    b, t, d = h.shape
    flat_mask = is_placeholder.reshape(-1)
    slot = jnp.clip(jnp.cumsum(flat_mask) - 1, 0, features.shape[0] - 1)  # [B*T] which feature row goes here
    rows = jnp.take(features.astype(h.dtype), slot, axis=0).reshape(b, t, d)
    return jnp.where(is_placeholder[..., None], rows, h)


def scatter_rows(h: jax.Array, is_placeholder: jax.Array, features: jax.Array) -> jax.Array:
    """Row b's placeholders of h [B, T, D] take row b's features [B, Q, D] in order (Q >= placeholders per row)."""
    slot = jnp.clip(jnp.cumsum(is_placeholder, axis=1) - 1, 0, features.shape[1] - 1)  # [B, T]
    rows = jnp.take_along_axis(features.astype(h.dtype), slot[..., None], axis=1)  # [B, T, D]
    return jnp.where(is_placeholder[..., None], rows, h)


class ErnieVLForConditionalGeneration(nnx.Module):
    """Vision tower + resampler + modality-isolated MoE decoder, exactly transformers' ERNIE 4.5 VL."""

    def __init__(
        self,
        cfg: VLConfig,
        *,
        rngs: nnx.Rngs | None = None,
        dtype=jnp.float32,
        param_dtype=jnp.float32,
        options: ModelOptions = ModelOptions(),
    ):
        text = cfg.text
        self.config = cfg
        self.options = options
        self.dtype = dtype
        init = normal_init(text.initializer_range)
        common = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.embed = make_param(rngs, init, (text.vocab_size, text.hidden_size), ("vocab", "embed"), param_dtype)
        self.vision = VisionTower(cfg.vision, options=options, **common)
        self.resampler = Resampler(cfg, **common)
        self.groups = nnx.List(
            DecoderGroup(text, kind, repeats, options, **common) for kind, repeats in text.layer_groups
        )
        self.final_norm = RMSNorm(text.hidden_size, text.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)
        self.lm_head = (
            None
            if cfg.tie_word_embeddings
            else make_param(rngs, init, (text.hidden_size, text.vocab_size), ("embed", "vocab"), param_dtype)
        )

    def image_features(self, pixel_values: jax.Array, grid_thw) -> jax.Array:
        """pixel_values [P, C] of images or video frames, grid_thw [n, 3] (host ints) -> decoder tokens [n_tok, D]."""
        return self.resampler(self.vision(pixel_values, grid_thw), grid_thw)

    def __call__(
        self,
        input_ids: jax.Array,
        *,
        attention_mask: jax.Array | None = None,
        position_ids: jax.Array | None = None,
        mm_token_type_ids=None,
        moe_mm_token_type_ids: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        image_grid_thw=None,
        pixel_values_videos: jax.Array | None = None,
        video_grid_thw=None,
        return_aux: bool = False,
        return_hidden: bool = False,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        positions_h: jax.Array | None = None,
        positions_w: jax.Array | None = None,
        token_types: jax.Array | None = None,
        patch_frames: jax.Array | None = None,
        patch_rows: jax.Array | None = None,
        patch_cols: jax.Array | None = None,
    ) -> jax.Array | tuple[jax.Array, dict[str, Any]]:
        """Logits [B, T, V] (fp32 when dtype is fp32), with transformers' argument meanings.

        Args:
          input_ids: [B, T] tokens, with one placeholder token per image/video token (the processor's output).
          attention_mask: [B, T], 1 for tokens, 0 for padding.
          position_ids: [3, B, T] (t, h, w) or [B, T]; default computed as transformers does (see `rope.rope_index`).
            Pass them (from `rope_index`) to run under jit: the default is computed on the host.
          mm_token_type_ids: [B, T] 0 text, 1 image, 2 video placeholders (host ints); needed with images/videos.
          moe_mm_token_type_ids: [B, T] the MoE hard gate: 0 text pool, 1/2 vision pool (`moe_token_types`).
          pixel_values / image_grid_thw: flattened patches [P, C] of all images, their grids [n, 3] (host ints).
          pixel_values_videos / video_grid_thw: the same for videos.
          return_aux: also return {"router_stats": [per decoder group: (None,) (dense) or (text, vision)
            RouterStats stacked over the group's layers]}; see `modality_router_losses`.
          return_hidden: return the final-normed hidden states [B, T, D] instead of the logits (`logits_from_hidden`
            applies the head; the trainer's chunked loss does it a slice at a time).

        Packed rows (the trainer's batches, `ernie_jax.data` format vl_sft; every shape static, so one compile):
          positions, positions_h, positions_w: [B, T] the (t, h, w) 3D RoPE positions of every token.
          segment_ids: [B, T] packed conversation of each token, 1.. (0 = padding); attention stays inside one.
          token_types: [B, T] the MoE gate, as `moe_mm_token_type_ids`.
          pixel_values: [B, P, C] each row's image patches, P its patch budget; patch_frames [B, P] the image of
            each patch in its row, 1.. (0 = padding); patch_rows, patch_cols [B, P] its (row, column) in the image.
          Image placeholders of row b take row b's merged image tokens in order.
        """
        if patch_frames is not None or segment_ids is not None:
            return self._packed(
                input_ids, segment_ids, positions, positions_h, positions_w, token_types, pixel_values, patch_frames,
                patch_rows, patch_cols, return_aux=return_aux, return_hidden=return_hidden,
            )  # fmt: skip
        cfg = self.config
        b, t = input_ids.shape
        h = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)  # [B, T, D]
        for values, grid, token, kind in (
            (pixel_values, image_grid_thw, cfg.image_token_id, "image"),
            (pixel_values_videos, video_grid_thw, cfg.video_token_id, "video"),
        ):
            if values is None:
                continue
            if grid is None:
                raise ValueError(f"{kind} pixel values need {kind}_grid_thw")
            is_placeholder = input_ids == token
            tokens = len(frame_pairs(grid, cfg.vision.spatial_merge_size)[0])  # checked before the tower runs
            if not isinstance(input_ids, jax.core.Tracer) and int(is_placeholder.sum()) != tokens:
                raise ValueError(
                    f"{int(is_placeholder.sum())} {kind} placeholder tokens in input_ids but {kind}_grid_thw "
                    f"{host_ints(grid, kind).tolist()} gives {tokens} tokens"
                )
            h = scatter_placeholders(h, is_placeholder, self.image_features(values, grid))
        h = sharding.shard(h, "batch", "seq", "act_embed")

        positions = self._positions(b, t, position_ids, mm_token_type_ids, image_grid_thw, video_grid_thw,
                                    attention_mask)  # fmt: skip
        token_mask = segment_ids = None
        if attention_mask is not None:
            token_mask = jnp.asarray(attention_mask).astype(bool)
            segment_ids = token_mask.astype(jnp.int32)  # padding is its own segment: real tokens never see it
        if moe_mm_token_type_ids is None:
            is_vision = jnp.zeros((b, t), bool)
        else:
            is_vision = jnp.asarray(moe_mm_token_type_ids) != 0
        return self._decode(h, positions, segment_ids, is_vision, token_mask, return_aux, return_hidden)

    def _decode(self, h, positions, segment_ids, is_vision, token_mask, return_aux: bool, return_hidden: bool):
        """The decoder over embedded tokens h [B, T, D] at 3D positions [3, B, T]: logits or final hidden states."""
        text = self.config.text
        angles = mrope_angles(positions, text.resolved_head_dim, text.rope_theta, text.mrope_section)
        router_stats = []
        for group in self.groups:
            h, stats = group(h, angles, segment_ids, is_vision, token_mask)
            # (None,) for a dense group, (text, vision) for an MoE one: per group, the routers' statistics in the
            # order of the group's correction biases (DecoderGroup.layers), as the trainer's losses walk them.
            router_stats.append((None,) if stats is None else tuple(stats))
        h = self.final_norm(h).astype(self.dtype)
        out = h if return_hidden else self.logits_from_hidden(h)
        return (out, {"router_stats": router_stats}) if return_aux else out

    def logits_from_hidden(self, h: jax.Array) -> jax.Array:
        """Final-normed hidden states [B, T, D] -> logits [B, T, V] (the tied embeddings or the LM head)."""
        h = h.astype(self.dtype)
        if self.lm_head is None:
            return jnp.einsum("BTD,VD->BTV", h, self.embed[...].astype(self.dtype))
        return jnp.einsum("BTD,DV->BTV", h, self.lm_head[...].astype(self.dtype))

    def init_cache(self, batch: int, size: int, row_start: jax.Array | None = None, dtype=None) -> KVCache:
        """An empty KV cache of `size` slots per row (the text models' KVCache: per decoder group one LayerKV,
        keys and values [R, B, S, K, H]); row_start [B]: each row's left-padding slots."""
        text = self.config.text
        shape = (batch, size, text.num_key_value_heads, text.resolved_head_dim)
        dtype = self.dtype if dtype is None else dtype

        def empty(repeats):
            zeros = jnp.zeros((repeats, *shape), dtype)
            return sharding.shard(zeros, "layers", "batch", "seq", "kv_heads", "head_dim")

        layers = tuple((LayerKV(empty(repeats), empty(repeats)),) for _, repeats in text.layer_groups)
        row_start = jnp.zeros((batch,), jnp.int32) if row_start is None else row_start.astype(jnp.int32)
        return KVCache(layers, jnp.zeros((), jnp.int32), row_start)

    def forward_cached(
        self,
        input_ids: jax.Array,
        positions: jax.Array,
        cache: KVCache,
        *,
        token_types: jax.Array | None = None,
        pixel_values: jax.Array | None = None,
        patch_frames: jax.Array | None = None,
        patch_rows: jax.Array | None = None,
        patch_cols: jax.Array | None = None,
    ) -> tuple[jax.Array, KVCache]:
        """T new tokens per row through the model with a KV cache (ernie_jax.generation): the prompts' prefill,
        with their images as packed rows (see __call__) and 3D positions [3, B, T], or a decode step of text
        tokens (positions [B, T], the same on the three axes). Returns the final-normed hidden states [B, T, D]
        and the cache with T more slots filled."""
        h = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)  # [B, T, D]
        if pixel_values is not None:
            features = self.resampler.packed(self.vision.packed(pixel_values, patch_frames, patch_rows, patch_cols))
            h = scatter_rows(h, input_ids == self.config.image_token_id, features)
        h = sharding.shard(h, "batch", "seq", "act_embed")
        b, t = input_ids.shape
        positions = jnp.broadcast_to(positions, (3, b, t)) if positions.ndim == 2 else positions
        text = self.config.text
        angles = mrope_angles(positions, text.resolved_head_dim, text.rope_theta, text.mrope_section)
        is_vision = jnp.zeros((b, t), bool) if token_types is None else token_types != 0
        layers = []
        for group, (group_cache,) in zip(self.groups, cache.layers, strict=True):
            h, group_cache = group.cached(h, angles, group_cache, cache.fill, cache.row_start, is_vision)
            layers.append((group_cache,))
        h = self.final_norm(h).astype(self.dtype)
        return h, cache._replace(layers=tuple(layers), fill=cache.fill + t)

    def _packed(self, input_ids, segment_ids, positions, positions_h, positions_w, token_types, pixel_values,
                patch_frames, patch_rows, patch_cols, *, return_aux: bool, return_hidden: bool):  # fmt: skip
        """The forward over packed rows (see __call__): static shapes, no host values."""
        given = dict(segment_ids=segment_ids, positions=positions, positions_h=positions_h, positions_w=positions_w,
                     token_types=token_types)  # fmt: skip
        missing = [k for k, v in given.items() if v is None]
        vision = (pixel_values, patch_frames, patch_rows, patch_cols)
        if missing or (any(v is None for v in vision) and any(v is not None for v in vision)):
            raise ValueError(
                "packed rows need segment_ids, positions, positions_h, positions_w and token_types, and images "
                "pixel_values [B, P, C] with patch_frames, patch_rows and patch_cols; missing "
                f"{missing or 'image keys'}"
            )
        h = jnp.take(self.embed[...], input_ids, axis=0).astype(self.dtype)  # [B, T, D]
        if pixel_values is not None:
            features = self.resampler.packed(self.vision.packed(pixel_values, patch_frames, patch_rows, patch_cols))
            h = scatter_rows(h, input_ids == self.config.image_token_id, features)  # [B, T, D]
        h = sharding.shard(h, "batch", "seq", "act_embed")
        positions3 = jnp.stack([positions, positions_h, positions_w])  # [3, B, T]
        return self._decode(h, positions3, segment_ids, token_types != 0, segment_ids > 0, return_aux, return_hidden)

    def _positions(self, b, t, position_ids, mm_token_type_ids, image_grid_thw, video_grid_thw, attention_mask):
        """[3, B, T] int positions (t, h, w)."""
        if position_ids is not None:
            position_ids = jnp.asarray(position_ids)
            return jnp.broadcast_to(position_ids, (3, b, t)) if position_ids.ndim == 2 else position_ids
        if image_grid_thw is None and video_grid_thw is None:
            return jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (3, b, t))
        if mm_token_type_ids is None:
            raise ValueError(
                "image_grid_thw / video_grid_thw were given without mm_token_type_ids: the 3D RoPE positions need "
                "them (the processor returns them next to input_ids)"
            )
        vision = self.config.vision
        return jnp.asarray(
            rope_index(
                mm_token_type_ids,
                image_grid_thw,
                video_grid_thw,
                attention_mask,
                spatial_merge_size=vision.spatial_merge_size,
                temporal_merge_size=vision.temporal_merge_size,
            )
        )


def modality_router_losses(router_stats: list) -> dict[str, jax.Array]:
    """Mean over MoE layers of each pool's aux load-balance loss and z-loss: {text,vision}_{aux,z}_loss."""
    per_pool: dict[str, list[RouterStats]] = {"text": [], "vision": []}
    for stats in router_stats:
        if len(stats) == 2:  # an MoE group's (text, vision); a dense group has (None,)
            per_pool["text"].append(stats[0])
            per_pool["vision"].append(stats[1])
    out = {}
    for pool, items in per_pool.items():
        if not items:
            continue
        out[f"{pool}_aux_loss"] = jnp.mean(jnp.concatenate([s.aux_loss for s in items]))
        out[f"{pool}_z_loss"] = jnp.mean(jnp.concatenate([s.z_loss for s in items]))
    return out


def abstract_model(
    cfg: VLConfig, *, dtype=jnp.bfloat16, param_dtype=jnp.float32, options: ModelOptions = ModelOptions()
) -> ErnieVLForConditionalGeneration:
    """A model whose parameters are ShapeDtypeStructs: no memory, for shapes, shardings and loading."""
    return nnx.eval_shape(
        lambda: ErnieVLForConditionalGeneration(
            cfg, rngs=nnx.Rngs(0), dtype=dtype, param_dtype=param_dtype, options=options
        )
    )
