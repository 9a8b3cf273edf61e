"""permute_rows: x[perm] whose gradient is a gather, and the MoE dispatch built on it has no row scatters."""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from ernie_jax.moe import expert_parallel_moe
from ernie_jax.moe.permute import (
    inverse_permutation,
    permute_repeated,
    permute_rows,
    repeat_rows,
    unpermute_sum,
)
from ernie_jax.options import ModelOptions
from tests.helpers import assert_close

M, D = 13, 5


@pytest.mark.parametrize("which", ["random", "identity", "reversed"])
def test_permute_rows_matches_indexing_forward_and_grad(which):
    x = jax.random.normal(jax.random.key(0), (M, D))
    cot = jax.random.normal(jax.random.key(1), (M, D))
    perm = {
        "random": jax.random.permutation(jax.random.key(2), M),
        "identity": jnp.arange(M),
        "reversed": jnp.arange(M)[::-1],
    }[which].astype(jnp.int32)
    np.testing.assert_array_equal(inverse_permutation(perm)[perm], np.arange(M))
    np.testing.assert_array_equal(jax.jit(permute_rows)(x, perm), x[perm])
    ours = jax.jit(jax.grad(lambda x, p: jnp.sum(permute_rows(x, p) * cot)))(x, perm)
    ref = jax.grad(lambda x: jnp.sum(x[perm] * cot))(x)
    np.testing.assert_allclose(ours, ref, rtol=0, atol=0)
    # With the inverse passed in, and repeated rows (x[order // k]): gradient sums the k copies.
    k = 3
    order = jax.random.permutation(jax.random.key(3), M * k).astype(jnp.int32)
    cot_k = jax.random.normal(jax.random.key(4), (M * k, D))
    ours = jax.grad(lambda x: jnp.sum(permute_rows(repeat_rows(x, k), order, inverse_permutation(order)) * cot_k))(x)
    ref = jax.grad(lambda x: jnp.sum(x[order // k] * cot_k))(x)
    np.testing.assert_allclose(ours, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["f32", "bf16"])
def test_permute_repeated_and_unpermute_sum_match_indexing(dtype):
    """x[order // k] read straight from x, and its transpose (un-permute, sum each token's k rows in fp32):
    values and gradients equal plain indexing's, and each one's gradient is the other."""
    k = 3
    x = jax.random.normal(jax.random.key(0), (M, D)).astype(dtype)
    y = jax.random.normal(jax.random.key(1), (M * k, D)).astype(dtype)
    order = jax.random.permutation(jax.random.key(2), M * k).astype(jnp.int32)
    inverse = inverse_permutation(order)
    cot_rows = jax.random.normal(jax.random.key(3), (M * k, D)).astype(dtype)
    cot_tokens = jax.random.normal(jax.random.key(4), (M, D))

    def ref_sum(y):
        return y[inverse].reshape(M, k, D).astype(jnp.float32).sum(1)

    np.testing.assert_array_equal(jax.jit(permute_repeated, static_argnums=1)(x, k, order, inverse), x[order // k])
    summed = jax.jit(unpermute_sum, static_argnums=1)(y, k, inverse, order)
    assert summed.dtype == jnp.float32
    np.testing.assert_array_equal(summed, ref_sum(y))
    for ours, ref, arg in (
        (
            lambda x: jnp.sum(permute_repeated(x, k, order, inverse) * cot_rows),
            lambda x: jnp.sum(x[order // k] * cot_rows),
            x,
        ),
        (
            lambda y: jnp.sum(unpermute_sum(y, k, inverse, order) * cot_tokens),
            lambda y: jnp.sum(ref_sum(y) * cot_tokens),
            y,
        ),
    ):
        got = jax.jit(jax.grad(ours))(arg)
        assert got.dtype == arg.dtype
        # The reference in fp32 (indexing's own bf16 gradient rounds after every one of the k adds; ours sums the
        # k rows in fp32 and rounds once).
        want = jax.grad(ref)(arg.astype(jnp.float32))
        assert_close(got, want.astype(arg.dtype), dtype)


def _float_ops(jaxpr, is_match) -> list[str]:
    """Ops for which is_match(primitive name) holds, on float operands of rank >= 2, sub-jaxprs included."""
    found = []
    for eqn in jaxpr.eqns:
        if is_match(eqn.primitive.name):
            op = eqn.invars[0].aval
            if op.ndim >= 2 and jnp.issubdtype(op.dtype, jnp.floating):
                found.append(f"{eqn.primitive.name} {op.str_short()}")
        for param in eqn.params.values():
            for sub in param if isinstance(param, list | tuple) else (param,):
                if isinstance(sub, jex.ClosedJaxpr):
                    found += _float_ops(sub.jaxpr, is_match)
                elif isinstance(sub, jex.Jaxpr):
                    found += _float_ops(sub, is_match)
    return found


def _row_scatters(jaxpr) -> list[str]:
    # scatter, scatter-add, ...; not the reduce_scatter collective
    return _float_ops(jaxpr, lambda name: name.startswith("scatter"))


def _moe_args(n=16, d=8, f=4, e=8, k=2):
    keys = jax.random.split(jax.random.key(0), 6)
    x = jax.random.normal(keys[0], (n, d))
    experts = jax.random.randint(keys[1], (n, k), 0, e)
    weights = jax.nn.softmax(jax.random.normal(keys[2], (n, k)))
    w_gate, w_up = (jax.random.normal(kk, (e, d, f)) for kk in keys[3:5])
    w_down = jax.random.normal(keys[5], (e, f, d))
    return x, experts, weights, w_gate, w_up, w_down


def _grad_jaxpr(layer, args):
    def loss(x, experts, weights, *w):
        out = layer(x, experts, weights, *w)
        return jnp.sum(out[0] if isinstance(out, tuple) else out)  # the ragged body also returns its drop count

    return jax.make_jaxpr(jax.grad(loss, argnums=(0, 2, 3, 4, 5)))(*args).jaxpr


# The grouped matmul as the Pallas kernel (traced, not run): one pallas_call each way, so any row scatter left in
# the jaxpr belongs to the dispatch under test. (The jnp twin's blocked CPU form has scatters of its own.)
KERNEL_GMM = ModelOptions(gmm_impl="pallas")


@pytest.mark.parametrize("devices", [1, 8])
def test_allgather_dispatch_grad_has_no_row_scatters(devices):
    mesh = sharding.make_mesh(data=1, expert=devices, devices=jax.devices()[:devices])
    layer = functools.partial(expert_parallel_moe, mesh=mesh, options=KERNEL_GMM)
    assert _row_scatters(_grad_jaxpr(layer, _moe_args())) == []


def _ragged_layer():
    # Traced only: XLA:CPU cannot run ragged_all_to_all (passing the real op explicitly lets it be traced here).
    mesh = sharding.make_mesh(data=1, expert=8)
    return functools.partial(
        expert_parallel_moe,
        mesh=mesh,
        options=dataclasses.replace(KERNEL_GMM, moe_transport="ragged_a2a"),
        return_dropped=True,
        ragged_all_to_all=jax.lax.ragged_all_to_all,
    )


def test_ragged_dispatch_grad_has_no_row_scatters():
    assert _row_scatters(_grad_jaxpr(_ragged_layer(), _moe_args())) == []


def _buffer_psums(jaxpr) -> list[str]:
    return _float_ops(jaxpr, lambda name: name.startswith("psum"))


def test_ragged_dispatch_grad_has_no_buffer_all_reduce():
    # A device-invariant zeros output buffer would be pvary'd into ragged_all_to_all, and its transpose is a psum
    # of the whole worst-case buffer per layer (202 GiB per step per chip for a3b on v5p-64 before the fix).
    assert _buffer_psums(_grad_jaxpr(_ragged_layer(), _moe_args())) == []
