"""Mosaic TPU flash attention: forward, dq and dkv kernels with GQA, causal and segment masks, fp32 statistics.

Kernel layout is head-major: q/o [B, N, T, H], k/v [B, K, S, H] (ops.py transposes from the model's [B, T, N, H]),
so every block's last two dims are (sequence tile, head_dim) as Mosaic wants. GQA never repeats K/V: the index
maps send query head n to kv head n // G (G = N // K), and the dkv kernel walks the G query heads of its kv head
as a grid axis, accumulating dK and dV across them.

Causal skipping: blocks entirely above the diagonal skip compute, and their index maps are clamped to the last
(forward, dq) or first (dkv) useful block so the pipeline does not fetch them either.
Queries are the last T of S keys (offset = S - T), matching the reference.
"""

from __future__ import annotations

import functools

import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import out_struct
from pallas_kernels.flash_attention.blocks import Static, block_mask, dot_f32
from pallas_kernels.flash_attention.reference import MASK_VALUE


def _fwd_kernel(*refs, cfg: Static, offset: int, nk: int):
    if cfg.segments:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
    else:
        q_ref, k_ref, v_ref, o_ref, lse_ref, m_scr, l_scr, acc_scr = refs
        qs_ref = ks_ref = None
    qi, ki = pl.program_id(2), pl.program_id(3)
    q_lo, k_lo = qi * cfg.block_q + offset, ki * cfg.block_k

    @pl.when(ki == 0)
    def _init():
        m_scr[...] = jnp.full_like(m_scr, MASK_VALUE)
        l_scr[...] = jnp.zeros_like(l_scr)
        acc_scr[...] = jnp.zeros_like(acc_scr)

    run = (k_lo <= q_lo + cfg.block_q - 1) if cfg.causal else True

    @pl.when(run)
    def _step():
        s = dot_f32(q_ref[...], k_ref[...], 1, 1) * cfg.scale  # [bq, bk] fp32
        qs, ks = (qs_ref[...], ks_ref[...]) if cfg.segments else (None, None)
        mask = block_mask(cfg, q_lo, k_lo, s.shape, 0, qs, ks)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_prev = m_scr[...]  # [bq, 1]
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
        p = jnp.exp(s - m_new)
        alpha = jnp.exp(m_prev - m_new)  # rescales what earlier kv blocks accumulated
        l_scr[...] = alpha * l_scr[...] + jnp.sum(p, axis=1, keepdims=True)
        acc_scr[...] = alpha * acc_scr[...] + dot_f32(p.astype(v_ref.dtype), v_ref[...], 1, 0)  # [bq, H]
        m_scr[...] = m_new

    @pl.when(ki == nk - 1)
    def _finish():
        denom = l_scr[...]  # [bq, 1]
        o_ref[...] = (acc_scr[...] / denom).astype(o_ref.dtype)
        lse_ref[...] = m_scr[...] + jnp.log(denom)


def _kv_index(cfg: Static, offset: int, qi, ki):
    """Forward/dq: past the diagonal, keep pointing at the last useful kv block (no new DMA)."""
    if not cfg.causal:
        return ki
    return jnp.minimum(ki, (qi * cfg.block_q + offset + cfg.block_q - 1) // cfg.block_k)


def _q_index(cfg: Static, offset: int, ki, qi, nq: int):
    """dkv: before the diagonal, keep pointing at the first useful q block."""
    if not cfg.causal:
        return qi
    first = jnp.clip((ki * cfg.block_k - offset) // cfg.block_q, 0, nq - 1)
    return jnp.maximum(qi, first)


def _params(*semantics):
    return pltpu.CompilerParams(dimension_semantics=semantics)


def forward(q, k, v, q_seg, kv_seg, cfg: Static):
    """q [B, N, T, H], k/v [B, K, S, H], q_seg [B, T] / kv_seg [B, S] int32 or None -> o, lse [B, N, T, 1]."""
    b, n, t, h = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g, bq, bk = n // kvh, cfg.block_q, cfg.block_k
    nq, nk, offset = t // bq, s // bk, s - t
    kv_map = lambda bi, ni, qi, ki: (bi, ni // g, _kv_index(cfg, offset, qi, ki), 0)
    in_specs = [
        pl.BlockSpec((None, None, bq, h), lambda bi, ni, qi, ki: (bi, ni, qi, 0)),
        pl.BlockSpec((None, None, bk, h), kv_map),
        pl.BlockSpec((None, None, bk, h), kv_map),
    ]
    args = [q, k, v]
    if cfg.segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda bi, ni, qi, ki: (bi, qi, 0)),
            pl.BlockSpec((None, 1, bk), lambda bi, ni, qi, ki: (bi, 0, _kv_index(cfg, offset, qi, ki))),
        ]
        args += [q_seg[:, :, None], kv_seg[:, None, :]]  # [B, T, 1] column, [B, 1, S] row
    out_map = lambda bi, ni, qi, ki: (bi, ni, qi, 0)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, offset=offset, nk=nk),
        out_shape=(out_struct(q.shape, q.dtype, *args), out_struct((b, n, t, 1), jnp.float32, *args)),
        grid=(b, n, nq, nk),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((None, None, bq, h), out_map), pl.BlockSpec((None, None, bq, 1), out_map)),
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, h), jnp.float32),
        ],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        cost_estimate=pl.CostEstimate(
            flops=4 * b * n * t * s * h // (2 if cfg.causal else 1),
            transcendentals=b * n * t * s // (2 if cfg.causal else 1),
            bytes_accessed=q.dtype.itemsize * (2 * q.size + 2 * k.size * nq),
        ),
        interpret=cfg.interpret,
        name="ernie_flash_fwd",
    )(*args)


def _dq_kernel(*refs, cfg: Static, offset: int, nk: int):
    if cfg.segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, qs_ref, ks_ref, dq_ref, acc_scr = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dq_ref, acc_scr = refs
        qs_ref = ks_ref = None
    qi, ki = pl.program_id(2), pl.program_id(3)
    q_lo, k_lo = qi * cfg.block_q + offset, ki * cfg.block_k

    @pl.when(ki == 0)
    def _init():
        acc_scr[...] = jnp.zeros_like(acc_scr)

    @pl.when((k_lo <= q_lo + cfg.block_q - 1) if cfg.causal else True)
    def _step():
        s = dot_f32(q_ref[...], k_ref[...], 1, 1) * cfg.scale  # [bq, bk]
        p = jnp.exp(s - lse_ref[...])  # lse column [bq, 1]
        qs, ks = (qs_ref[...], ks_ref[...]) if cfg.segments else (None, None)
        mask = block_mask(cfg, q_lo, k_lo, s.shape, 0, qs, ks)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        dp = dot_f32(do_ref[...], v_ref[...], 1, 1)  # [bq, bk]
        ds = p * (dp - d_ref[...])
        acc_scr[...] += dot_f32(ds.astype(k_ref.dtype), k_ref[...], 1, 0)  # [bq, H]

    @pl.when(ki == nk - 1)
    def _finish():
        dq_ref[...] = (acc_scr[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: Static, offset: int, g: int, nq: int):
    if cfg.segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, qs_ref, ks_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
    else:
        q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref, dk_scr, dv_scr = refs
        qs_ref = ks_ref = None
    ki, gi, qi = pl.program_id(2), pl.program_id(3), pl.program_id(4)
    q_lo, k_lo = qi * cfg.block_q + offset, ki * cfg.block_k

    @pl.when((gi == 0) & (qi == 0))
    def _init():
        dk_scr[...] = jnp.zeros_like(dk_scr)
        dv_scr[...] = jnp.zeros_like(dv_scr)

    @pl.when((q_lo + cfg.block_q - 1 >= k_lo) if cfg.causal else True)
    def _step():
        # Transposed logits [bk, bq] so dK and dV come out of plain (non-transposed-lhs) matmuls.
        st = dot_f32(k_ref[...], q_ref[...], 1, 1) * cfg.scale
        pt = jnp.exp(st - lse_ref[...])  # lse row [1, bq]
        qs, ks = (qs_ref[...], ks_ref[...]) if cfg.segments else (None, None)
        mask = block_mask(cfg, q_lo, k_lo, st.shape, 1, qs, ks)
        if mask is not None:
            pt = jnp.where(mask, pt, 0.0)
        dv_scr[...] += dot_f32(pt.astype(do_ref.dtype), do_ref[...], 1, 0)  # [bk, H]
        dpt = dot_f32(v_ref[...], do_ref[...], 1, 1)  # [bk, bq]
        dst = pt * (dpt - d_ref[...])
        dk_scr[...] += dot_f32(dst.astype(q_ref.dtype), q_ref[...], 1, 0)  # [bk, H]

    @pl.when((gi == g - 1) & (qi == nq - 1))
    def _finish():
        dk_ref[...] = (dk_scr[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_scr[...].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, o, lse, do, cfg: Static):
    """Gradients of `forward`: (dq [B, N, T, H], dk, dv [B, K, S, H])."""
    b, n, t, h = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g, bq, bk = n // kvh, cfg.block_q, cfg.block_k
    nq, nk, offset = t // bq, s // bk, s - t
    # D = rowsum(dO * O): the softmax-gradient correction, computed once in fp32 by XLA.
    d = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1, keepdims=True)  # [B, N, T, 1]

    # dq: grid (B, N, q blocks, kv blocks), kv innermost.
    kv_map = lambda bi, ni, qi, ki: (bi, ni // g, _kv_index(cfg, offset, qi, ki), 0)
    q_map = lambda bi, ni, qi, ki: (bi, ni, qi, 0)
    in_specs = [pl.BlockSpec((None, None, bq, h), q_map), pl.BlockSpec((None, None, bk, h), kv_map)]
    in_specs += [pl.BlockSpec((None, None, bk, h), kv_map), pl.BlockSpec((None, None, bq, h), q_map)]
    in_specs += [pl.BlockSpec((None, None, bq, 1), q_map)] * 2
    args = [q, k, v, do, lse, d]
    if cfg.segments:
        in_specs += [
            pl.BlockSpec((None, bq, 1), lambda bi, ni, qi, ki: (bi, qi, 0)),
            pl.BlockSpec((None, 1, bk), lambda bi, ni, qi, ki: (bi, 0, _kv_index(cfg, offset, qi, ki))),
        ]
        args += [q_seg[:, :, None], kv_seg[:, None, :]]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, offset=offset, nk=nk),
        out_shape=out_struct(q.shape, q.dtype, *args),
        grid=(b, n, nq, nk),
        in_specs=in_specs,
        out_specs=pl.BlockSpec((None, None, bq, h), q_map),
        scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary"),
        # Recomputes S = QK^T and dP = dO V^T, then dQ = dS K: three [T, S, H] matmuls per head.
        cost_estimate=pl.CostEstimate(
            flops=6 * b * n * t * s * h // (2 if cfg.causal else 1),
            transcendentals=b * n * t * s // (2 if cfg.causal else 1),
            bytes_accessed=q.dtype.itemsize * (3 * q.size + 2 * k.size * nq),
        ),
        interpret=cfg.interpret,
        name="ernie_flash_dq",
    )(*args)

    # dk, dv: grid (B, K, kv blocks, G, q blocks); the last two axes accumulate into one kv block.
    q_map5 = lambda bi, hi, ki, gi, qi: (bi, hi * g + gi, _q_index(cfg, offset, ki, qi, nq), 0)
    kv_map5 = lambda bi, hi, ki, gi, qi: (bi, hi, ki, 0)
    row_map5 = lambda bi, hi, ki, gi, qi: (bi, hi * g + gi, 0, _q_index(cfg, offset, ki, qi, nq))
    in_specs = [pl.BlockSpec((None, None, bq, h), q_map5), pl.BlockSpec((None, None, bk, h), kv_map5)]
    in_specs += [pl.BlockSpec((None, None, bk, h), kv_map5), pl.BlockSpec((None, None, bq, h), q_map5)]
    in_specs += [pl.BlockSpec((None, None, 1, bq), row_map5)] * 2
    # lse and D as rows [B, N, 1, T]: a free reshape, and the transposed logits broadcast along lanes.
    args = [q, k, v, do, lse.reshape(b, n, 1, t), d.reshape(b, n, 1, t)]
    if cfg.segments:
        in_specs += [
            pl.BlockSpec((None, 1, bq), lambda bi, hi, ki, gi, qi: (bi, 0, _q_index(cfg, offset, ki, qi, nq))),
            pl.BlockSpec((None, bk, 1), lambda bi, hi, ki, gi, qi: (bi, ki, 0)),
        ]
        args += [q_seg[:, None, :], kv_seg[:, :, None]]  # [B, 1, T] row, [B, S, 1] column
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, offset=offset, g=g, nq=nq),
        out_shape=(out_struct(k.shape, k.dtype, *args), out_struct(v.shape, v.dtype, *args)),
        grid=(b, kvh, nk, g, nq),
        in_specs=in_specs,
        out_specs=(pl.BlockSpec((None, None, bk, h), kv_map5), pl.BlockSpec((None, None, bk, h), kv_map5)),
        scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
        compiler_params=_params("parallel", "parallel", "parallel", "arbitrary", "arbitrary"),
        # Recomputes S and dP, then dV = P^T dO and dK = dS^T Q: four [T, S, H] matmuls per head.
        cost_estimate=pl.CostEstimate(
            flops=8 * b * n * t * s * h // (2 if cfg.causal else 1),
            transcendentals=b * n * t * s // (2 if cfg.causal else 1),
            bytes_accessed=q.dtype.itemsize * (2 * q.size * nk + 4 * k.size),
        ),
        interpret=cfg.interpret,
        name="ernie_flash_dkv",
    )(*args)
    return dq, dk, dv
