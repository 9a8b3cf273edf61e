"""Every preset in configs/, shrunk, builds, trains, checkpoints, resumes and samples: on the 8-device mesh (in this
process) and on one device (as a user's laptop runs it, in a subprocess).

Shrinking keeps what makes each preset itself (dense or MoE, its layer layout, dtype, remat, chunked loss) and
changes only sizes, the data (bytes of the builtin corpus) and, for the pod presets, the mesh and the MoE transport
(`ragged_a2a` does not exist on XLA:CPU).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ernie_jax.training import loop as train_mod
from ernie_jax.training.config import apply_overrides, list_presets, load_preset
from ernie_jax.vl import VLConfig
from tests.test_fault_injection import ROOT, environment

EXTRA_VARIANTS = {  # layouts no preset has, on the tiny preset
    "tiny-interval2-bias": (
        "tiny",
        ["model.moe_layer_interval=2", "model.moe_layer_start_index=0", "model.use_bias=true"],
    ),
}
# The VL presets have a test file of their own: vl_tiny trains, resumes and samples in tests/test_vl_sft.py and
# tests/test_vl_generate.py, vl_a3b_tpu compiles for TPU in tests/test_vl_aot.py.
TEXT_PRESETS = [name for name in sorted(list_presets()) if not isinstance(load_preset(name).model, VLConfig)]
CASES = TEXT_PRESETS + sorted(EXTRA_VARIANTS)


def shrink(name: str, run_dir, mesh: list[str], *extra: str) -> list[str]:
    preset_name, variant = EXTRA_VARIANTS.get(name, (name, []))
    cfg = load_preset(preset_name)
    model = [
        "model.num_hidden_layers=2",
        "model.hidden_size=64",
        "model.intermediate_size=96",
        "model.num_attention_heads=4",
        "model.num_key_value_heads=2",
        "model.head_dim=16",
        "model.vocab_size=264",
        "model.max_position_embeddings=256",
    ]
    if cfg.model.is_moe:
        shared = min(cfg.model.moe_num_shared_experts, 1)
        model += [
            "model.moe_num_experts=8",
            "model.moe_k=2",
            "model.moe_intermediate_size=32",
            f"model.moe_num_shared_experts={shared}",
            "model.moe_layer_start_index=1",
            "model.moe_layer_end_index=-1",
        ]
    run = [
        "data.sources=builtin:python-docs",
        "data.tokenizer=bytes",
        "data.format=text",  # SFT presets read conversations with a checkpoint's tokenizer; here the byte corpus
        "data.seq_len=32",
        "data.global_batch_size=8",
        "optim.grad_accum=1",
        f"loss_chunk={16 if cfg.loss_chunk else 0}",
        "platform=any",
        "min_devices=1",
        "log_every=1",
        "checkpoint.every=2",
        "checkpoint.async_save=false",
        "sample_tokens=6",
        "sample_prompt=The",
        "export_hf=none",
        "init_from_hf=none",
        f"run_dir={run_dir}",
    ]
    return [*model, *run, *mesh, *variant, *extra]


def mesh_for(name: str, devices: int) -> list[str]:
    cfg = load_preset(EXTRA_VARIANTS.get(name, (name, []))[0])
    transport = ["mesh.moe_transport=allgather", "mesh.moe_buffer_factor=0"]
    if devices == 1:
        return ["mesh.data=1", "mesh.fsdp=1", "mesh.expert=1", "mesh.tensor=1", "mesh.dcn=1", *transport]
    if cfg.model.is_moe:  # expert parallel with FSDP, as the pod presets shard
        return ["mesh.data=1", "mesh.fsdp=2", "mesh.expert=4", "mesh.tensor=1", "mesh.dcn=1", *transport]
    return ["mesh.data=-1", "mesh.fsdp=1", "mesh.expert=1", "mesh.tensor=1", "mesh.dcn=1", *transport]


def losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.parametrize("name", CASES)
def test_shrunk_preset_trains_resumes_and_samples_on_the_8_device_mesh(tmp_path, name):
    base = apply_overrides(load_preset(EXTRA_VARIANTS.get(name, (name, []))[0]), shrink(name, tmp_path, []))
    first = train_mod.train(apply_overrides(base, [*mesh_for(name, 8), "steps=2"]), progress=False)
    assert first["end_step"] == 2
    resumed = train_mod.train(apply_overrides(base, [*mesh_for(name, 8), "steps=3"]), progress=False)
    assert resumed["start_step"] == 2 and resumed["end_step"] == 3
    assert resumed["skipped_steps"] == 0 and all(np.isfinite(v) for v in losses(tmp_path).values())
    assert sorted(losses(tmp_path)) == [1, 2, 3]
    assert isinstance(resumed["sample"], str) and resumed["sample"], "no sample"


@pytest.mark.parametrize("name", CASES)
def test_shrunk_preset_runs_on_one_device_from_the_command_line(tmp_path, name):
    preset = EXTRA_VARIANTS.get(name, (name, []))[0]
    args = [f"--config={preset}", *shrink(name, tmp_path, mesh_for(name, 1))]

    def run(steps: int) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-m", "ernie_jax.train", *args, f"steps={steps}"],
            cwd=ROOT,
            env=environment(),
            capture_output=True,
            text=True,
            timeout=600,
        )

    first = run(2)
    assert first.returncode == 0, first.stderr[-3000:]
    second = run(3)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "at step 2" in second.stderr and "sample: " in second.stdout
    assert sorted(losses(tmp_path)) == [1, 2, 3] and all(np.isfinite(v) for v in losses(tmp_path).values())
