"""Expert-parallel dropless MoE inside `jax.shard_map`.

Routing happens outside (plain jnp under jit). Inside the shard_map each device holds E/EP experts, whose hidden
dim D is FSDP-sharded and whose width F is tensor-sharded, and its own slice of the tokens. Two transports move
tokens to their experts; both are dropless by default:

- "allgather": all-gather the EP group's tokens, compute the local experts' share of every assignment, then
  `psum_scatter` the partial outputs back to their owners. Runs on CPU, TPU and GPU. Each device touches EP times
  its own tokens (the buffer is N_local * EP * k rows), traded for simple, always-available collectives.
- "ragged_a2a": send each assignment only to the device owning its expert with `ragged_all_to_all`, and return
  the results the same way. Communication proportional to real traffic. XLA:CPU does not implement it (TPU v4+
  and GPU only). Its receive buffer must be static: by default it is the worst case (EP balanced shares, every
  op over it EP times the real rows); `moe_buffer_factor` bounds it, and assignments that overflow are dropped and
  counted.

Each device then runs the same expert compute as the single-device path (`dispatch.expert_swiglu`) on the rows
it received, with its local experts. "allgather" sorts its rows by local expert first (`dispatch.sort_by_expert`);
"ragged_a2a" needs no sort: each source sends one segment per (destination, local expert), and the segments land
laid out by local expert (`receive_layout`), so the grouped matmul reads the receive buffer as it arrives. The
transport and the buffer bound come from the model's run options (`ModelOptions.moe_transport`,
`moe_buffer_factor`).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from ernie_jax.moe.dispatch import expert_swiglu, sort_by_expert
from ernie_jax.moe.permute import inverse_permutation, permute_repeated, permute_rows, repeat_rows, unpermute_sum
from ernie_jax.options import ModelOptions
from sharding.rules import DEFAULT_RULES, ShardingError, axes_tuple, logical_to_spec

WEIGHT_AXES = {
    "w_gate": ("experts", "embed", "expert_mlp"),
    "w_up": ("experts", "embed", "expert_mlp"),
    "w_down": ("experts", "expert_mlp", "embed"),
}


def _gather_fsdp(w_gate, w_up, w_down, d_axes):
    """FSDP: gather the hidden dim D of this layer's expert weights just in time (w_gate/w_up [E_loc, D/fsdp, F],
    w_down [E_loc, F, D/fsdp] -> full D)."""
    if not d_axes:
        return w_gate, w_up, w_down
    return (
        jax.lax.all_gather(w_gate, d_axes, axis=1, tiled=True),
        jax.lax.all_gather(w_up, d_axes, axis=1, tiled=True),
        jax.lax.all_gather(w_down, d_axes, axis=2, tiled=True),
    )


def _run_experts(
    rows: jax.Array, local_ids: jax.Array, row_weights: jax.Array, weights, options: ModelOptions, expected_rows: int
) -> jax.Array:
    """Expert SwiGLU for rows tagged with local expert ids (id E_loc: another device's expert, giving zeros), each
    row weighted by its routing weight [M].
    expected_rows: how many rows the local experts get under balanced routing (for the kernels' cost estimates)."""
    order, group_sizes = sort_by_expert(local_ids, weights[0].shape[0])
    inverse = inverse_permutation(order)  # [M]
    # Sort and un-sort are both permute_rows: gathers forward and backward, no [M, D] scatters.
    xs = permute_rows(rows, order, inverse)
    ws = permute_rows(row_weights, order, inverse)
    ys = expert_swiglu(
        xs, group_sizes, *weights, options=options, expected_rows=expected_rows, row_weights=ws
    )  # [M, D]
    valid = jnp.arange(rows.shape[0]) < group_sizes.sum()
    ys = jnp.where(valid[:, None], ys, 0)  # rows past the local groups are not computed by the grouped matmul
    return permute_rows(ys, inverse, order)  # [M, D]


def _allgather_body(x, experts, weights, w_gate, w_up, w_down, *, options, ep_axes, gather_tokens, d_axes, f_axes):
    # x [n, D]; experts, weights [n, k]; w_gate/w_up [E_loc, D/fsdp, F/tp]; w_down [E_loc, F/tp, D/fsdp]
    w_gate, w_up, w_down = _gather_fsdp(w_gate, w_up, w_down, d_axes)
    if gather_tokens:
        x = jax.lax.all_gather(x, ep_axes, axis=0, tiled=True)  # [n * EP, D]
        experts = jax.lax.all_gather(experts, ep_axes, axis=0, tiled=True)
        weights = jax.lax.all_gather(weights, ep_axes, axis=0, tiled=True)
    n, k = experts.shape
    e_loc = w_gate.shape[0]
    first = jax.lax.axis_index(ep_axes) * e_loc if ep_axes else 0
    local = experts - first  # [n, k]
    is_local = (local >= 0) & (local < e_loc)
    local_ids = jnp.where(is_local, local, e_loc).reshape(-1)  # [n * k]
    rows = repeat_rows(x, k)  # [n * k, D] each assignment's token
    ep = jax.lax.axis_size(ep_axes) if ep_axes else 1
    row_weights = jnp.where(is_local, weights, 0.0).reshape(-1)  # [n * k]
    ys = _run_experts(rows, local_ids, row_weights, (w_gate, w_up, w_down), options, n * k // ep)
    y = ys.reshape(n, k, -1).astype(jnp.float32).sum(1)  # rows come weighted: [n, D]
    if f_axes:  # tensor-parallel down projection: partial sums over the F shards
        y = jax.lax.psum(y, f_axes)
    if ep_axes:
        y = (
            jax.lax.psum_scatter(y, ep_axes, scatter_dimension=0, tiled=True)
            if gather_tokens
            else jax.lax.psum(y, ep_axes)
        )
    return y, jnp.zeros((1,), jnp.float32)  # dropless: nothing dropped


def _varying_zeros(like: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Zeros that vary over the same mesh axes as `like`. A plain `jnp.zeros` output buffer is device-invariant, so
    shard_map pvary's it into ragged_all_to_all, and the transpose of that pvary is a psum of the whole buffer's
    cotangent: an all-reduce of the worst-case [N * k * EP, D] buffer per layer in the backward pass."""
    return jnp.zeros_like(like, shape=shape)


def buffer_rows(n: int, k: int, ep: int, buffer_factor: float) -> int:
    """Rows of a device's ragged_a2a receive buffer: the worst case n * k * ep (every assignment of the EP group
    lands here) when buffer_factor is 0, else buffer_factor balanced shares (n * k each), rounded up to 8 rows."""
    worst = n * k * ep
    if not buffer_factor:
        return worst
    return min(worst, -(-math.ceil(n * k * buffer_factor) // 8) * 8)


def bounded_traffic(traffic: jax.Array, capacity: int) -> jax.Array:
    """Rows each source may send each destination when every destination takes at most `capacity` rows.

    traffic [src, dst] rows wanted. Sources fill a destination's buffer in source order, so a source keeps the
    first rows of its block (the lowest expert ids) and only the source at the boundary is cut; the kept blocks
    stay contiguous at the same offsets. Equals traffic when nothing overflows."""
    start = jnp.cumsum(traffic, axis=0) - traffic  # [src, dst] where each block would begin
    return jnp.clip(capacity - start, 0, traffic)


def _kept_segments(counts: jax.Array, kept: jax.Array) -> jax.Array:
    """counts [src, E_loc] rows per (source, local expert), sorted by expert within a source; kept [src] rows of
    each source that fit. Returns the kept rows per (source, local expert): a prefix of each source's block."""
    ends = jnp.minimum(jnp.cumsum(counts, axis=1), kept[:, None])
    return jnp.diff(ends, axis=1, prepend=jnp.zeros_like(ends[:, :1]))


def receive_layout(kept: jax.Array) -> jax.Array:
    """Where each kept segment lands in its receiver's buffer, laid out by local expert, then by source.

    kept [src, dst, E_loc]: rows each source sends each receiver for each of the receiver's local experts. Returns
    offsets [src, dst, E_loc] into the receiver's buffer: expert e's rows from every source come before expert
    e + 1's, so the buffer arrives sorted by local expert and the grouped matmul runs on it as it is (no local
    sort and un-sort of the receive buffer)."""
    per_expert = kept.sum(0)  # [dst, E_loc] rows each receiver gets per local expert
    expert_start = jnp.cumsum(per_expert, axis=1) - per_expert  # [dst, E_loc]
    source_start = jnp.cumsum(kept, axis=0) - kept  # [src, dst, E_loc] within one expert's rows
    return expert_start[None] + source_start


def received_row_sources(
    kept: jax.Array, landing: jax.Array, sent_from: jax.Array, capacity: int, rows_per_source: int
) -> jax.Array:
    """For each row of one receiver's buffer, the row it came from in all senders' send buffers laid end to end
    ([EP * rows_per_source]), or -1 for rows past the received ones.

    kept, landing, sent_from: [src, E_loc] rows each source sent here per local expert, where they landed here
    (`receive_layout`) and where they started in the source's send buffer."""
    starts = landing.T.reshape(-1)  # [E_loc * src]: segments in buffer order (by local expert, then by source)
    ends = starts + kept.T.reshape(-1)
    rows = jnp.arange(capacity)
    seg = jnp.searchsorted(ends, rows, side="right")  # the segment holding each row; E_loc * src past the end
    last = ends.shape[0] - 1
    src = jnp.minimum(seg, last) % kept.shape[0]
    first = sent_from.T.reshape(-1)[jnp.minimum(seg, last)]
    origin = src * rows_per_source + first + rows - starts[jnp.minimum(seg, last)]
    return jnp.where(seg <= last, origin, -1)


def _ragged_body(
    x,
    experts,
    weights,
    w_gate,
    w_up,
    w_down,
    *,
    options,
    ep_axes,
    d_axes,
    f_axes,
    ragged_all_to_all=jax.lax.ragged_all_to_all,
):
    w_gate, w_up, w_down = _gather_fsdp(w_gate, w_up, w_down, d_axes)
    n, k = experts.shape
    d = x.shape[-1]
    e_loc = w_gate.shape[0]
    ep = jax.lax.axis_size(ep_axes)
    me = jax.lax.axis_index(ep_axes)
    order, counts = sort_by_expert(experts, ep * e_loc)  # by global expert, hence grouped by destination device
    inverse = inverse_permutation(order)  # [n * k]; counts [E] assignments per expert from this device
    # x[order // k] whose gradient is a gather and a sum over k, not a scatter-add.
    send_rows = permute_repeated(x, k, order, inverse)  # [n * k, D]
    all_counts = jax.lax.all_gather(counts, ep_axes, axis=0, tiled=False)  # [EP_src, E]
    wanted = all_counts.reshape(ep, ep, e_loc).sum(-1)  # [src, dst] rows to send
    capacity = buffer_rows(n, k, ep, options.moe_buffer_factor)
    traffic = bounded_traffic(wanted, capacity)  # [src, dst] rows sent: all of them unless a buffer overflows
    dropped = (wanted[me].sum() - traffic[me].sum()).astype(jnp.float32)  # my assignments that found no room
    # One segment per (destination, local expert): a cut block keeps a prefix of each source's rows in expert order.
    kept = _kept_segments(all_counts.reshape(ep * ep, e_loc), traffic.reshape(-1)).reshape(ep, ep, e_loc)
    landing = receive_layout(kept)  # [src, dst, E_loc]
    expert_offsets = (jnp.cumsum(all_counts, axis=1) - all_counts).reshape(ep, ep, e_loc)  # [src, dst, E_loc]
    received = ragged_all_to_all(
        send_rows,
        _varying_zeros(send_rows, (capacity, d)),
        expert_offsets[me].reshape(-1),  # my rows for (dst, e) start where global expert dst * E_loc + e does
        kept[me].reshape(-1),
        landing[me].reshape(-1),
        kept[:, me].reshape(-1),  # [src * E_loc]
        axis_name=ep_axes,
    )  # [capacity, D], sorted by local expert; rows past the groups stay zero
    # The routing weights are applied here, so the results come back weighted: the backward pass then needs no
    # copy of the returned rows, and the remat recompute no return exchange. They come by all_gather and a
    # lookup: a ragged exchange of one fp32 per row would move a padded 128-lane row per row on TPU.
    send_weights = permute_rows(weights.reshape(-1), order, inverse)  # [n * k] in send order
    all_weights = jax.lax.all_gather(send_weights, ep_axes, axis=0, tiled=True)  # [EP * n * k]
    source = received_row_sources(kept[:, me], landing[:, me], expert_offsets[:, me], capacity, n * k)
    received_weights = jnp.where(source >= 0, all_weights[jnp.maximum(source, 0)], 0.0)  # [capacity]
    group_sizes = kept[:, me].sum(0)  # [E_loc]
    ys = expert_swiglu(
        received, group_sizes, w_gate, w_up, w_down, options=options, expected_rows=n * k, row_weights=received_weights
    )
    if f_axes:
        ys = jax.lax.psum(ys, f_axes)
    returned = ragged_all_to_all(
        ys.astype(x.dtype),
        _varying_zeros(send_rows, (n * k, d)),
        landing[:, me].reshape(-1),  # each source's segments, back from where they landed here
        kept[:, me].reshape(-1),
        expert_offsets[:, me].reshape(-1),  # to where they were sent from
        kept[me].reshape(-1),
        axis_name=ep_axes,
    )
    # Each token's k rows (weighted; a dropped one is 0) summed in fp32: [n, D].
    return unpermute_sum(returned, k, inverse, order), dropped[None]


def expert_parallel_moe(
    x: jax.Array,
    experts: jax.Array,
    weights: jax.Array,
    w_gate: jax.Array,
    w_up: jax.Array,
    w_down: jax.Array,
    *,
    mesh: Mesh,
    rules=DEFAULT_RULES,
    options: ModelOptions = ModelOptions(),
    return_dropped: bool = False,
    check_vma: bool = True,
    ragged_all_to_all: Callable | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """MoE over `mesh`. x [N, D] tokens; experts, weights [N, k] from routing; expert weights as stored
    (w_gate/w_up [E, D, F], w_down [E, F, D]) with their parameter shardings. Returns [N, D] in x's dtype, and
    with return_dropped the number of assignments dropped (a [] fp32).

    options: the transport (`moe_transport`), the receive-buffer bound and the grouped-matmul kernel. Dropless
    unless moe_transport="ragged_a2a" with moe_buffer_factor > 0, which bounds each device's receive buffer to that
    many balanced shares (see `buffer_rows`); assignments that do not fit contribute zero and are counted.

    ragged_all_to_all: a stand-in for `jax.lax.ragged_all_to_all` with its signature, for tests: an emulation from
    collectives XLA:CPU has lets the ragged transport's bookkeeping execute on CPU."""
    num_experts = w_gate.shape[0]
    token_spec = logical_to_spec(("batch", None), mesh, rules)
    tok_axes = axes_tuple(token_spec[0])
    w_specs = {
        name: logical_to_spec(axes, mesh, rules, shape=w.shape, name=name)
        for (name, axes), w in zip(WEIGHT_AXES.items(), (w_gate, w_up, w_down), strict=True)
    }
    ep_axes, d_axes, f_axes = (axes_tuple(entry) for entry in w_specs["w_gate"])
    ep = 1
    for a in ep_axes:
        ep *= mesh.shape[a]
    if num_experts % ep:
        raise ShardingError(
            f"moe: {num_experts} experts cannot be split over expert-parallel mesh axes {ep_axes} of size {ep}; "
            "choose an expert-parallel size that divides the number of experts"
        )
    shards = 1
    for a in tok_axes:
        shards *= mesh.shape[a]
    if x.shape[0] % shards:
        raise ShardingError(
            f"moe: {x.shape[0]} tokens (batch * seq) are not divisible by the {shards} batch shards over {tok_axes}; "
            "use a global batch divisible by data * fsdp * expert"
        )
    gather_tokens = bool(ep_axes) and all(a in tok_axes for a in ep_axes)
    if options.moe_transport == "ragged_a2a":
        if ragged_all_to_all is None and mesh.devices.flat[0].platform == "cpu":
            raise NotImplementedError(
                "moe transport 'ragged_a2a' needs TPU v4+ or GPU: XLA:CPU does not implement ragged-all-to-all. "
                "Use moe_transport='allgather' on CPU."
            )
        if not gather_tokens:
            raise ShardingError("moe transport 'ragged_a2a' needs tokens sharded over the expert axes as well")
        body = lambda *a: _ragged_body(
            *a,
            options=options,
            ep_axes=ep_axes,
            d_axes=d_axes,
            f_axes=f_axes,
            ragged_all_to_all=ragged_all_to_all or jax.lax.ragged_all_to_all,
        )
    else:  # "allgather" (ModelOptions admits no other transport)
        body = lambda *a: _allgather_body(
            *a, options=options, ep_axes=ep_axes, gather_tokens=gather_tokens, d_axes=d_axes, f_axes=f_axes
        )
    count_spec = logical_to_spec(("batch",), mesh, rules)  # dropped: one count per token shard
    out, dropped = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(token_spec, token_spec, token_spec, w_specs["w_gate"], w_specs["w_up"], w_specs["w_down"]),
        out_specs=(token_spec, count_spec),
        check_vma=check_vma,
    )(x, experts, weights.astype(jnp.float32), w_gate, w_up, w_down)
    out = out.astype(x.dtype)
    return (out, jnp.sum(dropped)) if return_dropped else out
