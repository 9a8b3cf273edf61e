"""remat="attention" keeps the flash kernel's keys, values, output and softmax statistics for the backward pass (so
a recomputed layer runs no attention forward kernel), and keeps the statistics without their unit lane axis."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

from ernie_jax.model import REMAT_POLICIES
from pallas_kernels.flash_attention.ops import flash_attention

B, T, D, N, K, H = 1, 32, 16, 2, 1, 16


def _attention(x, wq, wk, wv):
    q = jnp.einsum("BTD,DNH->BTNH", x, wq)
    k = jnp.einsum("BTD,DKH->BTKH", x, wk)
    v = jnp.einsum("BTD,DKH->BTKH", x, wv)
    out = flash_attention(q, k, v, kernel="tpu", interpret=True, block_sizes=(16, 16))  # [B, T, N, H]
    return jnp.sum(out * out)


def _saved(remat: str, capsys) -> list[str]:
    args = (jnp.ones((B, T, D)), jnp.ones((D, N, H)), jnp.ones((D, K, H)), jnp.ones((D, K, H)))
    jax.ad_checkpoint.print_saved_residuals(jax.checkpoint(_attention, policy=REMAT_POLICIES[remat]), *args)
    return [line for line in capsys.readouterr().out.splitlines() if "from the argument" not in line]


@pytest.mark.parametrize("remat", ["full", "attention"])
def test_attention_policy_keeps_the_flash_residuals(remat, capsys):
    saved = _saved(remat, capsys)
    if remat == "full":
        assert saved == []
        return
    shapes = sorted(line.split(" named ")[0] + " " + line.split("'")[1] for line in saved)
    assert shapes == sorted(
        [
            f"f32[{B},{K},{T},{H}] flash_kv",  # keys and values, [B, K, S, H]
            f"f32[{B},{K},{T},{H}] flash_kv",
            f"f32[{B},{N},{T},{H}] flash_out",  # output [B, N, T, H]
            f"f32[{B},{N},{T}] flash_out",  # log-sum-exp, no unit lane axis
        ]
    ), saved
