"""Process-wide setup that must happen before JAX starts a backend: keep libtpu quiet on hosts without TPUs.

With the `tpu` extra installed, JAX tries the TPU backend on every host. On a CPU (or GPU) host libtpu then looks
for Cloud TPU metadata, finds none and prints `E0000 ... unexpected worker hostname` and "Failed to find host
bounds" lines on every command. Two things prevent that without taking TPU support away:

- On a host with no TPU chips on its PCI bus and no GPU, JAX is told to use the CPU backend only (unless the user
  chose platforms with JAX_PLATFORMS). Compiling *for* a TPU topology (`python -m ernie_jax.aot`) does not need a
  TPU backend: it loads libtpu through `jax.experimental.topologies`, which still works.
- On any host without TPU chips, libtpu's metadata lookups get explicit answers, so loading it for such a
  compile prints nothing either. Real TPU VMs (chips present) are left entirely alone.

It also picks XLA:CPU's code generator for dots, elementwise ops and reductions (`cpu_codegen_flags`), which must
likewise be set before the CPU backend starts.
"""

from __future__ import annotations

import glob
import os

import jax

_GOOGLE_PCI_VENDOR = "0x1ae0"
_GPU_DEVICE_FILES = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd")
# XLA:CPU in jaxlib 0.10 hands dots, elementwise ops and reductions to YNNPACK fusions by default; an empty list
# turns them off and its own emitters (Eigen for dots) take them. On this package's CPU workloads those are
# faster: on a 2-core x86 host the tiny preset's training step went 141/147 -> 99/95 ms (`python -m
# benchmarks.cpu_profile --remat none`, two runs each) and the embedded-default run 298 -> 273 s. The flag exists
# in the jaxlib versions below; XLA aborts on a flag it does not know, so another version is left at its default.
YNN_FUSION_FLAG = "--xla_cpu_experimental_ynn_fusion_type"
_YNN_FLAG_JAXLIB_SERIES = ("0.10.",)


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


def cpu_codegen_flags(xla_flags: str, jaxlib_version: str) -> str:
    """XLA_FLAGS with YNNPACK fusions turned off on XLA:CPU, unless the user already chose (any value of the
    flag, e.g. `--xla_cpu_experimental_ynn_fusion_type=dot,eltwise,reduce` to keep them) or jaxlib lacks it."""
    if YNN_FUSION_FLAG in xla_flags or not jaxlib_version.startswith(_YNN_FLAG_JAXLIB_SERIES):
        return xla_flags
    return f"{xla_flags} {YNN_FUSION_FLAG}=".strip()


def configure() -> None:
    """Idempotent; called when `ernie_jax` is imported. Takes effect when JAX's backends have not started yet."""
    if has_tpu_chips():
        return
    import jaxlib

    flags = os.environ.get("XLA_FLAGS", "")
    if (chosen := cpu_codegen_flags(flags, jaxlib.__version__)) != flags:
        os.environ["XLA_FLAGS"] = chosen
    # Answers libtpu would otherwise ask the (absent) Cloud metadata server for. The accelerator type only
    # satisfies the lookup: topologies compiled for are named explicitly by the caller.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("TPU_ACCELERATOR_TYPE", "v5p-8")
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    if not has_gpu() and not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
