"""What the TPU (Mosaic) and GPU (Triton) flash-attention kernels share: their static configuration and the
per-block causal/segment mask and fp32-accumulating dot."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Static:
    """Everything the kernels specialise on (hashable: a custom_vjp nondiff argument)."""

    block_q: int
    block_k: int
    scale: float
    causal: bool
    segments: bool
    interpret: bool = False


def block_mask(cfg: Static, q_lo, k_lo, shape, q_axis: int, qs=None, ks=None):
    """Boolean mask of a logits block; q_axis says which axis is queries (0 forward/dq, 1 for the dkv layout)."""
    mask = None
    if cfg.causal:
        q_pos = q_lo + jax.lax.broadcasted_iota(jnp.int32, shape, q_axis)
        k_pos = k_lo + jax.lax.broadcasted_iota(jnp.int32, shape, 1 - q_axis)
        mask = q_pos >= k_pos
    if cfg.segments:
        same = qs == ks  # [bq, 1] == [1, bk] (or transposed) -> block shape
        mask = same if mask is None else mask & same
    return mask


def dot_f32(a, b, ca: int, cb: int):
    """a · b contracting axis ca of a with axis cb of b, accumulated in fp32 (MXU and tensor cores alike)."""
    return jax.lax.dot_general(a, b, (((ca,), (cb,)), ((), ())), preferred_element_type=jnp.float32)
