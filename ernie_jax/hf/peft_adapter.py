"""Write a model's LoRA adapters as a PEFT adapter directory for transformers' ERNIE 4.5 modules.

`peft.PeftModel.from_pretrained(base, DIR)` reads `adapter_config.json` and `adapter_model.safetensors`, whose
tensors are named after transformers' modules: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
[r, in] and `...lora_B.weight` [out, r]. PEFT's scaling (lora_alpha / r, or / sqrt(r) with use_rslora) is ours.

What a PEFT adapter cannot carry reaches transformers only folded into the merged model (`export_hf`):
- Routed experts: transformers keeps each layer's experts as fused 3D tensors (`mlp.experts.gate_up_proj`,
  `mlp.experts.down_proj`), not Linear modules, so PEFT's LoRA layers cannot be placed on them.
- Any gate/up/down projection of an MoE model (its dense layers and shared experts included): PEFT 0.21 with
  transformers 5 rewrites every `*.gate_proj` / `*.up_proj` / `*.down_proj` target of an `ernie4_5_moe` model into
  the fused routed-expert tensors (its v4-to-v5 MoE conversion), so such adapters would land on the wrong weights.
A dense model (`ernie4_5`) exports every adapter.
"""

from __future__ import annotations

import json
import logging
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from ernie_jax.hf.names import tensor_maps
from ernie_jax.lora import ADAPTER_SUFFIX, LoRAConfig, LoRAParam

log = logging.getLogger(__name__)

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
MLP_PROJECTIONS = (".gate_proj", ".up_proj", ".down_proj")


def _key(path) -> tuple[str, ...]:
    return tuple(str(p) for p in path)


def _host_array(x: jax.Array) -> np.ndarray:
    """The whole array on this host (adapters are small); across processes every process must call this."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x, np.float32)
    return np.asarray(multihost_utils.process_allgather(x, tiled=True), np.float32)


def adapter_tensors(model) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """PEFT-named adapter tensors (fp32), the transformers modules they target, and the adapted weights PEFT cannot
    carry (our parameter paths; see the module docstring)."""
    maps = {_key(m.path): m for m in tensor_maps(model.config)}
    matrices: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        matrices.setdefault(_key(path[:-1]), {})[str(path[-1])] = _host_array(var.get_value())
    tensors, modules, left_out = {}, [], []
    for adapter_path, ab in sorted(matrices.items()):
        weight_path = (*adapter_path[:-1], adapter_path[-1].removesuffix(ADAPTER_SUFFIX))
        target = maps[weight_path]
        per_expert = target.hf_keys.ndim != 1  # [R, E]: one HF tensor per routed expert, fused in transformers
        remapped_by_peft = model.config.is_moe and str(target.hf_keys.flat[0]).removesuffix(".weight").endswith(
            MLP_PROJECTIONS
        )
        if per_expert or remapped_by_peft:
            left_out.append(".".join(weight_path))
            continue
        a, b = ab["a"], ab["b"]  # [R, *in, r], [R, r, *out]
        rank = a.shape[-1]
        for r, hf_key in enumerate(target.hf_keys):
            module = str(hf_key).removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a[r].reshape(-1, rank).T)
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b[r].reshape(rank, -1).T)
            modules.append(module)
    return tensors, modules, left_out


def save_peft_adapter(
    model, path: str | os.PathLike, cfg: LoRAConfig, *, base_model: str | None = None, write: bool = True
) -> list[str]:
    """Write `model`'s adapters to `path` as a PEFT LoRA adapter; returns the adapted weights left out.

    With several processes every process calls this (the adapters are gathered), and only `write=True` writes."""
    tensors, modules, left_out = adapter_tensors(model)
    if not write:
        return left_out
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model,
        "r": cfg.rank,
        "lora_alpha": cfg.resolved_alpha,
        "lora_dropout": cfg.dropout,
        "use_rslora": cfg.rslora,
        "target_modules": sorted(modules),  # whole module names: nothing else (e.g. other gate_proj) matches
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }
    os.makedirs(path, exist_ok=True)
    # Temporary names, moved into place when whole, the config last: a cut-short export never looks complete.
    weights, config_file = os.path.join(path, ADAPTER_WEIGHTS), os.path.join(path, ADAPTER_CONFIG)
    save_file(tensors, weights + ".tmp", metadata={"format": "pt"})
    os.replace(weights + ".tmp", weights)
    with open(config_file + ".tmp", "w") as f:
        json.dump(config, f, indent=2)
    os.replace(config_file + ".tmp", config_file)
    if left_out:
        log.warning(
            "export_peft: %d adapted MLP weight(s) of this MoE model (%s) are not in %s: transformers fuses the routed "
            "experts into 3D tensors that PEFT cannot adapt, and PEFT 0.21 redirects every gate/up/down_proj target of "
            "an ernie4_5_moe model onto them; only the merged model (export_hf) carries these adapters",
            len(left_out),
            ", ".join(sorted({".".join(p.split(".")[-2:]) for p in left_out})),
            path,
        )
    return left_out
