"""The one table that maps logical axis names to mesh axes. Mesh axis names appear only in sharding/.

Logical names used by the model (see ernie_jax/config.py for the shape vocabulary):
  parameters: vocab (V), embed (D), q_heads (N), kv_heads (K), head_dim (H), mlp (F dense), experts (E),
              expert_mlp (F routed), router_experts (E of the router, replicated), layers (scan axis), norm
  activations: batch (B), seq (T), act_embed (D of activations), act_heads (N of activations)
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sharding.mesh import DATA, DCN, EXPERT, FSDP, TENSOR

MeshAxes = str | tuple[str, ...] | None

# FSDP shards a hidden dimension of every weight; experts go over the expert axis; heads and FFN width over the
# tensor axis. Activations: batch over dcn, data, fsdp and expert (FSDP and EP shard the batch too).
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("vocab", TENSOR),
    ("embed", FSDP),
    ("q_heads", TENSOR),
    ("kv_heads", TENSOR),
    ("head_dim", None),
    ("mlp", TENSOR),
    ("experts", EXPERT),
    ("expert_mlp", TENSOR),
    ("router_experts", None),
    ("layers", None),
    ("norm", None),
    ("batch", (DCN, DATA, FSDP, EXPERT)),  # multi-slice: data parallel over DCN, everything else inside a slice
    ("seq", None),
    ("act_embed", None),
    ("act_heads", TENSOR),
)


class ShardingError(ValueError):
    """A layout that cannot be realised on this mesh; the message names the tensor and the fix."""


def axes_tuple(axes: MeshAxes) -> tuple[str, ...]:
    if axes is None:
        return ()
    return (axes,) if isinstance(axes, str) else tuple(axes)


def logical_to_spec(
    logical_axes: Sequence[str | None],
    mesh: Mesh,
    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES,
    shape: Sequence[int] | None = None,
    name: str = "tensor",
    *,
    indivisible: str = "raise",
) -> PartitionSpec:
    """PartitionSpec for a tensor with these logical axes: the one resolver of logical names to mesh axes.

    Mesh axes of size 1 (or absent) are dropped. indivisible="raise" (parameters, batches): a mesh axis used
    twice or a dimension not divisible by its mesh axes raises, naming the tensor. indivisible="replicate"
    (activations): such axes are left out, so e.g. a batch of 1 in generation stays valid on any mesh.
    """
    if indivisible not in ("raise", "replicate"):
        raise ValueError(f"indivisible: 'raise' or 'replicate', got {indivisible!r}")
    if indivisible == "replicate" and shape is None:
        raise ValueError("indivisible='replicate' needs the tensor's shape")
    table = dict(rules)
    used: set[str] = set()
    spec = []
    for dim, logical in enumerate(logical_axes):
        if logical is None:
            spec.append(None)
            continue
        if logical not in table:
            raise ShardingError(f"{name}: logical axis {logical!r} has no rule; add it to sharding.rules")
        axes = tuple(a for a in axes_tuple(table[logical]) if mesh.shape.get(a, 1) > 1)
        if indivisible == "replicate":
            kept, size = [], 1
            for a in axes:
                if a not in used and shape[dim] % (size * mesh.shape[a]) == 0:
                    kept.append(a)
                    size *= mesh.shape[a]
            axes = tuple(kept)
        else:
            for a in axes:
                if a in used:
                    raise ShardingError(f"{name}: mesh axis {a!r} would shard two dimensions {tuple(logical_axes)}")
            size = math.prod(mesh.shape[a] for a in axes)
            if shape is not None and shape[dim] % size:
                raise ShardingError(
                    f"{name}: dimension {dim} ({logical}) of size {shape[dim]} is not divisible by mesh axes "
                    f"{axes} of total size {size}; change the mesh sizes or the config"
                )
        used.update(axes)
        spec.append(None if not axes else axes[0] if len(axes) == 1 else axes)
    return PartitionSpec(*spec)


def replicated(mesh: Mesh) -> NamedSharding:
    """Every device holds the whole array (scalars, counters)."""
    return NamedSharding(mesh, PartitionSpec())


def named_sharding(logical_axes, mesh: Mesh, rules=DEFAULT_RULES, shape=None, name="tensor") -> NamedSharding:
    return NamedSharding(mesh, logical_to_spec(logical_axes, mesh, rules, shape, name))


def state_shardings(state, mesh: Mesh, rules=DEFAULT_RULES):
    """NamedShardings for every Variable of an nnx State (from its `logical_axes` metadata)."""
    from flax import nnx

    def one(path, var):
        axes = var.get_metadata().get("logical_axes")
        if axes is None:
            raise ShardingError(f"{'.'.join(map(str, path))}: parameter has no logical_axes metadata")
        return var.replace(named_sharding(axes, mesh, rules, var.get_value().shape, ".".join(map(str, path))))

    return nnx.map_state(one, state)


def shard_state(state, mesh: Mesh, rules=DEFAULT_RULES):
    """Place every Variable of an nnx State on the mesh according to its logical axes."""
    shardings = state_shardings(state, mesh, rules)
    return jax.tree.map(lambda x, s: jax.device_put(x, s), state, shardings)
