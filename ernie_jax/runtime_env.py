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
likewise be set before the CPU backend starts, and on hosts with no accelerator keeps glibc from handing the
XLA:CPU step's scratch memory back to the kernel after every call (`keep_freed_memory`).
"""

from __future__ import annotations

import ctypes
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


# glibc's mallopt parameter numbers (<malloc.h>).
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_MAX = -1, -2, -4
_KEEP_PAD_BYTES = 64 << 20  # glibc's largest thread-arena heap: a heap that empties is then never unmapped
_KEEP_TRIM_BYTES = (1 << 31) - 1  # mallopt takes an int: free memory at a heap's top up to 2 GiB is kept


def user_chose_malloc_settings(environ) -> bool:
    """True when the user set glibc's allocator through its environment (GLIBC_TUNABLES glibc.malloc.*, or the
    older MALLOC_* variables): their choice stands."""
    return "glibc.malloc." in environ.get("GLIBC_TUNABLES", "") or any(name.startswith("MALLOC_") for name in environ)


def keep_freed_memory() -> bool:
    """Have glibc keep freed memory mapped for reuse instead of returning it to the kernel. True if it was set.

    XLA:CPU allocates each call's temporary buffer as one block and frees it at the end: the tiny preset's
    training step takes 47.7 MiB. glibc serves blocks above its mmap threshold (at most 32 MiB) with a fresh
    `mmap` and returns them with `munmap`, so every step page-faults its whole scratch in again, zero-filled by the
    kernel (about 13,000 faults per step, 16% of the process's CPU time in the kernel). Here large blocks come
    from the malloc heaps instead, and the heaps are neither trimmed nor unmapped when they empty, so the next
    step reuses the same pages. The cost is that the process keeps its peak heap size until it exits. Only a
    glibc process is changed (elsewhere `mallopt` is absent or a no-op).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
    settings = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, _KEEP_TRIM_BYTES), (_M_TOP_PAD, _KEEP_PAD_BYTES))
    return all([mallopt(param, value) == 1 for param, value in settings])


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
    if has_gpu():
        return
    if not os.environ.get("JAX_PLATFORMS") and not jax.config.jax_platforms:
        jax.config.update("jax_platforms", "cpu")
    # Only where XLA runs on the CPU: on an accelerator host the big blocks are device memory, and host memory
    # (data loading, checkpoint staging) is better returned.
    if not user_chose_malloc_settings(os.environ):
        keep_freed_memory()
        # A call dispatched asynchronously runs on one of XLA's worker threads, and glibc serves a worker's block
        # above 64 MiB (its largest thread heap) with a fresh mapping whatever the settings: the embedded default's
        # training step (batch 16, 102 MiB of scratch) faulted all of it in every step. Run inline, a call
        # allocates on the calling thread, from the main heap, which grows as far as needed and is kept.
        if "JAX_CPU_ENABLE_ASYNC_DISPATCH" not in os.environ:
            jax.config.update("jax_cpu_enable_async_dispatch", False)
