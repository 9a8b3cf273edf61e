"""The one chip table: device kinds resolve to the right chip (the longest matching prefix wins)."""

import pytest

from ernie_jax.chips import CHIPS, chip_for_device_kind


@pytest.mark.parametrize(
    "kind, chip",
    [("TPU v4", "v4"), ("TPU v5", "v5p"), ("TPU v5p", "v5p"), ("TPU v5 lite", "v5e"), ("TPU v6 lite", "v6e"),
     ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h200")],
)  # fmt: skip
def test_device_kinds_resolve_to_their_chip(kind, chip):
    assert chip_for_device_kind(kind)[0] == chip


def test_unknown_devices_have_no_chip_and_every_tpu_has_the_roofline_figures():
    assert chip_for_device_kind("cpu") is None
    for name in ("v4", "v5p", "v5e", "v6e"):
        chip = CHIPS[name]
        assert chip.peak_bf16_flops > 1e14 and chip.hbm_bytes > 1e10 and chip.ici_bytes_per_s > 0
