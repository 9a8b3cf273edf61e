"""Device meshes. The mesh axis names are defined here and used only inside sharding/."""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
import jax.experimental.mesh_utils
import numpy as np
from jax.sharding import Mesh

DCN = "dcn"  # across slices (data parallel over the data-center network); size 1 on one slice
DATA = "data"
FSDP = "fsdp"
EXPERT = "expert"
TENSOR = "tensor"
MESH_AXES = (DCN, DATA, FSDP, EXPERT, TENSOR)


class MeshError(ValueError):
    """The requested mesh does not fit the devices; the message says what to change."""


def resolve_mesh_shape(sizes: dict[str, int], num_devices: int) -> dict[str, int]:
    """Fill in at most one -1 ("the rest") and check the product equals the device count."""
    unknown = [a for a, s in sizes.items() if s == -1]
    if len(unknown) > 1:
        raise MeshError(f"mesh: at most one axis may be -1, got {unknown}")
    for a, s in sizes.items():
        if s != -1 and s < 1:
            raise MeshError(f"mesh: axis {a!r} has size {s}; sizes are positive or -1")
    known = math.prod(s for s in sizes.values() if s != -1)
    out = dict(sizes)
    if unknown:
        if num_devices % known:
            raise MeshError(
                f"mesh: {num_devices} devices cannot be split as {sizes}: the fixed axes multiply to {known}, "
                f"which does not divide {num_devices}"
            )
        out[unknown[0]] = num_devices // known
    if math.prod(out.values()) != num_devices:
        raise MeshError(
            f"mesh: sizes {out} multiply to {math.prod(out.values())} but {num_devices} devices are present; "
            "set one axis to -1 or change the sizes (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N)"
        )
    return out


def make_mesh(
    data: int = -1,
    fsdp: int = 1,
    expert: int = 1,
    tensor: int = 1,
    dcn: int = 1,
    devices: Sequence[jax.Device] | None = None,
) -> Mesh:
    """A mesh over (dcn, data, fsdp, expert, tensor); -1 takes the remaining devices."""
    devices = list(jax.devices() if devices is None else devices)
    shape = resolve_mesh_shape({DCN: dcn, DATA: data, FSDP: fsdp, EXPERT: expert, TENSOR: tensor}, len(devices))
    dims = tuple(shape[a] for a in MESH_AXES)
    try:
        arr = jax.experimental.mesh_utils.create_device_mesh(dims, devices=devices, allow_split_physical_axes=True)
    except Exception:  # noqa: BLE001 - non-TPU or irregular device sets: plain row-major order is fine
        arr = np.asarray(devices).reshape(dims)
    return Mesh(arr, MESH_AXES)
