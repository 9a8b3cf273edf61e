"""Write a model's LoRA adapters as a PEFT adapter directory for transformers' ERNIE 4.5 modules.

`peft.PeftModel.from_pretrained(base, DIR)` reads `adapter_config.json` and `adapter_model.safetensors`, whose
tensors are named after transformers' modules: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
[r, in] and `...lora_B.weight` [out, r]. PEFT's scaling (lora_alpha / r, or / sqrt(r) with use_rslora) is ours.

In an MoE model the dense-layer and shared-expert projections are named as *parameters* (`target_parameters`,
e.g. `model.layers.1.mlp.shared_experts.gate_proj.weight`), not as modules: PEFT 0.21 with transformers 5 rewrites
every `*.gate_proj` / `*.up_proj` / `*.down_proj` module target of an `ernie4_5_moe` model into the fused routed-expert
tensors (its v4-to-v5 MoE conversion), which would put those adapters on the wrong weights. PEFT's parameter wrapper
applies the same W + s * B @ A to the Linear weight, under the same tensor names.

Routed experts are not written: transformers keeps each layer's experts as fused 3D tensors (`mlp.experts.gate_up_proj`,
`mlp.experts.down_proj`); their adapters reach transformers folded into the merged model (`export_hf`).
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


def adapter_tensors(model) -> tuple[dict[str, np.ndarray], list[str], list[str], list[str]]:
    """PEFT-named adapter tensors (fp32), the transformers modules and parameters they target, and the routed-expert
    weights left out (our parameter paths)."""
    maps = {_key(m.path): m for m in tensor_maps(model.config)}
    matrices: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        matrices.setdefault(_key(path[:-1]), {})[str(path[-1])] = _host_array(var.get_value())
    tensors, modules, parameters, left_out = {}, [], [], []
    for adapter_path, ab in sorted(matrices.items()):
        weight_path = (*adapter_path[:-1], adapter_path[-1].removesuffix(ADAPTER_SUFFIX))
        target = maps[weight_path]
        if target.hf_keys.ndim != 1:  # [R, E]: one HF tensor per routed expert, fused in transformers
            left_out.append(".".join(weight_path))
            continue
        a, b = ab["a"], ab["b"]  # [R, *in, r], [R, r, *out]
        rank = a.shape[-1]
        for r, hf_key in enumerate(target.hf_keys):
            module = str(hf_key).removesuffix(".weight")
            tensors[f"base_model.model.{module}.lora_A.weight"] = np.ascontiguousarray(a[r].reshape(-1, rank).T)
            tensors[f"base_model.model.{module}.lora_B.weight"] = np.ascontiguousarray(b[r].reshape(rank, -1).T)
            # An MoE model's MLP projections are targeted as parameters (see the module docstring).
            if model.config.is_moe and module.endswith(MLP_PROJECTIONS):
                parameters.append(str(hf_key))
            else:
                modules.append(module)
    return tensors, modules, parameters, left_out


def save_peft_adapter(
    model, path: str | os.PathLike, cfg: LoRAConfig, *, base_model: str | None = None, write: bool = True
) -> list[str]:
    """Write `model`'s adapters to `path` as a PEFT LoRA adapter; returns the adapted weights left out.

    With several processes every process calls this (the adapters are gathered), and only `write=True` writes."""
    tensors, modules, parameters, left_out = adapter_tensors(model)
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
        "target_parameters": sorted(parameters) or None,
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
            "export_peft: the routed-expert adapters (%s, %d layer group weight(s)) are not in %s: transformers fuses "
            "each layer's experts into 3D tensors, where this export does not place them; the merged model "
            "(export_hf) carries them",
            ", ".join(sorted({p.rsplit(".", 1)[-1] for p in left_out})),
            len(left_out),
            path,
        )
    return left_out
