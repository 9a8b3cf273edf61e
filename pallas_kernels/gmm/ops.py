"""Differentiable grouped matmul on the Pallas kernels: `jax.custom_vjp` joining gmm (forward, dlhs) and tgmm (drhs).

    out  [M, N]        = gmm(lhs [M, K], rhs [G, K, N])
    dlhs [M, K]        = gmm(dout [M, N], rhs [G, K, N] read as [G, N, K]^T)   (no transposed copy of rhs)
    drhs [G, K, N]     = tgmm(lhs [M, K], dout [M, N])                          (per-group lhs^T dout)

The token dimension is padded to the m tile here (padding rows belong to no group, so they are zeros and get
zero gradient); K and N must divide by their tiles, which `default_tiling` picks for ERNIE's widths.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import match_vma, pick_tile, round_up
from pallas_kernels.gmm import tpu

KERNELS = ("tpu", "gpu")


def default_tiling(m: int, k: int, n: int, kernel: str = "tpu") -> tuple[int, int, int]:
    """(tm, tk, tn). TPU: 512-wide tiles divide 1536/2560 (a3b) and 3584/8192 (300B); with bf16 the working set
    (2 double-buffered inputs, the output, the f32 accumulator) stays ~4 MiB, inside every generation's VMEM.
    GPU (Triton): power-of-two tiles of 64 x 64 x 128 that keep registers/shared memory within an SM."""
    if kernel == "gpu":
        tm = 64 if m >= 64 else max(16, pl_next_pow2(m))
        return tm, pick_tile(k, 64, (64, 32, 16)), pick_tile(n, 128, (128, 64, 32, 16))
    # bf16 packs 16 rows per sublane tile, so small-M tiles stay multiples of 16.
    tm = 512 if m >= 512 else round_up(max(m, 1), 16)
    return tm, pick_tile(k, 512), pick_tile(n, 512)


def pl_next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _kernels(kernel: str):
    if kernel == "tpu":
        return tpu.gmm, tpu.tgmm
    if kernel == "gpu":
        from pallas_kernels.gmm import gpu  # Triton lowering is only imported when asked for

        return gpu.gmm, gpu.tgmm
    raise ValueError(f"gmm kernel must be one of {KERNELS}, got {kernel!r}")


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6, 7, 8))
def _gmm(lhs, rhs, group_sizes, group_offset, tiling, out_dtype, kernel, interpret, cost_rows):
    fwd, _ = _kernels(kernel)
    return fwd(
        lhs, rhs, group_sizes, group_offset, tiling=tiling, out_dtype=out_dtype, interpret=interpret,
        cost_rows=cost_rows,
    )  # fmt: skip


def _gmm_fwd(lhs, rhs, group_sizes, group_offset, tiling, out_dtype, kernel, interpret, cost_rows):
    out = _gmm(lhs, rhs, group_sizes, group_offset, tiling, out_dtype, kernel, interpret, cost_rows)
    return out, (lhs, rhs, group_sizes, group_offset)


def _gmm_bwd(tiling, out_dtype, kernel, interpret, cost_rows, residuals, dout):
    lhs, rhs, group_sizes, group_offset = residuals
    fwd, wgrad = _kernels(kernel)
    tm, tk, tn = tiling
    dout = dout.astype(lhs.dtype)  # the MXU runs the backward in the input dtype, accumulating in fp32
    dlhs = fwd(
        dout, rhs, group_sizes, group_offset, tiling=(tm, tn, tk), out_dtype=lhs.dtype, transpose_rhs=True,
        interpret=interpret, cost_rows=cost_rows,
    )  # fmt: skip
    drhs = wgrad(
        lhs, dout, group_sizes, group_offset, rhs.shape[0], tiling=tiling, out_dtype=rhs.dtype, interpret=interpret,
        cost_rows=cost_rows,
    )  # fmt: skip
    return dlhs, drhs, None, None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    group_offset: jax.Array | int | None = None,
    preferred_element_type=None,
    tiling: tuple[int, int, int] | None = None,
    kernel: str = "tpu",
    interpret=False,
    cost_rows: int | None = None,
) -> jax.Array:
    """Grouped matmul on a Pallas kernel, differentiable in lhs and rhs.

    Args:
      lhs: [M, K], rows sorted by group.
      rhs: [G_local, K, N]: the weights of groups group_offset .. group_offset + G_local - 1.
      group_sizes: [G] int32 over all groups (G >= G_local); sum <= M, trailing rows are padding.
      group_offset: first local group (scalar, may be traced, e.g. from `lax.axis_index`); rows of other groups
        come out zero.
      tiling: (tm, tk, tn); default `default_tiling`.
      kernel: "tpu" (Mosaic) or "gpu" (Triton).
      interpret: run the kernel in the Pallas interpreter (CPU tests).
      cost_rows: rows expected to belong to the local groups, for the kernels' cost estimates (XLA's scheduler and
        `ernie_jax.tools.hlo_stats`). An expert-parallel buffer is sized for the worst case, but the kernels skip rows
        outside the local groups, so M would overstate the work. Default M.
    Returns:
      [M, N] in preferred_element_type (default lhs.dtype).
    """
    m, k = lhs.shape
    n = rhs.shape[-1]
    out_dtype = jnp.dtype(preferred_element_type or lhs.dtype)
    tiling = tuple(tiling or default_tiling(m, k, n, kernel))
    offset = jnp.zeros((), jnp.int32) if group_offset is None else jnp.asarray(group_offset, jnp.int32)
    m_pad = round_up(m, tiling[0])
    x = jnp.pad(lhs, ((0, m_pad - m), (0, 0))) if m_pad != m else lhs  # [M_pad, K]
    x, rhs, group_sizes, offset = match_vma(x, rhs, group_sizes.astype(jnp.int32), offset)
    out = _gmm(x, rhs, group_sizes, offset, tiling, out_dtype, kernel, interpret, cost_rows)
    return out[:m] if m_pad != m else out
