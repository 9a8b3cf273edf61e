"""Logits match transformers' Ernie4_5ForCausalLM / Ernie4_5_MoeForCausalLM live, on small random checkpoints."""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ernie_jax
from ernie_jax.moe import route
from tests.helpers import (
    TINY_DENSE,
    TINY_MOE,
    TINY_MOE_INTERVAL,
    assert_close,
    hf_logits,
    hf_model,
    random_ids,
    released_layout_config,
    save_hf,
    write_json,
)

# A bias that outweighs any probability difference: experts 0 and 1 win every selection.
STRONG_BIAS = np.array([1.0, 0.9, 0, 0, 0, 0, 0, -0.5], np.float32)

VARIANTS = {
    "dense_tied": dict(cfg=TINY_DENSE),
    "moe_dense_first_shared": dict(cfg=TINY_MOE),
    "moe_interval2_bias_untied": dict(cfg=TINY_MOE_INTERVAL),
    "moe_correction_bias": dict(cfg=TINY_MOE, correction_bias=STRONG_BIAS),
}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    out = {}
    for name, spec in VARIANTS.items():
        model = hf_model(spec["cfg"], correction_bias=spec.get("correction_bias"))
        out[name] = (save_hf(model, tmp_path_factory.mktemp(name)), model)
    return out


def _check(name, ours, ref, dtype=np.float32):
    scale = float(np.abs(ref).max())
    assert scale > 1.0, f"{name}: reference logits too small ({scale}) for the comparison to mean anything"
    diff = assert_close(ours, ref, dtype, name)
    print(f"[parity] {name}: max|dlogit|={diff:.2e} (max|logit|={scale:.2f})")
    return diff


@pytest.mark.parametrize("name", list(VARIANTS))
def test_logits_match_transformers(checkpoints, name):
    path, hf = checkpoints[name]
    ids = random_ids(3, 11, VARIANTS[name]["cfg"].vocab_size, seed=1)
    model = ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False)
    _check(name, model(jnp.asarray(ids)), hf_logits(hf, ids))


def test_correction_bias_changes_selection_and_is_used(checkpoints):
    """The test checkpoint's bias really flips the routing, and dropping the bias breaks parity."""
    path, hf = checkpoints["moe_correction_bias"]
    model = ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False)
    moe = model.groups[1].layers[0].ffn
    x = jax.random.normal(jax.random.key(0), (64, TINY_MOE.hidden_size))
    biased = route(x, moe.router[...][0], moe.correction_bias[...][0], k=2, norm_min=1e-12)
    unbiased = route(x, moe.router[...][0], jnp.zeros(8), k=2, norm_min=1e-12)
    changed = np.mean(np.any(np.sort(biased.experts, -1) != np.sort(unbiased.experts, -1), axis=-1))
    assert changed > 0.5, f"bias changed only {changed:.0%} of selections"
    # Same mixing weights source: the unbiased probabilities of the chosen experts, renormalised.
    np.testing.assert_allclose(np.asarray(biased.weights).sum(-1), 1.0, rtol=1e-6)
    ids = random_ids(2, 9, TINY_MOE.vocab_size, seed=2)
    ref = hf_logits(hf, ids)
    moe.correction_bias[...] = jnp.zeros_like(moe.correction_bias[...])
    assert np.abs(np.asarray(model(jnp.asarray(ids))) - ref).max() > 1e-2, "parity held without the bias"


@pytest.mark.parametrize("name", ["dense_tied", "moe_dense_first_shared"])
def test_padded_batch_with_attention_mask(checkpoints, name):
    path, hf = checkpoints[name]
    cfg = VARIANTS[name]["cfg"]
    ids = random_ids(3, 10, cfg.vocab_size, seed=3)
    mask = np.ones_like(ids)
    mask[0, :4] = 0  # left padding
    mask[1, 7:] = 0  # right padding
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0).astype(np.int32)
    ref = hf_logits(hf, ids, attention_mask=mask, position_ids=positions)
    model = ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False)
    ours = np.asarray(model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions)))
    valid = mask.astype(bool)
    _check(f"{name}+padding", ours[valid], ref[valid])
    # Padding must matter: without the mask, row 0's real tokens see the pad tokens and change.
    unmasked = np.asarray(model(jnp.asarray(ids), positions=jnp.asarray(positions)))
    assert np.abs(unmasked[0, 4:] - ref[0, 4:]).max() > 1e-3


def test_released_layout_config(checkpoints, tmp_path):
    """A config.json in Baidu's released layout (top-level rope_theta, no head_dim, extra keys) loads the same."""
    path, hf = checkpoints["moe_dense_first_shared"]
    for f in os.listdir(path):
        if f.endswith(".safetensors"):
            os.symlink(os.path.join(path, f), tmp_path / f)
    write_json(tmp_path / "config.json", released_layout_config(TINY_MOE))
    model = ernie_jax.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    assert model.config == TINY_MOE.replace(moe_layer_end_index=-1)
    ids = random_ids(2, 8, TINY_MOE.vocab_size, seed=4)
    _check("released_layout_config", model(jnp.asarray(ids)), hf_logits(hf, ids))


@pytest.mark.parametrize("name", ["dense_tied", "moe_interval2_bias_untied", "moe_correction_bias"])
def test_round_trip_through_transformers(checkpoints, tmp_path, name):
    """ours.save_pretrained -> transformers.from_pretrained gives the original logits."""
    import torch
    from transformers import AutoModelForCausalLM

    path, hf = checkpoints[name]
    ids = random_ids(2, 9, VARIANTS[name]["cfg"].vocab_size, seed=5)
    model = ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False)
    ernie_jax.save_pretrained(model, tmp_path, progress=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    _check(f"{name}+roundtrip", hf_logits(reloaded, ids), hf_logits(hf, ids))


def test_bf16_forward_close_to_fp32(checkpoints):
    path, _ = checkpoints["moe_dense_first_shared"]
    ids = jnp.asarray(random_ids(2, 12, TINY_MOE.vocab_size, seed=6))
    fp32 = ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False)(ids)
    bf16_model = ernie_jax.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
    moe = bf16_model.groups[1].layers[0].ffn
    assert moe.w_gate[...].dtype == jnp.bfloat16 and moe.router[...].dtype == jnp.float32
    bf16 = bf16_model(ids)
    assert bf16.dtype == jnp.bfloat16
    diff = assert_close(bf16, fp32, jnp.bfloat16, "bf16 vs fp32")
    print(f"[parity] bf16 vs fp32: max|dlogit|={diff:.2e}")
