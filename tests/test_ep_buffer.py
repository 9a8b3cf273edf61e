"""The bounded ragged_a2a receive buffer (mesh.moe_buffer_factor): which rows are sent, and the config checks.

XLA:CPU cannot run ragged_all_to_all, so the transport itself is compile-checked for TPU in
tests/test_sharding_tpu_aot.py; here the bookkeeping that decides what each device sends is checked exactly."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.moe.expert_parallel import (
    _kept_segments,
    bounded_traffic,
    buffer_rows,
    receive_layout,
    received_row_sources,
)
from ernie_jax.training.config import ConfigError, load_preset


def test_buffer_rows():
    assert buffer_rows(n=512, k=6, ep=8, buffer_factor=0.0) == 512 * 6 * 8  # worst case: dropless
    assert buffer_rows(n=512, k=6, ep=8, buffer_factor=2.0) == 512 * 6 * 2
    assert buffer_rows(n=5, k=3, ep=8, buffer_factor=1.5) == 24  # 22.5 rows, rounded up to 8
    assert buffer_rows(n=512, k=6, ep=2, buffer_factor=4.0) == 512 * 6 * 2  # never above the worst case


@pytest.mark.parametrize("seed", range(5))
def test_bounded_traffic_fills_each_receiver_in_source_order(seed):
    rng = np.random.default_rng(seed)
    ep = 6
    wanted = rng.integers(0, 40, size=(ep, ep))
    capacity = int(wanted.sum(0).mean())  # some receivers overflow, some do not
    kept = np.asarray(bounded_traffic(wanted, capacity))
    assert (kept >= 0).all() and (kept <= wanted).all()
    np.testing.assert_array_equal(kept.sum(0), np.minimum(wanted.sum(0), capacity))  # full up to capacity
    for dst in range(ep):
        cut = np.nonzero(kept[:, dst] < wanted[:, dst])[0]
        if cut.size:  # only the first source that does not fit is cut; all later ones send nothing
            assert (kept[cut[0] + 1 :, dst] == 0).all()
            assert (kept[: cut[0], dst] == wanted[: cut[0], dst]).all()
    np.testing.assert_array_equal(np.asarray(bounded_traffic(wanted, int(wanted.sum(0).max()))), wanted)


def test_kept_segments_are_a_prefix_in_expert_order():
    counts = np.array([[3, 0, 2], [1, 4, 1]])  # [src, local expert]
    kept = np.array([4, 2])
    np.testing.assert_array_equal(np.asarray(_kept_segments(counts, kept)), [[3, 0, 1], [1, 1, 0]])
    np.testing.assert_array_equal(np.asarray(_kept_segments(counts, counts.sum(1))), counts)


@pytest.mark.parametrize("seed", range(3))
def test_received_rows_land_by_local_expert_then_source(seed):
    """Each receiver's buffer holds local expert 0's rows from every source (in source order), then expert 1's,
    and so on; every row knows which sender's row it is. Written out row by row."""
    rng = np.random.default_rng(seed)
    ep, e_loc, per_source, capacity = 3, 4, 40, 64
    kept = rng.integers(0, 6, size=(ep, ep, e_loc))  # [src, dst, local expert]
    kept[0, 1, 2] = kept[2, 0, 0] = 0  # empty segments
    sent_from = rng.integers(0, per_source - 6, size=(ep, ep, e_loc))
    landing = np.asarray(receive_layout(jnp.asarray(kept)))
    for dst in range(ep):
        expected_landing = np.zeros((ep, e_loc), int)
        origin = []
        for e in range(e_loc):
            for src in range(ep):
                expected_landing[src, e] = len(origin)
                origin += [src * per_source + sent_from[src, dst, e] + j for j in range(kept[src, dst, e])]
        np.testing.assert_array_equal(landing[:, dst], expected_landing)
        here = (jnp.asarray(a[:, dst]) for a in (kept, landing, sent_from))
        got = received_row_sources(*here, capacity, per_source)
        np.testing.assert_array_equal(np.asarray(got), origin + [-1] * (capacity - len(origin)))


def test_buffer_factor_config_errors_name_the_field():
    cfg = load_preset("a3b_tpu")
    assert dataclasses.replace(cfg.mesh, moe_buffer_factor=2.0).moe_buffer_factor == 2.0
    with pytest.raises(ConfigError, match="mesh.moe_buffer_factor"):
        dataclasses.replace(cfg.mesh, moe_buffer_factor=0.5)
    with pytest.raises(ConfigError, match="mesh.moe_buffer_factor.*ragged_a2a"):
        dataclasses.replace(cfg.mesh, moe_transport="allgather", moe_buffer_factor=2.0)
