"""The one table of accelerator figures: bf16 peak FLOP/s, HBM capacity and bandwidth, one ICI link's bandwidth.

Used for MFU (training metrics), the AOT pod-readiness report and its roofline model. TPU figures are per chip
(Cloud TPU system-architecture pages); GPU figures are the SXM parts' dense bf16 peaks.
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
    device_kinds: tuple[str, ...]  # `jax.Device.device_kind` prefixes that name this chip
    peak_bf16_flops: float  # dense, per chip
    hbm_bytes: float
    hbm_bytes_per_s: float
    ici_bytes_per_s: float | None = None  # one link, both directions (TPUs)
    cores_per_chip: int = 1  # what a Cloud TPU slice name counts (v4-8 and v5p-8 count TensorCores: 4 chips)


CHIPS: dict[str, Chip] = {
    "v4": Chip(("TPU v4",), 275e12, 32 * 2**30, 1.2e12, 9e10, cores_per_chip=2),
    "v5p": Chip(("TPU v5p", "TPU v5"), 459e12, 95e9, 2.765e12, 1.8e11, cores_per_chip=2),
    "v5e": Chip(("TPU v5e", "TPU v5 lite"), 197e12, 16e9, 8.19e11, 9e10),
    "v6e": Chip(("TPU v6e", "TPU v6 lite"), 918e12, 32e9, 1.6e12, 1.8e11),
    "h100": Chip(("NVIDIA H100",), 989e12, 80e9, 3.35e12),
    "h200": Chip(("NVIDIA H200",), 989e12, 141e9, 4.8e12),
}


def chip_for_device_kind(kind: str) -> tuple[str, Chip] | None:
    """The chip whose longest device-kind prefix matches ("TPU v5 lite" is a v5e, not a v5p)."""
    matches = [
        (len(prefix), name) for name, chip in CHIPS.items() for prefix in chip.device_kinds if kind.startswith(prefix)
    ]
    if not matches:
        return None
    name = max(matches)[1]
    return name, CHIPS[name]
