"""The ragged all-to-all expert-parallel transport, executed (not only compiled) against the dense oracle.

XLA:CPU has no ragged-all-to-all, so on CPU the op is replaced by `emulated_ragged_all_to_all`, written here from
its documented semantics with collectives CPU has (all_gather and gathers); on GPU or TPU the same tests run the
real `jax.lax.ragged_all_to_all`. Either way the transport's own bookkeeping (what each device sends where, how
received rows map to local experts, how results come back) runs for real and must give the dense oracle's output.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import sharding
from ernie_jax.moe import dense_moe_oracle, expert_parallel_moe, route
from ernie_jax.options import ModelOptions
from tests.helpers import assert_close


def emulated_ragged_all_to_all(
    operand, output, input_offsets, send_sizes, output_offsets, recv_sizes, *, axis_name, axis_index_groups=None
):
    """`jax.lax.ragged_all_to_all` inside shard_map, from all_gather. The offset and size arrays hold S slices per
    device (their length is S * devices): device i sends slice j * S + s, operand[input_offsets[j * S + s] :]
    of send_sizes[j * S + s] rows, to device j, which writes it at output[output_offsets[j * S + s] :] (offsets
    into the *receiver's* buffer, given by the sender); rows of `output` that nothing lands on keep their values.
    recv_sizes[i * S + s] must equal what device i sends here as its slice s: a mismatch poisons the whole output
    with NaN, so inconsistent bookkeeping cannot pass silently."""
    if axis_index_groups is not None:
        raise NotImplementedError("axis_index_groups")
    devices = jax.lax.axis_size(axis_name)
    per = input_offsets.shape[0] // devices  # slices per device
    me = jax.lax.axis_index(axis_name)
    operands = jax.lax.all_gather(operand, axis_name)  # [P, M, D]: every sender's rows
    starts_in = jax.lax.all_gather(input_offsets, axis_name).reshape(devices, devices, per)  # [src, dst, slice]
    sizes = jax.lax.all_gather(send_sizes, axis_name).reshape(devices, devices, per)
    starts_out = jax.lax.all_gather(output_offsets, axis_name).reshape(devices, devices, per)
    rows = jnp.arange(output.shape[0])
    for src in range(devices):
        for s in range(per):
            start, count, first = starts_out[src, me, s], sizes[src, me, s], starts_in[src, me, s]
            lands = (rows >= start) & (rows < start + count)
            source_rows = jnp.clip(first + rows - start, 0, operand.shape[0] - 1)
            output = jnp.where(lands[:, None], operands[src][source_rows], output)
    consistent = jnp.all(recv_sizes.reshape(devices, per) == sizes[:, me])
    return jnp.where(consistent, output, jnp.nan)


def _needs_eight_devices():
    if jax.device_count() < 8:  # conftest gives CPU 8; an accelerator host needs 8 chips for these meshes
        pytest.skip(f"needs 8 devices for an 8-way expert-parallel mesh, found {jax.device_count()}")


def ragged_op_for(mesh):
    """The emulation where XLA has no ragged-all-to-all (CPU); None (the real op) on GPU and TPU."""
    return emulated_ragged_all_to_all if mesh.devices.flat[0].platform == "cpu" else None


def _problem(n=64, d=16, f=8, e=8, k=2, seed=0):
    """Tokens, expert weights and a skewed routing: experts 0 and 1 get most assignments, experts 5.. none."""
    rng = np.random.RandomState(seed)
    x = rng.randn(n, d).astype(np.float32)
    w_gate, w_up = ((rng.randn(e, d, f) * 0.3).astype(np.float32) for _ in range(2))
    w_down = (rng.randn(e, f, d) * 0.3).astype(np.float32)
    router = (rng.randn(d, e) * 0.3).astype(np.float32)
    bias = np.array([0.6, 0.5, 0, 0, 0, -9, -9, -9], np.float32)[:e]  # selection only
    routing = route(jnp.asarray(x), jnp.asarray(router), jnp.asarray(bias), k=k, norm_min=1e-12)
    counts = np.bincount(np.asarray(routing.experts).reshape(-1), minlength=e)
    assert counts[5:].sum() == 0 and counts[:2].sum() > counts[2:].sum(), counts
    return tuple(map(jnp.asarray, (x, w_gate, w_up, w_down))), routing


def test_emulation_matches_the_op_definition():
    """The emulation itself, on a hand-worked exchange between 2 devices."""
    mesh = sharding.make_mesh(data=1, expert=2, devices=jax.devices()[:2])
    spec = jax.sharding.PartitionSpec("expert")
    # Device 0 sends rows [0, 1) to itself and [1, 3) to device 1; device 1 sends row [0, 1) to 0, [1, 2) to itself.
    operand = jnp.array([[10.0], [11.0], [12.0], [20.0], [21.0], [99.0]])  # 3 rows per device
    input_offsets = jnp.array([0, 1, 0, 1])
    send_sizes = jnp.array([1, 2, 1, 1])
    output_offsets = jnp.array([0, 0, 1, 2])  # in the receiver: device 0 gets [10, 20], device 1 gets [11, 12, 21]
    recv_sizes = jnp.array([1, 1, 2, 1])

    def body(op, in_off, send, out_off, recv):
        out = jnp.full((4, 1), -1.0)
        return emulated_ragged_all_to_all(op, out, in_off, send, out_off, recv, axis_name="expert")

    run = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False)
    out = np.asarray(run(operand, input_offsets, send_sizes, output_offsets, recv_sizes)).reshape(2, 4)
    np.testing.assert_array_equal(out, [[10, 20, -1, -1], [11, 12, 21, -1]])
    # Device 1 claims one row from device 0, which sends it two: device 1's output is poisoned, device 0's is not.
    bad = np.asarray(run(operand, input_offsets, send_sizes, output_offsets, jnp.array([1, 1, 1, 1]))).reshape(2, 4)
    assert np.isnan(bad[1]).all(), "receive sizes that disagree with the senders must not pass"
    np.testing.assert_array_equal(bad[0], out[0])


def test_emulation_with_two_slices_per_device():
    """Two slices per (sender, receiver), as the transport sends one per local expert: each receiver lays them out
    slice-major (all senders' slice 0, then all senders' slice 1), hand-worked on 2 devices."""
    mesh = sharding.make_mesh(data=1, expert=2, devices=jax.devices()[:2])
    spec = jax.sharding.PartitionSpec("expert")
    operand = jnp.array([[10.0], [11.0], [12.0], [13.0], [20.0], [21.0], [22.0], [23.0]])  # 4 rows per device
    # Per device: [to 0 slice 0, to 0 slice 1, to 1 slice 0, to 1 slice 1].
    input_offsets = jnp.array([0, 1, 1, 3, 0, 1, 2, 3])
    send_sizes = jnp.array([1, 0, 2, 1, 1, 1, 1, 0])
    output_offsets = jnp.array([0, 2, 0, 3, 1, 2, 2, 4])
    # Per device: [from 0 slice 0, from 0 slice 1, from 1 slice 0, from 1 slice 1].
    recv_sizes = jnp.array([1, 0, 1, 1, 2, 1, 1, 0])

    def body(op, in_off, send, out_off, recv):
        out = jnp.full((5, 1), -1.0)
        return emulated_ragged_all_to_all(op, out, in_off, send, out_off, recv, axis_name="expert")

    run = jax.shard_map(body, mesh=mesh, in_specs=(spec,) * 5, out_specs=spec, check_vma=False)
    out = np.asarray(run(operand, input_offsets, send_sizes, output_offsets, recv_sizes)).reshape(2, 5)
    np.testing.assert_array_equal(out, [[10, 20, 21, -1, -1], [11, 12, 22, 13, -1]])
    bad_sizes = recv_sizes.at[1].set(1)  # device 0 claims a row of slice 1 from device 0, which sends none
    bad = np.asarray(run(operand, input_offsets, send_sizes, output_offsets, bad_sizes)).reshape(2, 5)
    assert np.isnan(bad[0]).all() and not np.isnan(bad[1]).any()


MESHES = {"data2_expert4": dict(data=2, expert=4), "expert8": dict(data=1, expert=8)}


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_ragged_transport_matches_dense_oracle(mesh_name):
    _needs_eight_devices()
    (x, w_gate, w_up, w_down), routing = _problem()
    mesh = sharding.make_mesh(**MESHES[mesh_name])

    def ragged(x, w_gate, w_up, w_down, weights):
        return expert_parallel_moe(
            x,
            routing.experts,
            weights,
            w_gate,
            w_up,
            w_down,
            mesh=mesh,
            options=ModelOptions(moe_transport="ragged_a2a"),
            return_dropped=True,
            ragged_all_to_all=ragged_op_for(mesh),
        )

    def oracle(x, w_gate, w_up, w_down, weights):
        return dense_moe_oracle(x, routing._replace(weights=weights), w_gate, w_up, w_down)

    args = (x, w_gate, w_up, w_down, routing.weights)
    out, dropped = jax.jit(ragged)(*args)
    assert float(dropped) == 0.0  # dropless buffer
    assert_close(out, oracle(*args), np.float32, "forward")
    cot = jax.random.normal(jax.random.key(9), x.shape)
    g_ragged = jax.jit(jax.grad(lambda *a: jnp.sum(ragged(*a)[0] * cot), argnums=(0, 1, 2, 3, 4)))(*args)
    g_oracle = jax.grad(lambda *a: jnp.sum(oracle(*a) * cot), argnums=(0, 1, 2, 3, 4))(*args)
    for name, a, b in zip(("x", "w_gate", "w_up", "w_down", "weights"), g_ragged, g_oracle, strict=True):
        assert_close(a, b, np.float32, f"grad {name}")


def test_bounded_buffer_drops_exactly_the_overflow():
    """With a receive buffer of one balanced share (buffer_factor=1) and skewed routing, the devices holding the
    popular experts overflow. Written out here from the rule: each receiver takes whole blocks from sources in
    source order, cutting the first that does not fit; a source's block is its assignments for that receiver in
    expert order (ties by token order), and a cut keeps its start. Dropped assignments contribute nothing."""
    _needs_eight_devices()
    (x, w_gate, w_up, w_down), routing = _problem()
    mesh = sharding.make_mesh(data=1, expert=8)
    ep, n, k = 8, x.shape[0], routing.experts.shape[1]
    e_loc = w_gate.shape[0] // ep
    n_local = n // ep
    capacity = -(-n_local * k // 8) * 8  # one balanced share, rounded up to 8 rows
    experts = np.asarray(routing.experts)
    keep = np.zeros_like(experts, bool)
    filled = np.zeros(ep, int)
    for src in range(ep):
        tokens = np.arange(src * n_local, (src + 1) * n_local)
        flat = experts[tokens].reshape(-1)
        for slot in np.argsort(flat, kind="stable"):  # expert order, hence grouped by receiving device
            dst = flat[slot] // e_loc
            if filled[dst] < capacity:  # once full, dst takes nothing more from this or any later source
                filled[dst] += 1
                keep[tokens[slot // k], slot % k] = True
    assert 0 < (~keep).sum() < keep.size, "the buffer must overflow for some assignments, not all"

    out, dropped = jax.jit(
        lambda *a: expert_parallel_moe(
            *a,
            mesh=mesh,
            options=ModelOptions(moe_transport="ragged_a2a", moe_buffer_factor=1.0),
            return_dropped=True,
            ragged_all_to_all=ragged_op_for(mesh),
        )
    )(x, routing.experts, routing.weights, w_gate, w_up, w_down)
    assert int(dropped) == (~keep).sum()
    kept_weights = jnp.where(jnp.asarray(keep), routing.weights, 0.0)
    expected = dense_moe_oracle(x, routing._replace(weights=kept_weights), w_gate, w_up, w_down)
    assert_close(out, expected, np.float32, "forward with drops")
