"""The CPU grouped matmul (pallas_kernels/gmm/blocked.py) equals the ragged_dot twin, forward and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from pallas_kernels.gmm.blocked import gmm_blocked
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
