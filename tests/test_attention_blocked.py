"""The XLA attention path's causal query blocks (pallas_kernels/flash_attention/blocked.py) against the twin:
forward and dq/dk/dv for sequence lengths that do and do not divide into blocks, queries that are the last T of S
keys (a prefill chunk after a cache), packed documents with padding, GQA, fp32 and bf16; and the work it skips,
from XLA's own FLOP count, so a silent fallback to the full score matrix fails here."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.flash_attention.blocked import MAX_BLOCKS, attention_blocked, query_block_length
from pallas_kernels.flash_attention.reference import attention_reference
from tests.helpers import assert_close

B, N, K, H = 2, 4, 2, 16


def _inputs(t, s, dtype, seed=0):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(B, t, N, H), dtype)
    k = jnp.asarray(rng.randn(B, s, K, H), dtype)
    v = jnp.asarray(rng.randn(B, s, K, H), dtype)
    do = jnp.asarray(rng.randn(B, t, N, H), dtype)
    return q, k, v, do


def _documents(t):
    """Row 0: documents of 7, 50 and the rest minus 9 tokens, then 9 of padding (id 0); row 1: one document."""
    row0 = np.concatenate([np.full(7, 1), np.full(50, 2), np.full(t - 66, 3), np.zeros(9)])
    return jnp.asarray(np.stack([row0, np.ones(t)]), jnp.int32)


def _fwd_vjp(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize(
    "t,s,block,packed",
    [
        (128, 128, 32, False),  # four whole blocks
        (100, 100, 32, False),  # the last block short
        (96, 160, 32, False),  # queries are the last 96 of 160 keys
        (130, 130, None, True),  # documents and padding; the default block length
    ],
)
def test_blocked_matches_twin(t, s, block, packed, dtype):
    q, k, v, do = _inputs(t, s, dtype)
    seg = _documents(t) if packed else None
    got = jax.jit(lambda *a: _fwd_vjp(lambda q, k, v: attention_blocked(q, k, v, segment_ids=seg, block_q=block), *a))(
        q, k, v, do
    )
    want = jax.jit(lambda *a: _fwd_vjp(lambda q, k, v: attention_reference(q, k, v, segment_ids=seg), *a))(q, k, v, do)
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        assert_close(a, b, dtype, name)


def _flops(fn, *args) -> float:
    return jax.jit(fn).lower(*args).compile().cost_analysis()["flops"]


def test_blocks_skip_the_masked_half():
    """XLA's FLOP count: at T=512 the blocks do under 70% of the twin's work (4 blocks of 128 queries do 10/16 of its
    score and value matmuls); non-causal attention and single-token decoding take the twin unchanged."""
    q, k, v, do = _inputs(512, 512, jnp.float32)
    full = _flops(lambda q, k, v: attention_reference(q, k, v), q, k, v)
    blocked = _flops(lambda q, k, v: pallas_kernels.flash_attention(q, k, v, implementation="xla"), q, k, v)
    assert blocked < 0.7 * full, (blocked, full)
    train_full = _flops(lambda *a: _fwd_vjp(attention_reference, *a), q, k, v, do)
    train_blocked = _flops(lambda *a: _fwd_vjp(attention_blocked, *a), q, k, v, do)
    assert train_blocked < 0.7 * train_full, (train_blocked, train_full)

    assert _flops(lambda q, k, v: attention_blocked(q, k, v, causal=False), q, k, v) == _flops(
        lambda q, k, v: attention_reference(q, k, v, causal=False), q, k, v
    )
    q1 = q[:, :1]
    assert _flops(attention_blocked, q1, k, v) == _flops(attention_reference, q1, k, v)


def test_query_block_length():
    assert [query_block_length(t) for t in (1, 64, 128, 256, 512, 1024, 4096)] == [32, 32, 32, 64, 128, 128, 256]
    assert all(-(-t // query_block_length(t)) <= MAX_BLOCKS for t in range(1, 10_000, 37))
