"""`python -m ernie_jax.aot --config=vl_a3b_tpu` compiles the VL SFT step (vision tower, resampler, both expert pools
expert-parallel over ragged all-to-all) for a TPU v5p slice on this CPU host (libtpu), at reduced depth."""

from __future__ import annotations

import pytest

from tests.helpers import tpu_topology_devices

pytestmark = pytest.mark.tpu


@pytest.mark.slow  # one libtpu compile of the VL step: about 4 minutes on 2 shared cores
def test_aot_reduced_vl_a3b_step_fits_and_flops_in_band():
    from ernie_jax.tools import aot_report as aot
    from ernie_jax.training.config import apply_overrides, load_preset

    topology = "v5p:2x2x1"
    tpu_topology_devices(aot.resolve_topology(topology)[1])  # skips only without libtpu
    # One dense and one MoE layer of VL-28B-A3B (64 text and 64 vision experts, k=6), two vision blocks at full
    # width, expert parallel over 4 v5p chips; rows of 512 tokens and 512 image patches.
    cfg = apply_overrides(
        load_preset("vl_a3b_tpu"),
        [
            "mesh.fsdp=1",
            "mesh.expert=4",
            "model.text.num_hidden_layers=2",
            "model.text.mlp_layer_types=dense,sparse",
            "model.vision.depth=2",
            "data.seq_len=512",
            "data.vision_patches=512",
            "data.global_batch_size=8",
            "loss_chunk=256",
        ],
    )
    r = aot.compile_report(cfg, topology)
    print(aot.format_report(r))
    assert r["chips"] == 4 and r["mesh"]["expert"] == 4
    assert r["fits"], r["bytes_per_chip"]
    assert r["bytes_per_chip"]["opt_state"] <= 2.05 * r["bytes_per_chip"]["params"]
    # Model FLOPs count the vision tower per patch; a dense dispatch of either pool or a remat blowup leaves the band.
    assert 0.7 < r["compiled_over_model"] < 2.5, r["compiled_over_model"]
    # Pallas on both sides: flash attention (decoder and vision tower) and the grouped matmul of both pools.
    assert set(r["kernel_flops_per_chip"]) >= {"ernie_gmm", "ernie_tgmm", "ernie_flash_fwd", "ernie_flash_dq"}
    assert r["collectives"]["ragged-all-to-all"]["count"] > 0
