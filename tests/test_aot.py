"""`python -m ernie_jax.aot` compiles the trainer's own step for a TPU v5p topology on this CPU host (libtpu)."""

from __future__ import annotations

import pytest

from tests.helpers import tpu_topology_devices

pytestmark = pytest.mark.tpu


def _report(topology: str, overrides: list[str]) -> dict:
    from ernie_jax.tools import aot_report as aot
    from ernie_jax.training.config import apply_overrides, load_preset

    tpu_topology_devices(aot.resolve_topology(topology)[1])  # skips only without libtpu
    return aot.compile_report(apply_overrides(load_preset("a3b_tpu"), overrides), topology)


def test_topology_names():
    from ernie_jax.tools.aot_report import resolve_topology

    assert resolve_topology("v5p-64") == ("v5p", "v5p:2x4x4", 32)  # v5p-N counts TensorCores, 2 per chip
    assert resolve_topology("v5p-256") == ("v5p", "v5p:4x4x8", 128)
    assert resolve_topology("v4-32") == ("v4", "v4:2x2x4", 16)
    assert resolve_topology("v6e-64") == ("v6e", "v6e:8x8", 64)  # v6e-N counts chips
    assert resolve_topology("v5p:2x2x1") == ("v5p", "v5p:2x2x1", 4)


def test_aot_reduced_a3b_step_fits_and_flops_in_band():
    # One dense and one MoE layer of a3b (64 experts, k=6), expert parallel over 4 v5p chips.
    r = _report(
        "v5p:2x2x1",
        [
            "mesh.expert=4",
            "model.num_hidden_layers=2",
            "model.moe_layer_end_index=1",
            "data.seq_len=512",
            "data.global_batch_size=8",
            "loss_chunk=256",  # the preset's 1024 must divide seq_len
        ],
    )
    from ernie_jax.tools.aot_report import format_report

    print(format_report(r))
    assert r["chips"] == 4 and r["mesh"]["expert"] == 4
    assert r["fits"], r["bytes_per_chip"]
    # The moments are sharded like the params (fp32 mu + nu = 2x params), not replicated.
    assert r["bytes_per_chip"]["opt_state"] <= 2.05 * r["bytes_per_chip"]["params"]
    # Compiled FLOPs near the model's (full remat adds about a third): a dense dispatch of 64 experts or a
    # recompute blowup leaves the band.
    assert 0.7 < r["compiled_over_model"] < 2.5, r["compiled_over_model"]
    assert set(r["kernel_flops_per_chip"]) >= {"xla", "ernie_gmm", "ernie_tgmm", "ernie_flash_fwd", "ernie_flash_dq"}
    assert not r["loops"]["unknown"]
    rf = r["roofline"]
    assert 0 < rf["compute_s"] <= rf["serial_s"] and 0 < r["roofline_mfu"]["serial"] <= r["roofline_mfu"]["overlapped"]
    # Where the time goes: the kinds add up to the compute time, the Pallas kernels among them; the slowest ops.
    by_kind = r["roofline_by_kind_s"]
    assert sum(by_kind.values()) == pytest.approx(rf["compute_s"])
    assert {"matmul", "kernel:ernie_gmm", "kernel:ernie_flash_fwd"} <= set(by_kind), by_kind
    top = r["top_ops"]
    assert len(top) == 12 and [op["seconds"] for op in top] == sorted((op["seconds"] for op in top), reverse=True)
    assert "top 12 ops by roofline time" in format_report(r)
    coll = r["collectives"]
    assert coll["ragged-all-to-all"]["count"] > 0  # the preset's ragged_a2a expert transport
    assert coll["all-reduce"]["count"] > 0  # gradients of the replicated (non-expert) weights
    # No all-reduce of a worst-case expert buffer: all-reduces are weight gradients, well under the params' bytes.
    assert coll["all-reduce"]["bytes"] < r["bytes_per_chip"]["params"], coll["all-reduce"]


def test_aot_reports_a_step_libtpu_refuses_as_not_fitting():
    # Whole fp32 logits of 64 rows x 4096 tokens x 103424 vocab per chip: far past HBM, and libtpu refuses it.
    r = _report(
        "v5p:2x2x1",
        [
            "mesh.expert=4",
            "model.num_hidden_layers=2",
            "model.moe_layer_end_index=1",
            "data.global_batch_size=256",
            "loss_chunk=0",
        ],
    )
    from ernie_jax.tools.aot_report import format_report

    text = format_report(r)
    print(text)
    assert not r["fits"] and "RESOURCE_EXHAUSTED" in r["compile_error"]
    assert "DOES NOT FIT" in text and "loss_chunk=1024" in text and "optim.grad_accum=2" in text
