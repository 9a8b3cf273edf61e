"""Shared test helpers: the one tolerance table, tiny configs shrunk from the real presets, HF checkpoint builders."""

from __future__ import annotations

import json
import os

import jax.numpy as jnp
import numpy as np

from ernie_jax.config import ERNIE_4_5_0P3B, ERNIE_4_5_21B_A3B, ErnieConfig

# The one tolerance table (absolute, relative), keyed by dtype. fp32: the 1e-4 logit bar.
_TOLERANCES = {
    np.dtype(np.float32): (1e-4, 1e-5),
    np.dtype(jnp.bfloat16): (6e-2, 6e-2),
}


def tolerances(dtype) -> dict[str, float]:
    atol, rtol = _TOLERANCES[np.dtype(dtype)]
    return {"atol": atol, "rtol": rtol}


def assert_close(actual, expected, dtype, what: str = "", *, scaled: bool = False) -> float:
    """assert_allclose with the dtype's tolerance; returns max |actual - expected| for reporting.

    scaled=True for sums over many terms whose order legitimately differs (gradients reduced over a mesh): the
    absolute tolerance grows to rtol times the array's largest magnitude, as its rounding error does."""
    actual = np.asarray(actual, np.float32)
    expected = np.asarray(expected, np.float32)
    tol = tolerances(dtype)
    if scaled and expected.size:
        tol["atol"] = max(tol["atol"], tol["rtol"] * float(np.max(np.abs(expected))))
    np.testing.assert_allclose(actual, expected, err_msg=what, **tol)
    return float(np.max(np.abs(actual - expected)))


# Tiny shapes shrunk from the released presets (dataclasses.replace keeps every other field real).
TINY_DIMS = dict(
    vocab_size=128,
    hidden_size=32,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    initializer_range=0.1,
)

TINY_DENSE = ERNIE_4_5_0P3B.replace(**TINY_DIMS, intermediate_size=48, num_hidden_layers=2, head_dim=16)
TINY_MOE = ERNIE_4_5_21B_A3B.replace(
    **TINY_DIMS,
    intermediate_size=64,
    num_hidden_layers=3,
    moe_num_experts=8,
    moe_k=2,
    moe_intermediate_size=16,
    moe_num_shared_experts=2,
    moe_layer_start_index=1,
    moe_layer_end_index=2,
)
# MoE every second layer, biases everywhere, no shared experts, untied head (like 300B's head).
TINY_MOE_INTERVAL = TINY_MOE.replace(
    num_hidden_layers=4,
    moe_layer_start_index=0,
    moe_layer_end_index=-1,
    moe_layer_interval=2,
    moe_num_shared_experts=0,
    use_bias=True,
    tie_word_embeddings=False,
)


def hf_model(cfg: ErnieConfig, seed: int = 0, correction_bias: np.ndarray | None = None):
    """A transformers model for `cfg` with random weights, norms and biases (so every tensor matters)."""
    import torch
    from transformers import Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM, Ernie4_5Config, Ernie4_5ForCausalLM

    hf_cfg = cfg.to_hf_config()
    config_cls, model_cls = (
        (Ernie4_5_MoeConfig, Ernie4_5_MoeForCausalLM) if cfg.is_moe else (Ernie4_5Config, Ernie4_5ForCausalLM)
    )
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{k: v for k, v in hf_cfg.items() if k not in ("architectures", "model_type")}))
    model = model.float().eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
        if correction_bias is not None:
            for name, p in model.named_parameters():
                if name.endswith("e_score_correction_bias"):
                    p.copy_(torch.as_tensor(correction_bias, dtype=torch.float32).reshape(p.shape))
    return model


def save_hf(model, path: str | os.PathLike) -> str:
    model.save_pretrained(path)
    return os.fspath(path)


def hf_logits(model, ids: np.ndarray, attention_mask=None, position_ids=None) -> np.ndarray:
    import torch

    kwargs = {}
    if attention_mask is not None:
        kwargs["attention_mask"] = torch.as_tensor(np.asarray(attention_mask))
    if position_ids is not None:
        kwargs["position_ids"] = torch.as_tensor(np.asarray(position_ids))
    with torch.no_grad():
        return model(torch.as_tensor(np.asarray(ids)), **kwargs).logits.float().numpy()


def released_layout_config(cfg: ErnieConfig) -> dict:
    """config.json the way Baidu's released -PT repos write it (top-level rope_theta, no head_dim, extra keys)."""
    out = cfg.to_hf_config()
    out.pop("rope_parameters")
    out.pop("head_dim")
    out["rope_theta"] = cfg.rope_theta
    out["torch_dtype"] = "bfloat16"
    if cfg.is_moe:
        out.update(
            moe_layer_end_index=-1,
            moe_capacity=[64, 64, 64],
            moe_gate="topk",
            moe_use_aux_free=True,
            moe_layer_start_index=cfg.moe_layer_start_index,
        )
    return out


def write_json(path, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def random_ids(batch: int, length: int, vocab: int, seed: int = 0) -> np.ndarray:
    return np.random.RandomState(seed).randint(0, vocab, (batch, length)).astype(np.int32)


# A few-second training run of the tiny preset (CLI overrides), shared by the training tests.
SMALL_TRAIN_OVERRIDES = [
    "model.num_hidden_layers=2",
    "model.hidden_size=64",
    "model.intermediate_size=128",
    "model.head_dim=16",
    "model.moe_intermediate_size=32",
    "data.seq_len=32",
    "data.global_batch_size=8",
    "log_every=1",
    "sample_tokens=0",
    # the preset trains an MTP head; these tests do not need one (tests/test_mtp.py does)
    "mtp.depth=0",
    "model.num_nextn_predict_layers=0",
]


def tpu_topology_devices(topology: str):
    """The devices of a TPU topology (e.g. "v5p:2x2x1") to compile for from this CPU host.

    Skips, with the reason, only when libtpu is not installed; with libtpu present, any failure is a test failure.
    """
    import pytest

    pytest.importorskip("libtpu", reason="TPU AOT compiles need libtpu: pip install -e '.[tpu]'")
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=topology).devices
