"""Meshes, the logical-axis rules table and sharding helpers. The only place mesh axis names appear."""

from sharding.mesh import MeshError, make_mesh, resolve_mesh_shape
from sharding.rules import (
    DEFAULT_RULES,
    ShardingError,
    logical_to_spec,
    named_sharding,
    shard_state,
    state_shardings,
)

__all__ = [
    "DEFAULT_RULES",
    "MeshError",
    "ShardingError",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "resolve_mesh_shape",
    "shard_state",
    "state_shardings",
]
