"""Write a model's LoRA adapters as a PEFT adapter directory for transformers' ERNIE 4.5 modules.

`peft.PeftModel.from_pretrained(base, DIR)` reads `adapter_config.json` and `adapter_model.safetensors`, whose
tensors are named after transformers' modules: `base_model.model.model.layers.{i}.self_attn.q_proj.lora_A.weight`
[r, in] and `...lora_B.weight` [out, r]. PEFT's scaling (lora_alpha / r, or / sqrt(r) with use_rslora) is ours.

In an MoE model the dense-layer and shared-expert projections are named as *parameters* (`target_parameters`,
e.g. `model.layers.1.mlp.shared_experts.gate_proj.weight`), not as modules: PEFT 0.21 with transformers 5 rewrites
every `*.gate_proj` / `*.up_proj` / `*.down_proj` module target of an `ernie4_5_moe` model into the fused routed-expert
tensors (its v4-to-v5 MoE conversion), which would put those adapters on the wrong weights. PEFT's parameter wrapper
applies the same W + s * B @ A to the Linear weight, under the same tensor names.

Routed experts: transformers keeps each layer's experts as fused 3D tensors, `mlp.experts.gate_up_proj` [E, 2F, D]
(gate rows, then up rows) and `mlp.experts.down_proj` [E, D, F], which PEFT adapts per expert with its parameter
wrapper: lora_A [E * r, in] (expert-major) and lora_B [out, r * E] (expert-minor), delta_e = s * B_e @ A_e. Our gate
and up adapters (rank r each) become one rank-2r adapter of gate_up_proj, A_e = [A_gate_e; A_up_e] and B_e =
blockdiag(B_gate_e, B_up_e), exactly the two updates stacked; `rank_pattern` / `alpha_pattern` give it rank 2r and
the alpha that keeps our scale. The two wrappers nest on the experts module: down_proj outermost
(`mlp.experts.lora_A.weight`), gate_up_proj inside (`mlp.experts.base_layer.lora_A.weight`). (PEFT 0.21 warns that
these patterns match no targeted module; it applies them to the targeted parameters all the same.)
"""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
from flax import nnx
from jax.experimental import multihost_utils
from safetensors.numpy import save_file

from ernie_jax.hf.names import tensor_maps
from ernie_jax.lora import ADAPTER_SUFFIX, LoRAConfig, LoRAParam

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


def _expert_tensors(
    experts: str, found: dict[str, tuple[np.ndarray, np.ndarray]]
) -> tuple[dict[str, np.ndarray], list[str]]:
    """PEFT tensors for one layer's fused experts module `experts` (e.g. `model.layers.1.mlp.experts`) from our
    per-expert adapters found["gate" | "up" | "down"] = (A [E, in, r], B [E, r, out]) of that layer, and the
    transformers parameters they target."""
    r = next(iter(found.values()))[0].shape[-1]
    fused = {}  # transformers parameter name -> (A [E, rank, in], B [E, out, rank])
    if "gate" in found or "up" in found:
        like_a, like_b = found.get("gate", found.get("up"))
        e, d, f = like_a.shape[0], like_a.shape[1], like_b.shape[-1]
        a_fused = np.zeros((e, 2 * r, d), np.float32)
        b_fused = np.zeros((e, 2 * f, 2 * r), np.float32)  # block-diagonal: gate rows use the first r ranks
        for block, name in enumerate(("gate", "up")):
            if name in found:
                a, b = found[name]
                a_fused[:, block * r : (block + 1) * r] = a.transpose(0, 2, 1)
                b_fused[:, block * f : (block + 1) * f, block * r : (block + 1) * r] = b.transpose(0, 2, 1)
        fused["gate_up_proj"] = (a_fused, b_fused)
    if "down" in found:
        a, b = found["down"]
        fused["down_proj"] = (a.transpose(0, 2, 1), b.transpose(0, 2, 1))
    tensors = {}
    for depth, name in enumerate(sorted(fused)):  # PEFT nests the wrappers in sorted order, the first outermost
        a, b = fused[name]
        e, rank, _ = a.shape
        prefix = f"base_model.model.{experts}" + ".base_layer" * depth
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(e * rank, -1))
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.transpose(1, 2, 0).reshape(-1, rank * e))
    return tensors, [f"{experts}.{name}" for name in sorted(fused)]


def adapter_tensors(model) -> tuple[dict[str, np.ndarray], list[str], list[str]]:
    """PEFT-named adapter tensors (fp32) and the transformers modules and parameters they target."""
    maps = {_key(m.path): m for m in tensor_maps(model.config)}
    matrices: dict[tuple[str, ...], dict[str, np.ndarray]] = {}
    for path, var in nnx.to_flat_state(nnx.state(model, LoRAParam)):
        matrices.setdefault(_key(path[:-1]), {})[str(path[-1])] = _host_array(var.get_value())
    tensors, modules, parameters = {}, [], []
    experts: dict[str, dict[str, tuple[np.ndarray, np.ndarray]]] = {}  # fused experts module -> our adapters
    for adapter_path, ab in sorted(matrices.items()):
        weight_path = (*adapter_path[:-1], adapter_path[-1].removesuffix(ADAPTER_SUFFIX))
        target = maps[weight_path]
        a, b = ab["a"], ab["b"]  # [R, (E,) *in, r], [R, (E,) r, *out]
        if target.hf_keys.ndim == 2:  # [R, E]: one HF tensor per routed expert, fused in transformers
            for r, hf_key in enumerate(map(str, target.hf_keys[:, 0])):  # model.layers.1.mlp.experts.0.gate_proj.weight
                module = hf_key[: hf_key.index(".experts.") + len(".experts")]
                projection = hf_key.rsplit(".", 2)[-2].removesuffix("_proj")  # gate, up or down
                experts.setdefault(module, {})[projection] = (a[r], b[r])
            continue
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
    for module, found in experts.items():
        expert_tensors, expert_parameters = _expert_tensors(module, found)
        tensors.update(expert_tensors)
        parameters += expert_parameters
    return tensors, modules, parameters


def save_peft_adapter(
    model, path: str | os.PathLike, cfg: LoRAConfig, *, base_model: str | None = None, write: bool = True
) -> None:
    """Write `model`'s adapters to `path` as a PEFT LoRA adapter (every adapter: attention, dense MLP, shared and
    routed experts).

    With several processes every process calls this (the adapters are gathered), and only `write=True` writes."""
    tensors, modules, parameters = adapter_tensors(model)
    if not write:
        return
    fused_gate_up = r".*\.gate_up_proj"  # routed experts' gate and up adapters stacked: rank 2r, same scale
    fused_rank = 2 * cfg.rank
    fused_alpha = cfg.scale * (math.sqrt(fused_rank) if cfg.rslora else fused_rank)
    has_fused = any(p.endswith(".gate_up_proj") for p in parameters)
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
        "rank_pattern": {fused_gate_up: fused_rank} if has_fused else {},
        "alpha_pattern": {fused_gate_up: fused_alpha} if has_fused else {},
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
