"""ERNIE 4.5 mixture of experts, top to bottom in one place.

routing.py          route tokens to experts (fp32 softmax, biased top-k, renormalised weights); router stats
dispatch.py         one device: sort assignments by expert, grouped SwiGLU (pallas_kernels.gmm), un-sort, combine
expert_parallel.py  on a mesh: the shard_map bodies of the allgather and ragged all-to-all transports
permute.py          row permutations whose gradients are gathers (used by both dispatch paths)
block.py            `MoEBlock`, the nnx module that holds the weights and picks the path
"""

from ernie_jax.moe.block import MoEBlock, RoutedExperts, update_correction_biases
from ernie_jax.moe.dispatch import dense_moe_oracle, dropless_moe, expert_swiglu, sort_by_expert
from ernie_jax.moe.expert_parallel import expert_parallel_moe
from ernie_jax.moe.routing import CorrectionBias, RouterStats, RouterWeight, Routing, route, router_stats

__all__ = [
    "CorrectionBias",
    "MoEBlock",
    "RoutedExperts",
    "RouterStats",
    "RouterWeight",
    "Routing",
    "dense_moe_oracle",
    "dropless_moe",
    "expert_parallel_moe",
    "expert_swiglu",
    "route",
    "router_stats",
    "sort_by_expert",
    "update_correction_biases",
]
