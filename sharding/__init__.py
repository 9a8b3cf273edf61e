"""Meshes, the logical-axis rules table, the active-mesh context and per-shard attention. The only place mesh axis
names appear. (The MoE's expert-parallel shard_map bodies live with the MoE, in ernie_jax/moe/.)"""

from sharding.attention import attention_specs, sharded_attention
from sharding.context import ShardingContext, active, shard, use_mesh
from sharding.mesh import MeshError, make_mesh, resolve_mesh_shape
from sharding.rules import (
    DEFAULT_RULES,
    ShardingError,
    logical_to_spec,
    named_sharding,
    replicated,
    shard_state,
    state_shardings,
)

__all__ = [
    "ShardingContext",
    "active",
    "attention_specs",
    "shard",
    "sharded_attention",
    "use_mesh",
    "DEFAULT_RULES",
    "MeshError",
    "ShardingError",
    "logical_to_spec",
    "make_mesh",
    "named_sharding",
    "replicated",
    "resolve_mesh_shape",
    "shard_state",
    "state_shardings",
]
