"""benchmarks/gpu_mfu.py, the GPU MFU check, runs its harness on the CPU: the trainer's step on one device at reduced
depth, its measured and roofline figures consistent with each other and with the trainer's FLOP count."""

from __future__ import annotations

import math

import jax
import pytest

from benchmarks import gpu_mfu
from ernie_jax.training.config import apply_overrides, load_preset
from ernie_jax.training.metrics import model_flops_per_token

SMALL = ["--config", "tiny", "--layers", "2", "--batch", "2", "--seq", "64", "--steps", "2"]


def test_the_gpu_mfu_harness_measures_the_trainers_step_at_reduced_depth(capsys, tmp_path):
    hlo = tmp_path / "step.hlo"
    report = gpu_mfu.main([*SMALL, "--dump-hlo", str(hlo)])
    assert "ENTRY" in hlo.read_text()  # the compiled program, for reading apart from the device
    assert report["layers"] == 2 and report["batch"] == 2 and report["seq_len"] == 64
    cfg = apply_overrides(load_preset("tiny"), ["model.num_hidden_layers=2"])
    assert report["model_flops"] == pytest.approx(2 * 64 * model_flops_per_token(cfg.model, 64, mtp_depth=1))
    assert len(report["step_s_all"]) == 2 and all(t > 0 for t in report["step_s_all"])
    assert report["mfu"] == pytest.approx(report["model_flops"] / (report["step_s"] * report["peak_flops"]))
    assert report["roofline_s"] > 0 and report["top_ops"]
    assert report["measured_over_roofline"] == pytest.approx(report["step_s"] / report["roofline_s"])
    # The compiled step does the model's work and the recompute of its remat policy, not a multiple of it.
    assert 0.9 < report["compiled_over_model_flops"] < 2.0, report["compiled_over_model_flops"]
    # The tiny preset's layers are unrolled, so XLA's own count sees every layer too and the two agree.
    ours, xla = report["compiled_over_model_flops"], report["xla_cost_analysis_over_model_flops"]
    assert abs(ours - xla) <= 0.1 * xla, (ours, xla)
    assert math.isfinite(report["final_loss"])
    out = capsys.readouterr().out
    assert "measured step" in out and "roofline step" in out and "MFU" in out


def test_the_gpu_mfu_harness_refuses_a_preset_it_cannot_feed(capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_mfu.main(["--config", "vl_tiny", "--steps", "1"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--config vl_tiny" in err[0] and "data.format=vl_sft" in err[0], err


def test_the_default_gpu_run_is_a_valid_reduced_a3b_on_one_device():
    """What `python -m benchmarks.gpu_mfu` runs on a GPU: a3b_gpu at full width, 4 layers (one dense, three MoE),
    4 x 4096 tokens, one device; built here as a config only (the model is 2.8B parameters)."""
    cfg = gpu_mfu.benchmark_config("a3b_gpu", 4, 4, None, [])
    full = load_preset("a3b_gpu").model
    model = cfg.model
    assert model.num_hidden_layers == 4 and model.moe_layer_start_index == 1
    assert model.layer_kinds == ("dense", "moe", "moe", "moe")
    assert (model.hidden_size, model.moe_num_experts, model.moe_k) == (full.hidden_size, full.moe_num_experts, 6)
    assert cfg.data.seq_len == 4096 and cfg.data.global_batch_size == 4 and cfg.platform == "gpu"
    assert all(size == 1 for size in cfg.mesh.sizes.values())


def test_the_default_gpu_run_on_a_cpu_host_says_where_it_runs(capsys):
    if jax.default_backend() != "cpu":
        pytest.skip("on an accelerator this is the benchmark itself")
    with pytest.raises(SystemExit) as exit_info:
        gpu_mfu.main([])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "platform=gpu" in err[0] and "cpu devices" in err[0] and "--config tiny" in err[0], err


def test_a_program_the_roofline_cannot_read_keeps_the_measured_figures(capsys, monkeypatch):
    """A device's run is the expensive part: if hlo_stats fails on an unfamiliar program (a GPU's, say), the
    measured step time and MFU are still reported, with the reason the roofline is missing."""

    def unreadable(text):
        raise ValueError("an instruction hlo_stats does not know")

    monkeypatch.setattr(gpu_mfu, "Module", unreadable)
    report = gpu_mfu.main(SMALL)
    assert report["step_s"] > 0 and report["mfu"] > 0 and "roofline_s" not in report
    out = capsys.readouterr().out
    assert "measured step" in out and "roofline: not computed" in out and "does not know" in out
