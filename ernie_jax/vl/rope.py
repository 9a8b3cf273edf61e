"""Rotary position embeddings of ERNIE 4.5 VL: 3D (time, height, width) RoPE for the decoder, 2D for the vision tower.

Decoder (transformers' `Ernie4_5_VLMoeTextRotaryEmbedding`): every token has three positions (t, h, w); text tokens
repeat one 1D position on all three. Of the H/2 rotary frequencies inv_freq[i] = theta^(-2i/H), the first
h + w alternate between height (even i) and width (odd i) and the last t belong to time. Pair (2i, 2i+1) of a
head is rotated by position[axis(i)] * inv_freq[i] (ERNIE's interleaved pairs, as in the text models), so with
equal positions on the three axes this is exactly the text models' RoPE.

Vision tower (transformers' axial `Ernie4_5_VLMoeVisionRotaryEmbedding`): each patch has (row, column) in its image;
H/4 frequencies theta^(-4j/H) are applied to the row for the first quarter of the head and to the column for the
second, and that half is rotated against the other half of the head (rotate-half, not pairs).

Positions are computed on the host with numpy: they depend on `grid_thw` and the token types as values (they set
how many tokens an image has), as in transformers, which reads them with `.tolist()`.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np

from ernie_jax.layers import rope_inv_freq

TEXT, IMAGE, VIDEO = 0, 1, 2  # mm_token_type_ids values


def host_ints(x, name: str) -> np.ndarray:
    if isinstance(x, jax.core.Tracer):
        raise TypeError(
            f"{name} must be a concrete (host) array, not a traced value: it decides how many tokens each image and "
            "video has. Compute positions outside jit with ernie_jax.vl.rope_index and pass position_ids."
        )
    return np.asarray(x).astype(np.int64)


def vision_token_positions(grid_thw, start: int, temporal_merge: int, spatial_merge: int) -> np.ndarray:
    """[3, t' * h' * w'] positions (t, h, w) of one image or video's merged tokens, offset by `start`.

    grid_thw counts patches; the decoder sees t' = t // temporal_merge frames of h' x w' merged tokens.
    """
    t, h, w = (int(v) for v in grid_thw)
    grid_t, grid_h, grid_w = t // temporal_merge, h // spatial_merge, w // spatial_merge
    tt, hh, ww = np.meshgrid(np.arange(grid_t), np.arange(grid_h), np.arange(grid_w), indexing="ij")
    return np.stack([tt, hh, ww]).reshape(3, -1) + start


def rope_index(
    mm_token_type_ids,
    image_grid_thw=None,
    video_grid_thw=None,
    attention_mask=None,
    *,
    spatial_merge_size: int,
    temporal_merge_size: int,
) -> np.ndarray:
    """3D positions [3, B, T] (t, h, w) of every token, as transformers' `get_rope_index`.

    Each run of equal token types in a row is one segment: a text run advances the position by its length; an image
    (type 1) or video (type 2) run takes the next grid of its kind (in order over the whole batch) and its tokens get
    (frame, row, column) offset by the current position, which then advances by max(h, w) // spatial_merge_size.
    Padding (attention_mask 0) is skipped and gets position 0.
    """
    types = host_ints(mm_token_type_ids, "mm_token_type_ids")
    b, t = types.shape
    mask = np.ones((b, t), bool) if attention_mask is None else host_ints(attention_mask, "attention_mask") != 0
    unknown = sorted(set(np.unique(types[mask]).tolist()) - {TEXT, IMAGE, VIDEO})
    if unknown:
        raise ValueError(f"mm_token_type_ids: values must be 0 (text), 1 (image) or 2 (video), got {unknown}")
    grids = {
        IMAGE: iter(host_ints(image_grid_thw, "image_grid_thw") if image_grid_thw is not None else ()),
        VIDEO: iter(host_ints(video_grid_thw, "video_grid_thw") if video_grid_thw is not None else ()),
    }
    positions = np.zeros((3, b, t), np.int64)
    for row in range(b):
        row_types = types[row][mask[row]]
        pieces, current = [], 0
        for kind, run in itertools.groupby(row_types.tolist()):
            length = len(list(run))
            if kind == TEXT:
                pieces.append(np.broadcast_to(np.arange(length) + current, (3, length)))
                current += length
                continue
            name = "image" if kind == IMAGE else "video"
            grid = next(grids[kind], None)
            if grid is None:
                raise ValueError(f"row {row}: more {name} token runs than rows in {name}_grid_thw")
            merge_t = 1 if kind == IMAGE else temporal_merge_size
            block = vision_token_positions(grid, current, merge_t, spatial_merge_size)
            if block.shape[1] != length:
                raise ValueError(
                    f"row {row}: a run of {length} {name} tokens, but {name}_grid_thw {grid.tolist()} gives "
                    f"{block.shape[1]} tokens (t/{merge_t} * h/{spatial_merge_size} * w/{spatial_merge_size})"
                )
            pieces.append(block)
            current += max(int(grid[1]), int(grid[2])) // spatial_merge_size
        if pieces:
            positions[:, row, mask[row]] = np.concatenate(pieces, axis=1)
    return positions.astype(np.int32)


def mrope_angles(positions: jax.Array, head_dim: int, theta: float, mrope_section: tuple[int, int, int]) -> jax.Array:
    """Rotation angle of every frequency pair: positions [3, B, T] (t, h, w) -> [B, T, H/2] fp32."""
    h_w = mrope_section[0] + mrope_section[1]
    axis = np.where(np.arange(head_dim // 2) < h_w, 1 + np.arange(head_dim // 2) % 2, 0)  # 0 t, 1 h, 2 w
    per_pair = jnp.take(positions.astype(jnp.float32), jnp.asarray(axis), axis=0)  # [H/2, B, T]
    return jnp.moveaxis(per_pair, 0, -1) * rope_inv_freq(head_dim, theta)  # [B, T, H/2]


def vision_patch_positions(grid_thw, spatial_merge_size: int) -> np.ndarray:
    """(row, column) [P, 2] of every patch, in the processor's patch order: merge blocks of m x m patches row-major,
    patches row-major inside a block, frames one after another (transformers' `get_vision_position_ids`)."""
    out = []
    m = spatial_merge_size
    for t, h, w in host_ints(grid_thw, "grid_thw").tolist():
        rows, cols = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        blocks = lambda a, h=h, w=w: a.reshape(h // m, m, w // m, m).transpose(0, 2, 1, 3).reshape(-1)
        out.append(np.tile(np.stack([blocks(rows), blocks(cols)], axis=-1), (t, 1)))
    return np.concatenate(out, axis=0).astype(np.int32)


def vision_angles(patch_positions: jax.Array, head_dim: int, theta: float) -> jax.Array:
    """[P, 2] (row, column) -> [P, H/2] fp32: row angles for the first H/4 frequencies, column angles after."""
    inv_freq = rope_inv_freq(head_dim // 2, theta)  # [H/4]
    angles = patch_positions.astype(jnp.float32)[:, :, None] * inv_freq  # [P, 2, H/4]
    return angles.reshape(angles.shape[0], head_dim // 2)


def rotate_halves(x: jax.Array, angles: jax.Array) -> jax.Array:
    """Rotate element j of the first half of x [..., P, N, H] with element j of the second half by angles
    [..., P, H/2]."""
    h = x.shape[-1]
    cos = jnp.cos(angles)[..., None, :]  # [..., P, 1, H/2]
    sin = jnp.sin(angles)[..., None, :]
    x32 = x.astype(jnp.float32)
    first, second = x32[..., : h // 2], x32[..., h // 2 :]
    rotated = jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)
    return rotated.astype(x.dtype)
