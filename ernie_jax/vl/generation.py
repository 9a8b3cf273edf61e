"""Prompts with images for `ernie_jax.generate` on ERNIE-4.5-VL: placeholders expanded, images as packed rows.

`image_prompts` turns each prompt's images into the inputs the VL model's cached prompt forward takes
(`ErnieVLForConditionalGeneration.forward_cached`): every row's image patches side by side ([B, P, C], P the
largest row's patch count, with frame ids and (row, column) positions), the MoE token types, and the 3D RoPE
positions of the left-padded batch as transformers computes them (padding skipped). Decoding then goes on from
each row's largest position, one step per token, as transformers' `rope_deltas` do.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from ernie_jax.vl.config import VLConfig
from ernie_jax.vl.model import moe_token_types
from ernie_jax.vl.processor import ImageProcessor
from ernie_jax.vl.rope import IMAGE, rope_index, vision_patch_positions


def placeholder_runs(prompt: np.ndarray, token: int) -> list[tuple[int, int]]:
    """(start, length) of every run of `token` in a 1D prompt."""
    hit = np.concatenate([[False], prompt == token, [False]])
    starts = np.flatnonzero(hit[1:] & ~hit[:-1])
    stops = np.flatnonzero(~hit[1:] & hit[:-1])
    return [(int(a), int(b - a)) for a, b in zip(starts, stops, strict=True)]


def image_prompts(model, prompts: Sequence[Sequence[int]], images: Sequence, processor: ImageProcessor | None = None):
    """(prompts with each image's placeholders expanded, prompt_inputs(prompt_ids, row_start) -> model inputs).

    Raises ValueError naming the prompt when its placeholder runs do not match its images."""
    cfg = model.config
    if not isinstance(cfg, VLConfig):
        raise ValueError("generate(images=...): images need an ERNIE-4.5-VL model (ernie4_5_vl_moe checkpoint)")
    if len(images) != len(prompts):
        raise ValueError(f"generate: images has {len(images)} entries for {len(prompts)} prompts (one list each)")
    vision = cfg.vision
    if processor is None:
        processor = ImageProcessor(patch_size=vision.patch_size, merge_size=vision.spatial_merge_size)
    expanded, pixels, grids = [], [], []
    for i, (prompt, row_images) in enumerate(zip(prompts, images, strict=True)):
        prompt = np.asarray(prompt, np.int64)
        row_images = list(row_images or [])
        runs = placeholder_runs(prompt, cfg.image_token_id)
        if len(runs) != len(row_images):
            raise ValueError(
                f"generate: prompt {i} has {len(runs)} run(s) of image placeholders (id {cfg.image_token_id}) but "
                f"images[{i}] holds {len(row_images)} image(s); give one image per run"
            )
        batch = processor(row_images) if row_images else None
        grid = np.zeros((0, 3), np.int64) if batch is None else batch["image_grid_thw"]
        counts = np.prod(grid, axis=-1) // vision.spatial_merge_size**2
        repeats = np.ones(len(prompt), np.int64)
        for k, ((start, length), count) in enumerate(zip(runs, counts, strict=True)):
            if length not in (1, count):
                raise ValueError(
                    f"generate: prompt {i}'s image {k} has {length} placeholders; its {tuple(grid[k].tolist())} "
                    f"patch grid takes {count} (or give one placeholder, expanded here)"
                )
            repeats[start] = count if length == 1 else 1
        expanded.append(np.repeat(prompt, repeats).tolist())
        pixels.append(None if batch is None else batch["pixel_values"])
        grids.append(grid)

    def prompt_inputs(prompt_ids: np.ndarray, row_start: np.ndarray) -> dict[str, np.ndarray]:
        rows, width = prompt_ids.shape
        real = np.arange(width)[None, :] >= row_start[:, None]  # [B, W]
        mm_types = np.where((prompt_ids == cfg.image_token_id) & real, IMAGE, 0)
        all_grids = np.concatenate(grids) if any(len(g) for g in grids) else None
        positions = rope_index(
            mm_types,
            all_grids,
            attention_mask=real.astype(np.int32),
            spatial_merge_size=vision.spatial_merge_size,
            temporal_merge_size=vision.temporal_merge_size,
        )
        out = {"positions": positions, "token_types": moe_token_types(prompt_ids, cfg) * real}
        if all_grids is None:
            return out
        budget = max(int(np.prod(g, axis=-1).sum()) for g in grids)
        out["pixel_values"] = np.zeros((rows, budget, vision.patch_dim), np.float32)
        for key in ("patch_frames", "patch_rows", "patch_cols"):
            out[key] = np.zeros((rows, budget), np.int32)
        for r, (pv, grid) in enumerate(zip(pixels, grids, strict=False)):  # filler rows past the prompts: none
            if pv is None:
                continue
            n = len(pv)
            rows_cols = vision_patch_positions(grid, vision.spatial_merge_size)
            out["pixel_values"][r, :n] = pv
            out["patch_frames"][r, :n] = np.repeat(np.arange(1, len(grid) + 1), np.prod(grid, axis=-1))
            out["patch_rows"][r, :n], out["patch_cols"][r, :n] = rows_cols[:, 0], rows_cols[:, 1]
        return out

    return expanded, prompt_inputs
