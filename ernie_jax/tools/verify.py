"""Check this install against Hugging Face transformers: `python -m ernie_jax.verify`.

Builds a small random ERNIE 4.5 checkpoint with transformers' own `save_pretrained` (no download), loads it with
`ernie_jax.from_pretrained`, and prints the largest logit difference per variant. Needs the `test` extra (torch and
transformers). `--keep DIR` leaves the checkpoints there so you can load them yourself.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax.numpy as jnp
import numpy as np

import ernie_jax
from ernie_jax.config import ERNIE_4_5_0P3B, ERNIE_4_5_21B_A3B

SMALL = dict(vocab_size=512, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=128)
VARIANTS = {
    "ernie4_5 (dense, shrunk 0.3B)": ERNIE_4_5_0P3B.replace(**SMALL, num_hidden_layers=2, head_dim=32),
    "ernie4_5_moe (shrunk 21B-A3B)": ERNIE_4_5_21B_A3B.replace(
        **SMALL, num_hidden_layers=3, moe_num_experts=8, moe_k=2, moe_intermediate_size=32, moe_layer_end_index=2
    ),
}


def _transformers_checkpoint(cfg: ernie_jax.ErnieConfig, path: str):
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = cfg.to_hf_config()
    model_type = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures")
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_cfg)).float().eval()
    model.save_pretrained(path)
    return model


def worst_logit_difference(argv=None) -> float:
    """Build each variant with transformers, load it here, print and return the worst |Δlogit|."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--keep", help="write the checkpoints under this directory and keep them")
    args = parser.parse_args(argv)
    import torch

    root = args.keep or tempfile.mkdtemp(prefix="ernie-verify-")
    worst = 0.0
    for i, (name, cfg) in enumerate(VARIANTS.items()):
        path = os.path.join(root, f"variant{i}")
        hf = _transformers_checkpoint(cfg, path)
        ids = np.random.RandomState(i).randint(0, cfg.vocab_size, (2, 16))
        with torch.no_grad():
            ref = hf(torch.as_tensor(ids)).logits.numpy()
        model = ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False)
        diff = float(np.abs(np.asarray(model(jnp.asarray(ids))) - ref).max())
        worst = max(worst, diff)
        print(f"{name:32s} max |logit(ernie_jax) - logit(transformers)| = {diff:.2e}   ({path})")
    print("OK: logits match transformers" if worst <= 1e-4 else f"MISMATCH: {worst:.2e} > 1e-4")
    return worst


def main(argv=None) -> int:
    """Exit status 0 when every variant matches transformers within 1e-4 (fp32), else 1."""
    return 0 if worst_logit_difference(argv) <= 1e-4 else 1
