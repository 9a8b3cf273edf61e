"""Kernel entry points. The model and the MoE call these ops only through this module.

`implementation`: "auto" | "xla" | "pallas".
  "xla": plain XLA ops: the pure-jnp twin (reference.py of each op), or a blocked form of it that computes the same
    with less work (gmm/blocked.py on CPU; flash_attention/blocked.py for causal attention).
  "pallas": the Pallas kernel for the platform: Mosaic on TPU, Triton on GPU; on CPU the TPU kernel runs in the
    Pallas interpreter (how the tests exercise it: slow, for correctness only).
  "auto": Pallas on TPU and GPU, "xla" on CPU.
`platform=` ("auto" | "tpu" | "gpu" | "cpu") is the platform traced for: "auto" is the host's backend; "tpu" on a
CPU host picks the compiled Mosaic kernel, never interpret mode (AOT-compiling for a TPU slice, ernie_jax.aot).
`kernel=` ("tpu" | "gpu") and `interpret=` override that choice, e.g. interpreting the GPU kernel on CPU.
"""

from __future__ import annotations

import jax

from pallas_kernels.flash_attention.blocked import attention_blocked
from pallas_kernels.flash_attention.reference import attention_reference
from pallas_kernels.gmm.blocked import gmm_blocked
from pallas_kernels.gmm.reference import gmm_reference

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def _backend(platform: str) -> str:
    """The platform kernels are traced for: the host's backend, unless the caller compiles for another one."""
    return jax.default_backend() if platform == "auto" else platform


def _resolve(implementation: str, op: str, platform: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "auto":
        return "pallas" if _backend(platform) in ("tpu", "gpu") else "xla"
    return implementation


def _kernel_and_interpret(kernel: str | None, interpret, platform: str) -> tuple[str, object]:
    backend = _backend(platform)
    if kernel is None:
        kernel = "gpu" if backend == "gpu" else "tpu"
    if interpret is None:
        interpret = backend == "cpu"
    return kernel, interpret


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    implementation: str = "auto",
    group_offset: jax.Array | int | None = None,
    tiling: tuple[int, int, int] | None = None,
    kernel: str | None = None,
    interpret=None,
    cost_rows: int | None = None,
    platform: str = "auto",
) -> jax.Array:
    """Grouped matmul [M, K] x [G_local, K, N] -> [M, N]; lhs rows sorted by group, group_sizes [G] int32.

    With group_offset, rhs holds groups group_offset .. group_offset + G_local - 1 and the rows of every other
    group come out zero (an expert-parallel shard). See `pallas_kernels.gmm.ops.gmm` for the kernel arguments.
    """
    if _resolve(implementation, "gmm", platform) == "xla":
        if _backend(platform) == "cpu" and group_offset is None and group_sizes.shape[0] == rhs.shape[0]:
            # XLA:CPU expands ragged_dot densely (G x the FLOPs); the blocked form costs about one dense matmul.
            return gmm_blocked(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)
        return gmm_reference(
            lhs, rhs, group_sizes, preferred_element_type=preferred_element_type, group_offset=group_offset
        )
    from pallas_kernels.gmm import ops

    kernel, interpret = _kernel_and_interpret(kernel, interpret, platform)
    return ops.gmm(
        lhs, rhs, group_sizes, group_offset=group_offset, preferred_element_type=preferred_element_type,
        tiling=tiling, kernel=kernel, interpret=interpret, cost_rows=cost_rows,
    )  # fmt: skip


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    implementation: str = "auto",
    kv_segment_ids: jax.Array | None = None,
    block_sizes: tuple[int, int] | None = None,
    kernel: str | None = None,
    interpret=None,
    platform: str = "auto",
) -> jax.Array:
    """Causal GQA attention. q [B, T, N, H], k/v [B, S, K, H], segment_ids [B, T] -> [B, T, N, H].

    See `pallas_kernels.flash_attention.ops.flash_attention` for the kernel arguments.
    """
    if _resolve(implementation, "flash_attention", platform) == "xla":
        # Causal query blocks skip the keys they cannot see (the twin's masked half).
        return attention_blocked(
            q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, sm_scale=sm_scale
        )
    from pallas_kernels.flash_attention import ops

    kernel, interpret = _kernel_and_interpret(kernel, interpret, platform)
    return ops.flash_attention(
        q, k, v, causal=causal, segment_ids=segment_ids, kv_segment_ids=kv_segment_ids, sm_scale=sm_scale,
        block_sizes=block_sizes, kernel=kernel, interpret=interpret,
    )  # fmt: skip


__all__ = ["attention_reference", "flash_attention", "gmm", "gmm_reference"]
