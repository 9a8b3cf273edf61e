"""Differentiable flash attention on the Pallas kernels: layout, blocks, padding and the `jax.custom_vjp`.

The model's layout is q [B, T, N, H], k/v [B, S, K, H]; the kernels want head-major [B, N, T, H] so a block's
last two dims are (sequence tile, head_dim). The transposes are XLA copies of q/k/v/o only (never of the
[T, S] scores), and K/V keep their K heads: GQA is resolved by the kernels' index maps.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from pallas_kernels.common import match_vma, pick_tile, round_up

KERNELS = ("tpu", "gpu")


def _module(kernel: str):
    if kernel == "tpu":
        from pallas_kernels.flash_attention import tpu

        return tpu
    if kernel == "gpu":
        from pallas_kernels.flash_attention import gpu

        return gpu
    raise ValueError(f"flash_attention kernel must be one of {KERNELS}, got {kernel!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def _flash(q, k, v, q_seg, kv_seg, cfg, kernel):
    return _module(kernel).forward(q, k, v, q_seg, kv_seg, cfg)[0]


def _flash_fwd(q, k, v, q_seg, kv_seg, cfg, kernel):
    o, lse = _module(kernel).forward(q, k, v, q_seg, kv_seg, cfg)
    # Named, so a remat policy can keep them and skip this kernel when the backward recomputes a layer. The TPU
    # kernel's lse [B, N, T, 1] is kept without its unit lane axis (as it is, fp32, it is padded to 128 lanes).
    if kernel == "tpu":
        lse = lse[..., 0]
    q = checkpoint_name(q, "flash_q")
    k, v = checkpoint_name(k, "flash_kv"), checkpoint_name(v, "flash_kv")
    o, lse = checkpoint_name(o, "flash_out"), checkpoint_name(lse, "flash_out")
    return o, (q, k, v, q_seg, kv_seg, o, lse)


def _flash_bwd(cfg, kernel, residuals, do):
    q, k, v, q_seg, kv_seg, o, lse = residuals
    if kernel == "tpu":
        lse = lse[..., None]
    dq, dk, dv = _module(kernel).backward(q, k, v, q_seg, kv_seg, o, lse, do, cfg)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def default_blocks(t: int, s: int, kernel: str) -> tuple[int, int]:
    """512 x 512 on TPU (a 1 MiB fp32 score tile; 128-multiples divide every ERNIE sequence length we train),
    64 x 64 on GPU (Triton keeps the score tile in registers)."""
    if kernel == "gpu":
        return pick_tile(t, 64, (64, 32, 16)), pick_tile(s, 64, (64, 32, 16))
    return pick_tile(t, 512), pick_tile(s, 512)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    block_sizes: tuple[int, int] | None = None,
    kernel: str = "tpu",
    interpret: bool = False,
) -> jax.Array:
    """softmax(q k^T * scale + mask) v with fp32 logits and statistics, on a Pallas kernel.

    Args:
      q: [B, T, N, H]; k, v: [B, S, K, H], K dividing N (query head n reads kv head n // (N // K)).
      segment_ids: [B, T] ints (packed documents; equal ids attend); kv_segment_ids [B, S] defaults to it.
      block_sizes: (block_q, block_k); default `default_blocks`. T and S are padded to them when needed.
    Returns:
      [B, T, N, H] in q's dtype.
    """
    b, t, n, h = q.shape
    s, kvh = k.shape[1], k.shape[2]
    if n % kvh:
        raise ValueError(f"query heads {n} must be a multiple of kv heads {kvh}")
    from pallas_kernels.flash_attention.blocks import Static

    bq, bk = block_sizes or default_blocks(t, s, kernel)
    if segment_ids is not None and kv_segment_ids is None:
        kv_segment_ids = segment_ids
    t_pad, s_pad = round_up(t, bq), round_up(s, bk)
    if (t_pad != t or s_pad != s) and segment_ids is None:
        # Padded keys must be masked; segment ids do it (causal alone would not when S is padded).
        segment_ids, kv_segment_ids = jnp.zeros((b, t), jnp.int32), jnp.zeros((b, s), jnp.int32)
    if t_pad != t or s_pad != s:
        if s_pad - s != t_pad - t and causal:
            raise ValueError("causal attention needs S - T preserved by padding; pick blocks dividing T and S")
        pad = lambda x, to: jnp.pad(x, ((0, 0), (0, to - x.shape[1])) + ((0, 0),) * (x.ndim - 2))
        q, k, v = pad(q, t_pad), pad(k, s_pad), pad(v, s_pad)
        # Distinct negative ids for padding: padded keys match no query, padded queries are sliced off.
        segment_ids = jnp.pad(segment_ids.astype(jnp.int32), ((0, 0), (0, t_pad - t)), constant_values=-1)
        kv_segment_ids = jnp.pad(kv_segment_ids.astype(jnp.int32), ((0, 0), (0, s_pad - s)), constant_values=-2)
    cfg = Static(
        block_q=bq,
        block_k=bk,
        scale=float(h**-0.5 if sm_scale is None else sm_scale),
        causal=causal,
        segments=segment_ids is not None,
        interpret=bool(interpret),
    )
    q_seg = None if segment_ids is None else segment_ids.astype(jnp.int32)
    kv_seg = None if kv_segment_ids is None else kv_segment_ids.astype(jnp.int32)
    qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))  # [B, N, T, H], [B, K, S, H]
    if cfg.segments:
        qh, kh, vh, q_seg, kv_seg = match_vma(qh, kh, vh, q_seg, kv_seg)
    else:
        qh, kh, vh = match_vma(qh, kh, vh)
    out = jnp.swapaxes(_flash(qh, kh, vh, q_seg, kv_seg, cfg, kernel), 1, 2)  # [B, T_pad, N, H]
    return out[:, :t]
