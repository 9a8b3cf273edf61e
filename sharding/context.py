"""The active mesh for model code: `with sharding.use_mesh(mesh): ...`.

Model code never names mesh axes. It asks `active()` whether a mesh is in use and constrains activations with
`shard(x, "batch", "seq", "act_embed")`. Both are no-ops when no mesh is active (single device, plain CPU tests).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.rules import DEFAULT_RULES, MeshAxes, axes_tuple

MOE_TRANSPORTS = ("allgather", "ragged_a2a")


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES
    moe_transport: str = "allgather"  # expert-parallel token exchange, see sharding/expert_parallel.py
    moe_buffer_factor: float = 0.0  # ragged_a2a receive buffer in balanced shares; 0 = worst case (dropless)

    def __post_init__(self):
        if self.moe_transport not in MOE_TRANSPORTS:
            raise ValueError(f"moe_transport must be one of {MOE_TRANSPORTS}, got {self.moe_transport!r}")


_STATE = threading.local()


def active() -> ShardingContext | None:
    stack = getattr(_STATE, "stack", [])
    return stack[-1] if stack else None


@contextlib.contextmanager
def use_mesh(
    mesh: Mesh, rules=DEFAULT_RULES, moe_transport: str = "allgather", moe_buffer_factor: float = 0.0
) -> Iterator[ShardingContext]:
    """Make `mesh` the one model code shards over while tracing inside this block."""
    ctx = ShardingContext(mesh, tuple(rules), moe_transport, moe_buffer_factor)
    if not hasattr(_STATE, "stack"):
        _STATE.stack = []
    _STATE.stack.append(ctx)
    try:
        yield ctx
    finally:
        _STATE.stack.pop()


def activation_spec(logical_axes: Sequence[str | None], shape: Sequence[int], ctx: ShardingContext) -> PartitionSpec:
    """Like rules.logical_to_spec, but a mesh axis that does not divide the dimension is dropped (replicated)
    instead of raising: activations such as a batch of 1 in generation stay valid on any mesh."""
    table = dict(ctx.rules)
    used: set[str] = set()
    spec = []
    for dim, logical in enumerate(logical_axes):
        axes = [] if logical is None else list(axes_tuple(table.get(logical)))
        kept, size = [], 1
        for a in axes:
            n = ctx.mesh.shape.get(a, 1)
            if n > 1 and a not in used and shape[dim] % (size * n) == 0:
                kept.append(a)
                size *= n
        used.update(kept)
        spec.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*spec)


def shard(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """Constrain an activation's sharding by logical axis names (no-op without an active mesh)."""
    ctx = active()
    if ctx is None:
        return x
    spec = activation_spec(logical_axes, x.shape, ctx)
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))
