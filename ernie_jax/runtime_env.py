"""Process-wide setup that must happen before JAX starts a backend: keep libtpu quiet on hosts without TPUs.

With the `tpu` extra installed, JAX tries the TPU backend on every host. On a CPU (or GPU) host libtpu then looks
for Cloud TPU metadata, finds none and prints `E0000 ... unexpected worker hostname` and "Failed to find host
bounds" lines on every command. Two things prevent that without taking TPU support away:

- On a host with no TPU chips on its PCI bus and no GPU, JAX is told to use the CPU backend only (unless the user
  chose platforms with JAX_PLATFORMS). Compiling *for* a TPU topology (`python -m ernie_jax.aot`) does not need a
  TPU backend: it loads libtpu through `jax.experimental.topologies`, which still works.
- On any host without TPU chips, libtpu's metadata lookups get explicit answers, so loading it for such a
  compile prints nothing either. Real TPU VMs (chips present) are left entirely alone.
"""

from __future__ import annotations

import glob
import os

import jax

_GOOGLE_PCI_VENDOR = "0x1ae0"
_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")


def has_tpu_chips() -> bool:
    """True when a Google accelerator sits on this host's PCI bus (a TPU VM)."""
    for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
        try:
            with open(vendor) as f:
                if f.read().strip() == _GOOGLE_PCI_VENDOR:
                    return True
        except OSError:
            continue
    return False


def has_gpu() -> bool:
    return any(os.path.exists(path) for path in _GPU_DEVICE_FILES)


def configure() -> None:
    """Idempotent; called when `ernie_jax` is imported."""
    if has_tpu_chips():
        return
    # Answers libtpu would otherwise ask the (absent) Cloud metadata server for. The accelerator type only
    # satisfies the lookup: topologies compiled for are named explicitly by the caller.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if not has_gpu() and not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
