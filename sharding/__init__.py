"""Meshes, the logical-axis rules table and sharding helpers. The only place mesh axis names appear."""

from sharding.attention import attention_specs, sharded_attention
from sharding.context import MOE_TRANSPORTS, ShardingContext, active, shard, use_mesh
from sharding.expert_parallel import expert_parallel_moe
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
    "MOE_TRANSPORTS",
    "ShardingContext",
    "active",
    "attention_specs",
    "expert_parallel_moe",
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
