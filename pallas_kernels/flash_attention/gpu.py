"""Pallas-Triton flash attention for GPU: same contract as `pallas_kernels.flash_attention.tpu` (forward/backward).

Layout q/o [B, N, T, H], k/v [B, K, S, H]. One program per (batch, head, block); the kv (or q) sweep is a
`fori_loop` inside the program whose causal bound is computed, so blocks above the diagonal are never loaded.
GQA: a query head's program reads the K/V of head n // G; the dkv program of kv head h loops over its G query
heads, so dK/dV are accumulated in registers and written once (no atomics, K/V never repeated).
Triton wants power-of-two blocks >= 16 and head_dim a power of two (128 for ERNIE).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import out_struct
from pallas_kernels.flash_attention.blocks import Static, block_mask, dot_f32
from pallas_kernels.flash_attention.reference import MASK_VALUE


def _kv_stop(cfg: Static, q_lo, nk: int):
    """Number of kv blocks a q block at positions [q_lo, q_lo + bq) needs."""
    if not cfg.causal:
        return nk
    return jnp.minimum((q_lo + cfg.block_q - 1) // cfg.block_k + 1, nk)


def _fwd_kernel(*refs, cfg: Static, offset: int, nk: int):
    if cfg.segments:
        q_ref, k_ref, v_ref, qs_ref, ks_ref, o_ref, lse_ref = refs
    else:
        (q_ref, k_ref, v_ref, o_ref, lse_ref), qs_ref, ks_ref = refs, None, None
    bq, bk = cfg.block_q, cfg.block_k
    q_lo = pl.program_id(2) * bq + offset
    q = q_ref[...]  # [bq, H]
    qs = qs_ref[...][:, None] if cfg.segments else None

    def step(kb, carry):
        m_prev, l_prev, acc = carry
        k_lo = kb * bk
        k, v = k_ref[pl.ds(k_lo, bk), :], v_ref[pl.ds(k_lo, bk), :]  # [bk, H]
        s = dot_f32(q, k, 1, 1) * cfg.scale  # [bq, bk] fp32
        ks = ks_ref[pl.ds(k_lo, bk)][None, :] if cfg.segments else None
        mask = block_mask(cfg, q_lo, k_lo, s.shape, 0, qs, ks)
        if mask is not None:
            s = jnp.where(mask, s, MASK_VALUE)
        m_new = jnp.maximum(m_prev, jnp.max(s, axis=1))
        p = jnp.exp(s - m_new[:, None])
        alpha = jnp.exp(m_prev - m_new)
        acc = alpha[:, None] * acc + dot_f32(p.astype(v.dtype), v, 1, 0)
        return m_new, alpha * l_prev + jnp.sum(p, axis=1), acc

    init = (
        jnp.full((bq,), MASK_VALUE, jnp.float32),
        jnp.zeros((bq,), jnp.float32),
        jnp.zeros(q.shape, jnp.float32),
    )
    m, denom, acc = jax.lax.fori_loop(0, _kv_stop(cfg, q_lo, nk), step, init)
    o_ref[...] = (acc / denom[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log(denom)


def _specs_q_major(cfg: Static, b_n_t_h, s: int, g: int, extra_q: int):
    """BlockSpecs for a (B, N, q blocks) grid: q-shaped blocks, whole-sequence K/V blocks of head n // g."""
    h = b_n_t_h[3]
    bq = cfg.block_q
    q_spec = pl.BlockSpec((None, None, bq, h), lambda b, n, i: (b, n, i, 0))
    kv_spec = pl.BlockSpec((None, None, s, h), lambda b, n, i: (b, n // g, 0, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda b, n, i: (b, n, i))
    specs = [q_spec, kv_spec, kv_spec] + [q_spec] * extra_q
    seg_specs = [pl.BlockSpec((None, bq), lambda b, n, i: (b, i)), pl.BlockSpec((None, s), lambda b, n, i: (b, 0))]
    return specs, row_spec, seg_specs, q_spec


def _compiler():
    return plgpu.CompilerParams(num_warps=4, num_stages=2)


def forward(q, k, v, q_seg, kv_seg, cfg: Static):
    """q [B, N, T, H], k/v [B, K, S, H] -> o [B, N, T, H], lse [B, N, T] fp32."""
    b, n, t, h = q.shape
    s = k.shape[2]
    g = n // k.shape[1]
    specs, row_spec, seg_specs, q_spec = _specs_q_major(cfg, q.shape, s, g, 0)
    args = [q, k, v]
    if cfg.segments:
        specs, args = specs + seg_specs, args + [q_seg, kv_seg]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg=cfg, offset=s - t, nk=s // cfg.block_k),
        out_shape=(out_struct(q.shape, q.dtype, *args), out_struct((b, n, t), jnp.float32, *args)),
        grid=(b, n, t // cfg.block_q),
        in_specs=specs,
        out_specs=(q_spec, row_spec),
        compiler_params=_compiler(),
        interpret=cfg.interpret,
        name="ernie_flash_fwd_triton",
    )(*args)


def _dq_kernel(*refs, cfg: Static, offset: int, nk: int):
    if cfg.segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, qs_ref, ks_ref, dq_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dq_ref), qs_ref, ks_ref = refs, None, None
    bk = cfg.block_k
    q_lo = pl.program_id(2) * cfg.block_q + offset
    q, do = q_ref[...], do_ref[...]
    lse, d = lse_ref[...][:, None], d_ref[...][:, None]
    qs = qs_ref[...][:, None] if cfg.segments else None

    def step(kb, acc):
        k_lo = kb * bk
        k, v = k_ref[pl.ds(k_lo, bk), :], v_ref[pl.ds(k_lo, bk), :]
        p = jnp.exp(dot_f32(q, k, 1, 1) * cfg.scale - lse)  # [bq, bk]
        ks = ks_ref[pl.ds(k_lo, bk)][None, :] if cfg.segments else None
        mask = block_mask(cfg, q_lo, k_lo, p.shape, 0, qs, ks)
        if mask is not None:
            p = jnp.where(mask, p, 0.0)
        ds = p * (dot_f32(do, v, 1, 1) - d)
        return acc + dot_f32(ds.astype(k.dtype), k, 1, 0)

    acc = jax.lax.fori_loop(0, _kv_stop(cfg, q_lo, nk), step, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = (acc * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg: Static, offset: int, g: int, nq: int):
    if cfg.segments:
        q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, qs_ref, ks_ref, dk_ref, dv_ref = refs
    else:
        (q_ref, k_ref, v_ref, do_ref, lse_ref, d_ref, dk_ref, dv_ref), qs_ref, ks_ref = refs, None, None
    bq = cfg.block_q
    k_lo = pl.program_id(2) * cfg.block_k
    k, v = k_ref[...], v_ref[...]  # [bk, H]
    ks = ks_ref[...][:, None] if cfg.segments else None
    # Causal: q blocks wholly before this kv block see none of it.
    first = jnp.clip((k_lo - offset) // bq, 0, nq) if cfg.causal else 0

    def step(qb, carry, gi):
        dk, dv = carry
        q_lo = qb * bq
        q, do = q_ref[gi, pl.ds(q_lo, bq), :], do_ref[gi, pl.ds(q_lo, bq), :]  # [bq, H]
        lse, d = lse_ref[gi, pl.ds(q_lo, bq)][None, :], d_ref[gi, pl.ds(q_lo, bq)][None, :]
        pt = jnp.exp(dot_f32(k, q, 1, 1) * cfg.scale - lse)  # [bk, bq]
        qs = qs_ref[pl.ds(q_lo, bq)][None, :] if cfg.segments else None
        mask = block_mask(cfg, q_lo + offset, k_lo, pt.shape, 1, qs, ks)
        if mask is not None:
            pt = jnp.where(mask, pt, 0.0)
        dv = dv + dot_f32(pt.astype(do.dtype), do, 1, 0)
        dst = pt * (dot_f32(v, do, 1, 1) - d)
        return dk + dot_f32(dst.astype(q.dtype), q, 1, 0), dv

    carry = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    for gi in range(g):  # the G query heads sharing this kv head (static, <= 8 for ERNIE)
        carry = jax.lax.fori_loop(first, nq, functools.partial(step, gi=gi), carry)
    dk_ref[...] = (carry[0] * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = carry[1].astype(dv_ref.dtype)


def backward(q, k, v, q_seg, kv_seg, o, lse, do, cfg: Static):
    """Gradients of `forward`: (dq [B, N, T, H], dk, dv [B, K, S, H])."""
    b, n, t, h = q.shape
    kvh, s = k.shape[1], k.shape[2]
    g, offset = n // kvh, s - t
    d = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)  # [B, N, T]

    specs, row_spec, seg_specs, q_spec = _specs_q_major(cfg, q.shape, s, g, 1)
    args = [q, k, v, do, lse, d]
    specs = specs + [row_spec, row_spec]
    if cfg.segments:
        specs, args = specs + seg_specs, args + [q_seg, kv_seg]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, offset=offset, nk=s // cfg.block_k),
        out_shape=out_struct(q.shape, q.dtype, *args),
        grid=(b, n, t // cfg.block_q),
        in_specs=specs,
        out_specs=q_spec,
        compiler_params=_compiler(),
        interpret=cfg.interpret,
        name="ernie_flash_dq_triton",
    )(*args)

    # dkv: grid (B, K, kv blocks); q-side operands are the G heads of kv head hi, whole sequence.
    bk = cfg.block_k
    kv_spec = pl.BlockSpec((None, None, bk, h), lambda bi, hi, j: (bi, hi, j, 0))
    qg_spec = pl.BlockSpec((None, g, t, h), lambda bi, hi, j: (bi, hi, 0, 0))
    rowg_spec = pl.BlockSpec((None, g, t), lambda bi, hi, j: (bi, hi, 0))
    specs = [qg_spec, kv_spec, kv_spec, qg_spec, rowg_spec, rowg_spec]
    args = [q, k, v, do, lse, d]
    if cfg.segments:
        specs += [
            pl.BlockSpec((None, t), lambda bi, hi, j: (bi, 0)),
            pl.BlockSpec((None, bk), lambda bi, hi, j: (bi, j)),
        ]
        args += [q_seg, kv_seg]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, offset=offset, g=g, nq=t // cfg.block_q),
        out_shape=(out_struct(k.shape, k.dtype, *args), out_struct(v.shape, v.dtype, *args)),
        grid=(b, kvh, s // bk),
        in_specs=specs,
        out_specs=(kv_spec, kv_spec),
        compiler_params=_compiler(),
        interpret=cfg.interpret,
        name="ernie_flash_dkv_triton",
    )(*args)
    return dq, dk, dv
