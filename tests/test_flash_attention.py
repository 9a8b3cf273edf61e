"""Flash attention kernels (TPU Mosaic and GPU Triton) in interpret mode against the twin: forward and dq/dk/dv,
GQA ratios 1/4/5/8 (K/V never repeated), causal and not, packed documents (segment ids) with boundaries
inside a row, padding, fp32 and bf16. Blocks are small so every row spans several q and kv blocks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels
from pallas_kernels.flash_attention import ops
from pallas_kernels.flash_attention.reference import attention_reference
from tests.helpers import assert_close

B, T, H = 2, 32, 16
BLOCKS = {"tpu": (8, 16), "gpu": (16, 16)}


def _inputs(n, kv, dtype, t=T, seed=0):
    rng = np.random.RandomState(seed)
    q = jnp.asarray(rng.randn(B, t, n, H), dtype)
    k = jnp.asarray(rng.randn(B, t, kv, H), dtype)
    v = jnp.asarray(rng.randn(B, t, kv, H), dtype)
    do = jnp.asarray(rng.randn(B, t, n, H), dtype)
    return q, k, v, do


def _documents(t=T, seed=0):
    """Row 0: three documents (boundaries mid-row, not on block edges), then padding (id 0). Row 1: one document."""
    del seed
    row0 = np.concatenate([np.full(5, 1), np.full(14, 2), np.full(t - 5 - 14 - 4, 3), np.zeros(4)])
    return jnp.asarray(np.stack([row0, np.ones(t)]), jnp.int32)


def _fwd_vjp(fn, q, k, v, do):
    out, vjp = jax.vjp(fn, q, k, v)
    return (out, *vjp(do))


def _compare(kernel, n, kv, dtype, *, causal=True, segment_ids=None, t=T, blocks=None):
    q, k, v, do = _inputs(n, kv, dtype, t=t)
    blocks = blocks or BLOCKS[kernel]
    got = jax.jit(
        lambda *a: _fwd_vjp(
            lambda q, k, v: ops.flash_attention(
                q, k, v, causal=causal, segment_ids=segment_ids, block_sizes=blocks, kernel=kernel, interpret=True
            ),
            *a,
        )
    )(q, k, v, do)
    want = _fwd_vjp(lambda q, k, v: attention_reference(q, k, v, causal=causal, segment_ids=segment_ids), q, k, v, do)
    errors = {}
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        errors[name] = assert_close(a, b, dtype, name)
    return errors


@pytest.mark.parametrize("n,kv", [(4, 4), (8, 2), (10, 2), (8, 1)], ids=["gqa1", "gqa4", "gqa5", "gqa8"])
def test_tpu_kernel_gqa_ratios_with_documents(n, kv):
    _compare("tpu", n, kv, jnp.float32, segment_ids=_documents())


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_tpu_kernel_dtypes(dtype, causal):
    _compare("tpu", 10, 2, dtype, causal=causal, segment_ids=_documents())
    if causal:
        _compare("tpu", 8, 2, dtype, causal=True)  # no segment ids: the mask-free specialisation


def test_tpu_kernel_pads_sequence_to_blocks():
    """T = 28 is not a multiple of the 8-row blocks: padded keys must be masked and padded queries dropped."""
    _compare("tpu", 8, 2, jnp.float32, t=28, blocks=(8, 8))
    _compare("tpu", 8, 2, jnp.float32, causal=False, t=28, blocks=(8, 8))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("n,kv", [(4, 4), (10, 2), (8, 1)], ids=["gqa1", "gqa5", "gqa8"])
def test_gpu_kernel(n, kv, dtype):
    _compare("gpu", n, kv, dtype, segment_ids=_documents())


def test_gpu_kernel_without_segments_and_noncausal():
    _compare("gpu", 8, 2, jnp.float32)
    _compare("gpu", 8, 2, jnp.float32, causal=False, segment_ids=_documents())


def test_dispatch():
    q, k, v, _ = _inputs(8, 2, jnp.float32)
    has_pallas = lambda impl: (
        "pallas_call"
        in str(jax.make_jaxpr(lambda q, k, v: pallas_kernels.flash_attention(q, k, v, implementation=impl))(q, k, v))
    )
    assert not has_pallas("auto")  # CPU: the twin
    assert not has_pallas("xla")
    assert has_pallas("pallas")  # CPU: the TPU kernel, interpreted
    with pytest.raises(ValueError, match="implementation"):
        pallas_kernels.flash_attention(q, k, v, implementation="cudnn")
    with pytest.raises(ValueError, match="multiple"):
        pallas_kernels.flash_attention(q, k[:, :, :1].repeat(3, 2), v[:, :, :1].repeat(3, 2), implementation="pallas")
    out = pallas_kernels.flash_attention(q, k, v, segment_ids=_documents(), implementation="pallas")
    assert_close(out, attention_reference(q, k, v, segment_ids=_documents()), jnp.float32)


def test_triton_kernels_lower_for_cuda():
    """The Triton forward/dq/dkv kernels lower to Triton IR at a3b head shapes (20 q / 4 kv heads of 128)."""
    sds = jax.ShapeDtypeStruct

    def grads(q, k, v, seg):
        loss = lambda q, k, v: jnp.sum(ops.flash_attention(q, k, v, segment_ids=seg, kernel="gpu").astype(jnp.float32))
        return jax.grad(loss, (0, 1, 2))(q, k, v)

    q, kv = sds((1, 512, 20, 128), jnp.bfloat16), sds((1, 512, 4, 128), jnp.bfloat16)
    text = jax.jit(grads).trace(q, kv, kv, sds((1, 512), jnp.int32)).lower(lowering_platforms=("cuda",)).as_text()
    for name in ("ernie_flash_fwd_triton", "ernie_flash_dq_triton", "ernie_flash_dkv_triton"):
        assert name in text, name
