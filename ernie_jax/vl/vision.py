"""The vision side of ERNIE 4.5 VL: a ViT over flattened patches with 2D RoPE, and the variable-resolution resampler.

Inputs are the processor's `pixel_values` [P, C]: every patch of every image (or video frame) flattened, in the
processor's order (merge blocks of m x m patches, see `rope.vision_patch_positions`), plus `grid_thw` [n, 3] giving
each image's (frames, patch rows, patch columns). Attention runs inside one frame only; the resampler then merges
m x m patches into one token (spatial) and two consecutive frames into one (temporal; an image is paired with
itself), and projects to the decoder's width. Everything that depends on `grid_thw` (positions, segments, frame
pairs) is computed on the host, as in transformers.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import sharding
from ernie_jax.layers import RMSNorm, attention_kernel, make_param, normal_init, ones_init, zeros_init
from ernie_jax.model import REMAT_POLICIES
from ernie_jax.options import ModelOptions
from ernie_jax.vl.config import VisionConfig, VLConfig
from ernie_jax.vl.rope import host_ints, rotate_halves, vision_angles, vision_patch_positions

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "silu": jax.nn.silu,
}


class LayerNorm(nnx.Module):
    """(x - mean) / sqrt(var + eps) * weight + bias, computed in fp32, returned in the input dtype."""

    def __init__(self, dim: int, eps: float, *, param_dtype, stack=(), rngs: nnx.Rngs | None = None):
        self.eps = eps
        self.weight = make_param(rngs, ones_init, (dim,), ("norm",), param_dtype, stack)
        self.bias = make_param(rngs, zeros_init, (dim,), ("norm",), param_dtype, stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        normed = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (normed * self.weight[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


class Linear(nnx.Module):
    """y = x @ W + b with W stored [in, out]."""

    def __init__(self, d_in: int, d_out: int, axes, *, init_std, dtype, param_dtype, stack=(), rngs=None):
        self.dtype = dtype
        self.weight = make_param(rngs, normal_init(init_std), (d_in, d_out), axes, param_dtype, stack)
        self.bias = make_param(rngs, zeros_init, (d_out,), axes[1:], param_dtype, stack)

    def __call__(self, x: jax.Array) -> jax.Array:
        y = jnp.einsum("...I,IO->...O", x.astype(self.dtype), self.weight[...].astype(self.dtype))
        return y + self.bias[...].astype(self.dtype)


class VisionBlock(nnx.Module):
    """Pre-norm ViT block: x += Attn(LN(x)) within each frame, with 2D RoPE; x += MLP(LN(x))."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, stack=(), rngs=None, options=ModelOptions()):
        d, n, h, f = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.intermediate_size
        init = normal_init(cfg.initializer_range)
        common = dict(param_dtype=param_dtype, stack=stack, rngs=rngs)
        self.dtype = dtype
        self.act = cfg.hidden_act
        self.options = options
        self.norm1 = LayerNorm(d, cfg.rms_norm_eps, **common)
        self.norm2 = LayerNorm(d, cfg.rms_norm_eps, **common)
        # q, k and v of one head sit next to each other on the "qkv" axis (transformers' fused qkv projection).
        self.wqkv = make_param(rngs, init, (d, 3, n, h), ("embed", None, "q_heads", "head_dim"), param_dtype, stack)
        self.bqkv = make_param(
            rngs, zeros_init, (3, n, h), (None, "q_heads", "head_dim"), param_dtype, stack, weight_decay=False
        )
        self.wo = make_param(rngs, init, (n, h, d), ("q_heads", "head_dim", "embed"), param_dtype, stack)
        self.bo = make_param(rngs, zeros_init, (d,), ("embed",), param_dtype, stack)
        self.fc1 = Linear(d, f, ("embed", "mlp"), init_std=cfg.initializer_range, dtype=dtype, **common)
        self.fc2 = Linear(f, d, ("mlp", "embed"), init_std=cfg.initializer_range, dtype=dtype, **common)

    def __call__(self, x: jax.Array, angles: jax.Array, frame_ids: jax.Array) -> jax.Array:
        """x [B, P, Dv], angles [B, P, H/2], frame_ids [B, P] (patches attend only within their frame)."""
        normed = self.norm1(x).astype(self.dtype)
        qkv = jnp.einsum("BPD,DSNH->BPSNH", normed, self.wqkv[...].astype(self.dtype))  # [B, P, 3, N, H]
        qkv = qkv + self.bqkv[...].astype(self.dtype)
        q = rotate_halves(qkv[:, :, 0], angles)  # [B, P, N, H]
        k = rotate_halves(qkv[:, :, 1], angles)
        v = qkv[:, :, 2]
        # Each row's patches as one packed sequence; frame ids keep attention within each frame.
        out = attention_kernel(q, k, v, frame_ids, self.options, causal=False)  # [B, P, N, H]
        y = jnp.einsum("BPNH,NHD->BPD", out.astype(self.dtype), self.wo[...].astype(self.dtype))
        x = x + (y + self.bo[...].astype(self.dtype)).astype(x.dtype)
        hidden = ACTIVATIONS[self.act](self.fc1(self.norm2(x)))  # [B, P, F]
        return x + self.fc2(hidden).astype(x.dtype)


class VisionTower(nnx.Module):
    """Patch embedding (a linear map of flattened patches), `depth` blocks run with lax.scan, final LayerNorm."""

    def __init__(self, cfg: VisionConfig, *, dtype, param_dtype, rngs=None, options=ModelOptions()):
        self.config = cfg
        self.dtype = dtype
        init = normal_init(cfg.initializer_range)
        self.patch_embed = make_param(rngs, init, (cfg.patch_dim, cfg.hidden_size), (None, "embed"), param_dtype)
        self.options = options
        self.blocks = VisionBlock(
            cfg, dtype=dtype, param_dtype=param_dtype, stack=(cfg.depth,), rngs=rngs, options=options
        )
        self.final_norm = LayerNorm(cfg.hidden_size, cfg.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, pixel_values: jax.Array, grid_thw) -> jax.Array:
        """pixel_values [P, C], grid_thw [n, 3] (host ints) -> patch features [P, Dv]."""
        cfg = self.config
        grid = host_ints(grid_thw, "grid_thw")
        patches = int(np.sum(np.prod(grid, axis=-1)))
        if pixel_values.shape != (patches, cfg.patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)}; grid_thw {grid.tolist()} needs "
                f"[{patches}, {cfg.patch_dim}] (patches x in_channels * patch_size**2)"
            )
        if np.any(grid[:, 1:] % cfg.spatial_merge_size):
            raise ValueError(f"grid_thw {grid.tolist()}: patch rows and columns must be multiples of the merge size")
        frames_per_item = np.repeat(np.arange(int(grid[:, 0].sum())), np.repeat(grid[:, 1] * grid[:, 2], grid[:, 0]))
        positions = vision_patch_positions(grid, cfg.spatial_merge_size)  # [P, 2]
        x = self.packed(
            pixel_values[None],
            jnp.asarray(frames_per_item + 1, jnp.int32)[None],
            jnp.asarray(positions[:, 0])[None],
            jnp.asarray(positions[:, 1])[None],
        )
        return x[0]  # [P, Dv]

    def packed(self, pixel_values: jax.Array, frame_ids: jax.Array, rows: jax.Array, cols: jax.Array) -> jax.Array:
        """Rows of packed patches, for jitted training: pixel_values [B, P, C], frame_ids [B, P] (1.. per image in
        the row, 0 = padding), rows/cols [B, P] each patch's (row, column) in its image -> features [B, P, Dv].

        Shapes are static (P is the row's patch budget), so nothing here depends on the images' sizes as values.
        """
        cfg = self.config
        b, p = frame_ids.shape
        positions = jnp.stack([rows, cols], axis=-1).reshape(b * p, 2)
        angles = vision_angles(positions, cfg.head_dim, cfg.rope_theta).reshape(b, p, -1)  # [B, P, H/2]
        x = jnp.einsum("BPC,CD->BPD", pixel_values.astype(self.dtype), self.patch_embed[...].astype(self.dtype))
        x = sharding.shard(x, "batch", "seq", "act_embed")
        graphdef, state = nnx.split(self.blocks)

        def body(h, block_state):
            h = nnx.merge(graphdef, block_state)(h, angles, frame_ids)
            return sharding.shard(h, "batch", "seq", "act_embed"), None

        if self.options.remat != "none":  # the trainer's remat policy covers the tower's blocks too
            body = jax.checkpoint(body, policy=REMAT_POLICIES[self.options.remat], prevent_cse=False)
        x, _ = jax.lax.scan(body, x, state, unroll=not self.options.scan_layers)
        return self.final_norm(x)  # [B, P, Dv]


def frame_pairs(grid_thw, spatial_merge_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (first, second) of the spatially merged tokens that the temporal merge concatenates.

    A video's frames pair up (0, 1), (2, 3), ... (an odd last frame is dropped, as in transformers); an image
    (one frame) is paired with itself. Returns two index arrays of equal length: the decoder's tokens.
    """
    first, second, offset = [], [], 0
    for t, h, w in host_ints(grid_thw, "grid_thw").tolist():
        per_frame = h * w // spatial_merge_size**2
        odd_start = 1 if t > 1 else 0
        for even, odd in zip(range(0, t, 2), range(odd_start, t, 2), strict=False):
            first.append(offset + even * per_frame + np.arange(per_frame))
            second.append(offset + odd * per_frame + np.arange(per_frame))
        offset += t * per_frame
    return np.concatenate(first), np.concatenate(second)


class MergeMLP(nnx.Module):
    """LayerNorm(fc2(gelu(fc1(x)))): the resampler's spatial and temporal mixing."""

    def __init__(self, d_in: int, d_out: int, eps: float, *, init_std, dtype, param_dtype, rngs=None):
        common = dict(init_std=init_std, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Linear(d_in, d_out, ("embed", "mlp"), **common)
        self.fc2 = Linear(d_out, d_out, ("mlp", "embed"), **common)
        self.norm = LayerNorm(d_out, eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.norm(self.fc2(jax.nn.gelu(self.fc1(x), approximate=False)))


class Resampler(nnx.Module):
    """Patch features [P, Dv] -> decoder tokens [P / (m^2 * 2), D] for video, [P / m^2, D] for images."""

    def __init__(self, cfg: VLConfig, *, dtype, param_dtype, rngs=None):
        v, t = cfg.vision, cfg.text
        m = v.merged_dim
        common = dict(init_std=t.initializer_range, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.merge = v.spatial_merge_size
        self.merged_dim = m
        self.spatial = MergeMLP(m, m, v.rms_norm_eps, **common)
        self.temporal = MergeMLP(2 * m, m, v.rms_norm_eps, **common)
        self.proj = Linear(m, t.hidden_size, ("mlp", "embed"), **common)
        self.after_norm = RMSNorm(t.hidden_size, t.rms_norm_eps, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, features: jax.Array, grid_thw) -> jax.Array:
        # Consecutive m*m patches are one merge block (the processor's order), so a reshape merges them.
        merged = self.spatial(features.reshape(-1, self.merged_dim))  # [P / m^2, M]
        first, second = frame_pairs(grid_thw, self.merge)
        paired = jnp.concatenate([merged[first], merged[second]], axis=-1)  # [tokens, 2M]
        return self.after_norm(self.proj(self.temporal(paired)))  # [tokens, D]

    def packed(self, features: jax.Array) -> jax.Array:
        """Rows of image patches [B, P, Dv] -> [B, P / m^2, D]: each merge block one token, every image paired with
        itself in the temporal merge (a row of images only; video frames pair up and are not packed here)."""
        b, p, _ = features.shape
        merged = self.spatial(features.reshape(b, p // self.merge**2, self.merged_dim))  # [B, Q, M]
        paired = jnp.concatenate([merged, merged], axis=-1)  # [B, Q, 2M]
        return self.after_norm(self.proj(self.temporal(paired)))  # [B, Q, D]
