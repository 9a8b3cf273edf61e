"""The batch schema: what one training batch holds. The pipeline writes it, the trainer places it on the mesh and
the AOT report compiles against it; all of them read these names from here.

Every array is [B, T + n] (B rows of the global batch, or a process's share; T = data.seq_len; n = data.lookahead,
the mtp.depth extra tokens multi-token prediction reads past the main model's window, 0 without MTP):
  input_ids    int32    tokens fed to the model
  targets      int32    the token each position must predict (input_ids shifted by one within its document)
  segment_ids  int32    which packed document a token belongs to, 1, 2, ... per row; 0 = padding. Attention never
                        crosses documents.
  positions    int32    RoPE position within the token's document (restarts at 0 for each packed document)
  loss_mask    float32  1 where the target is learned: real tokens, and for SFT only assistant replies

data.format=vl_sft (`ernie_jax.vl.sft`) adds, for ERNIE-4.5-VL (`positions` is then the 3D RoPE time axis):
  positions_h, positions_w  int32    [B, T] the height and width axes of 3D RoPE
  token_types               int32    [B, T] the MoE gate: 1 for image placeholders and their start/end tokens
  pixel_values              float32  [B, P, C] each row's image patches (P = data.vision_patches, C per patch)
  patch_frames              int32    [B, P] the image of each patch, 1.. along the row; 0 = padding
  patch_rows, patch_cols    int32    [B, P] each patch's (row, column) in its image
"""

from __future__ import annotations

import numpy as np

BATCH_DTYPES: dict[str, np.dtype] = {
    "input_ids": np.dtype(np.int32),
    "targets": np.dtype(np.int32),
    "segment_ids": np.dtype(np.int32),
    "positions": np.dtype(np.int32),
    "loss_mask": np.dtype(np.float32),
}
BATCH_KEYS: tuple[str, ...] = tuple(BATCH_DTYPES)
VL_TOKEN_KEYS: tuple[str, ...] = ("positions_h", "positions_w", "token_types")  # [B, T]
VL_PATCH_KEYS: tuple[str, ...] = ("pixel_values", "patch_frames", "patch_rows", "patch_cols")  # [B, P(, C)]
VL_BATCH_DTYPES: dict[str, np.dtype] = {
    **{key: np.dtype(np.int32) for key in (*VL_TOKEN_KEYS, *VL_PATCH_KEYS)},
    "pixel_values": np.dtype(np.float32),
}


def batch_keys(data_format: str) -> tuple[str, ...]:
    """The keys of a batch of this data.format (the text keys, plus the VL keys for vl_sft)."""
    return BATCH_KEYS + (VL_TOKEN_KEYS + VL_PATCH_KEYS if data_format == "vl_sft" else ())


def make_batch(**arrays) -> dict[str, np.ndarray]:
    """A batch in the schema's key order and dtypes; a missing or unknown key is an error, not a silent default."""
    keys = batch_keys("vl_sft" if "pixel_values" in arrays else "text")
    if set(arrays) != set(keys):
        raise ValueError(f"a batch has exactly the keys {keys}; got {tuple(arrays)}")
    dtypes = {**BATCH_DTYPES, **VL_BATCH_DTYPES}
    return {key: np.asarray(arrays[key]).astype(dtypes[key], copy=False) for key in keys}
