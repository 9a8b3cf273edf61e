"""How a model runs, as opposed to what it is: the one carrier of run options, validated once.

`ModelOptions` travels with the model (modules read it at trace time), so everything that runs the model (the
train step, the AOT report, generation, the trainer's end-of-run sample) runs it the same way. Only the mesh
and the logical-axis rules stay ambient (`sharding.use_mesh`), because they describe the devices, not the model.
To run a built model differently, `ernie_jax.model.with_options(model, moe_transport="allgather")`.
"""

from __future__ import annotations

import dataclasses

REMAT_CHOICES = ("none", "full", "dots", "dots_all", "attention")  # what each one saves: ernie_jax.model.REMAT_POLICIES
KERNEL_IMPLEMENTATIONS = ("auto", "xla", "pallas")  # see pallas_kernels: auto = Pallas on TPU/GPU, jnp on CPU
PLATFORMS = ("auto", "tpu", "gpu", "cpu")
MOE_TRANSPORTS = ("allgather", "ragged_a2a")


class OptionsError(ValueError):
    """A run option out of range; `field` names the ModelOptions field, so callers can name their own key."""

    def __init__(self, field: str, reason: str):
        super().__init__(f"{field}: {reason}")
        self.field, self.reason = field, reason


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    remat: str = "none"  # rematerialisation of each layer group's scan body
    # False: each layer group's scan is unrolled, so the compiled program holds every layer one after another (the
    # parameters stay stacked). Compiling takes longer the deeper the model; on XLA:CPU a shallow model trains
    # faster unrolled, because the scan's per-iteration stacking of saved activations and its loop go away.
    scan_layers: bool = True
    attention_impl: str = "auto"  # pallas_kernels.flash_attention implementation
    gmm_impl: str = "auto"  # pallas_kernels.gmm implementation (routed experts)
    # The platform kernels are traced for: "auto" is this host's backend; "tpu" compiles the Mosaic kernels on a
    # CPU host (the AOT report), never interpreting them.
    platform: str = "auto"
    # Expert-parallel token exchange on a mesh (ernie_jax/moe/expert_parallel.py). ragged_a2a: TPU v4+ and GPU.
    moe_transport: str = "allgather"
    # ragged_a2a receive buffer in balanced shares (N_local * k rows); 0 = the worst case (dropless).
    moe_buffer_factor: float = 0.0

    def __post_init__(self):
        for field, value, choices in (
            ("remat", self.remat, REMAT_CHOICES),
            ("attention_impl", self.attention_impl, KERNEL_IMPLEMENTATIONS),
            ("gmm_impl", self.gmm_impl, KERNEL_IMPLEMENTATIONS),
            ("platform", self.platform, PLATFORMS),
            ("moe_transport", self.moe_transport, MOE_TRANSPORTS),
        ):
            if value not in choices:
                raise OptionsError(field, f"must be one of {', '.join(choices)}, got {value!r}")
        if not isinstance(self.scan_layers, bool):
            raise OptionsError("scan_layers", f"must be true or false, got {self.scan_layers!r}")
        if not (self.moe_buffer_factor == 0 or self.moe_buffer_factor >= 1):
            raise OptionsError(
                "moe_buffer_factor",
                f"must be 0 (worst case, dropless) or >= 1 (balanced shares), got {self.moe_buffer_factor}",
            )
        if self.moe_buffer_factor and self.moe_transport != "ragged_a2a":
            raise OptionsError(
                "moe_buffer_factor", "bounds the ragged_a2a receive buffer; set moe_transport=ragged_a2a or leave it 0"
            )
