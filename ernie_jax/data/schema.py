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


def make_batch(**arrays) -> dict[str, np.ndarray]:
    """A batch in the schema's key order and dtypes; a missing or unknown key is an error, not a silent default."""
    if set(arrays) != set(BATCH_KEYS):
        raise ValueError(f"a batch has exactly the keys {BATCH_KEYS}; got {tuple(arrays)}")
    return {key: np.asarray(arrays[key]).astype(BATCH_DTYPES[key], copy=False) for key in BATCH_KEYS}
