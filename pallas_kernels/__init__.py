"""Kernel entry points. The model and the MoE call these ops only through this module.

`implementation`: "auto" | "xla" | "pallas". "xla" is the pure-jnp twin (reference.py of each op). Pallas kernels
for TPU and GPU are selected by "auto" on those platforms once they land (issue 4); until then "auto" is "xla"
everywhere and "pallas" raises.
"""

from __future__ import annotations

import jax

from pallas_kernels.flash_attention.reference import attention_reference
from pallas_kernels.gmm.reference import gmm_reference

IMPLEMENTATIONS = ("auto", "xla", "pallas")


def _resolve(implementation: str, op: str) -> str:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"{op}: implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
    if implementation == "pallas":
        raise NotImplementedError(f"{op}: no Pallas kernel is available yet; use implementation='xla' or 'auto'")
    return "xla"


def gmm(
    lhs: jax.Array,
    rhs: jax.Array,
    group_sizes: jax.Array,
    *,
    preferred_element_type=None,
    implementation: str = "auto",
) -> jax.Array:
    """Grouped matmul [M, K] x [G, K, N] -> [M, N]; lhs rows sorted by group, group_sizes [G] int32."""
    _resolve(implementation, "gmm")
    return gmm_reference(lhs, rhs, group_sizes, preferred_element_type=preferred_element_type)


def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    causal: bool = True,
    segment_ids: jax.Array | None = None,
    sm_scale: float | None = None,
    implementation: str = "auto",
) -> jax.Array:
    """Causal GQA attention. q [B, T, N, H], k/v [B, S, K, H], segment_ids [B, T] -> [B, T, N, H]."""
    _resolve(implementation, "flash_attention")
    return attention_reference(q, k, v, causal=causal, segment_ids=segment_ids, sm_scale=sm_scale)


__all__ = ["flash_attention", "gmm", "attention_reference", "gmm_reference"]
