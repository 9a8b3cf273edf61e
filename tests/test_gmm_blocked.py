"""The CPU grouped matmul (pallas_kernels/gmm/blocked.py) equals the ragged_dot twin, forward and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.gmm.blocked import gmm_blocked, tile_rows
from pallas_kernels.gmm.reference import gmm_reference
from tests.helpers import assert_close

M, K, N, G = 40, 12, 10, 5
_f_blocked = jax.jit(jax.value_and_grad(lambda a, b, gs, c: jnp.sum(gmm_blocked(a, b, gs, tile=8) * c), argnums=(0, 1)))
_f_ref = jax.jit(jax.value_and_grad(lambda a, b, gs, c: jnp.sum(gmm_reference(a, b, gs) * c), argnums=(0, 1)))


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(0, 14), min_size=G, max_size=G).filter(lambda s: sum(s) <= M))
def test_blocked_gmm_matches_twin_with_ragged_and_empty_groups(sizes):
    keys = jax.random.split(jax.random.key(sum(sizes)), 3)
    lhs = jax.random.normal(keys[0], (M, K))
    rhs = jax.random.normal(keys[1], (G, K, N))
    cot = jax.random.normal(keys[2], (M, N))
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out_b = gmm_blocked(lhs, rhs, group_sizes, tile=8)
    assert_close(out_b, gmm_reference(lhs, rhs, group_sizes), np.float32, "forward")
    assert not np.any(np.asarray(out_b)[sum(sizes) :]), "rows past sum(group_sizes) must be zero"
    (_, (da_b, db_b)), (_, (da_r, db_r)) = _f_blocked(lhs, rhs, group_sizes, cot), _f_ref(lhs, rhs, group_sizes, cot)
    assert_close(da_b, da_r, np.float32, "dlhs")
    assert_close(db_b, db_r, np.float32, "drhs")


def test_blocked_gmm_inside_shard_map_sums_the_replicated_weight_gradient():
    """Rows split over devices, the expert weights replicated (as in the expert-parallel shard_map bodies): the
    weight gradient must be the sum over the shards, not one shard's, and must be accepted by shard_map's checks."""
    from jax.sharding import PartitionSpec as P

    mesh = jax.make_mesh((2,), ("rows",), devices=jax.devices()[:2])
    keys = jax.random.split(jax.random.key(0), 3)
    lhs = jax.random.normal(keys[0], (2 * M, K))
    rhs = jax.random.normal(keys[1], (G, K, N))
    cot = jax.random.normal(keys[2], (2 * M, N))
    group_sizes = jnp.asarray([9, 0, 14, 3, 10], jnp.int32)  # each shard's own rows, sorted by group

    def loss(fn, a, b, gs, c):
        body = jax.shard_map(
            lambda a, b, gs, c: jax.lax.psum(jnp.sum(fn(a, b, gs) * c), "rows"),
            mesh=mesh,
            in_specs=(P("rows"), P(), P(), P("rows")),
            out_specs=P(),
        )
        return body(a, b, gs, c)

    rows, replicated = jax.NamedSharding(mesh, P("rows")), jax.NamedSharding(mesh, P())
    args = (jax.device_put(lhs, rows), jax.device_put(rhs, replicated), jax.device_put(group_sizes, replicated))
    args += (jax.device_put(cot, rows),)
    blocked = jax.jit(jax.grad(lambda *a: loss(lambda *x: gmm_blocked(*x, tile=8), *a), argnums=(0, 1)))
    twin = jax.jit(jax.grad(lambda *a: loss(gmm_reference, *a), argnums=(0, 1)))
    for got, want, what in zip(blocked(*args), twin(*args), ("d lhs", "d rhs"), strict=True):
        assert_close(got, want, np.float32, what)


def test_tile_rows_is_half_the_mean_group_as_a_power_of_two_within_bounds():
    assert [tile_rows(m, 8) for m in (8, 256, 1024, 2048, 4096, 65536)] == [32, 32, 64, 128, 128, 128]
    assert tile_rows(2048, 64) == 32  # more groups, shorter tiles: each group pads by up to a tile
    assert tile_rows(100, 3) == 32


@settings(max_examples=10, deadline=None)
@given(st.lists(st.integers(0, 160), min_size=G, max_size=G).filter(lambda s: sum(s) <= 400))
def test_blocked_gmm_with_its_default_tiles_matches_twin(sizes):
    """Without `tile`, the rows per tile come from `tile_rows` (32 here: 400 rows in 5 groups)."""
    m = 400
    keys = jax.random.split(jax.random.key(sum(sizes)), 3)
    lhs = jax.random.normal(keys[0], (m, K))
    rhs = jax.random.normal(keys[1], (G, K, N))
    cot = jax.random.normal(keys[2], (m, N))
    group_sizes = jnp.asarray(sizes, jnp.int32)
    out = gmm_blocked(lhs, rhs, group_sizes)
    assert_close(out, gmm_reference(lhs, rhs, group_sizes), np.float32, "forward")
    assert not np.any(np.asarray(out)[sum(sizes) :]), "rows past sum(group_sizes) must be zero"
    grads = jax.value_and_grad(lambda a, b: jnp.sum(gmm_blocked(a, b, group_sizes) * cot), argnums=(0, 1))
    (_, (da, db)), (_, (da_r, db_r)) = grads(lhs, rhs), _f_ref(lhs, rhs, group_sizes, cot)
    assert_close(da, da_r, np.float32, "dlhs")
    assert_close(db, db_r, np.float32, "drhs")
