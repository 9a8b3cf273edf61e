"""The active mesh for model code: `with sharding.use_mesh(mesh): ...`.

Model code never names mesh axes. It asks `active()` whether a mesh is in use and constrains activations with
`shard(x, "batch", "seq", "act_embed")`. Both are no-ops when no mesh is active (single device, plain CPU tests).
Only the devices (mesh) and the logical-axis rules are ambient; how the model runs (kernels, MoE transport, remat)
travels with the model in `ernie_jax.options.ModelOptions`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Iterator

import jax
from jax.sharding import Mesh, NamedSharding

from sharding.rules import DEFAULT_RULES, MeshAxes, logical_to_spec


@dataclasses.dataclass(frozen=True)
class ShardingContext:
    mesh: Mesh
    rules: tuple[tuple[str, MeshAxes], ...] = DEFAULT_RULES


_STATE = threading.local()


def active() -> ShardingContext | None:
    stack = getattr(_STATE, "stack", [])
    return stack[-1] if stack else None


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules=DEFAULT_RULES) -> Iterator[ShardingContext]:
    """Make `mesh` the one model code shards over while tracing inside this block."""
    ctx = ShardingContext(mesh, tuple(rules))
    if not hasattr(_STATE, "stack"):
        _STATE.stack = []
    _STATE.stack.append(ctx)
    try:
        yield ctx
    finally:
        _STATE.stack.pop()


def shard(x: jax.Array, *logical_axes: str | None) -> jax.Array:
    """Constrain an activation's sharding by logical axis names (no-op without an active mesh). Mesh axes that do
    not divide a dimension are left out (replicated) rather than raising."""
    ctx = active()
    if ctx is None:
        return x
    spec = logical_to_spec(logical_axes, ctx.mesh, ctx.rules, shape=x.shape, name="activation", indivisible="replicate")
    return jax.lax.with_sharding_constraint(x, NamedSharding(ctx.mesh, spec))
