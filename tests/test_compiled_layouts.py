"""Layouts XLA:CPU gives our training step: no transposed copy of an activation where a dot can read it in place,
no zero-filled buffer scattered into where one gather builds the layout."""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.layers import MLP
from ernie_jax.model import MTPLayer
from ernie_jax.options import ModelOptions
from pallas_kernels.gmm.blocked import gmm_blocked
from tests.helpers import TINY_DENSE

BATCH, SEQ, WIDTH = 4, 24, 48  # distinct sizes, so a shape in the HLO names its axes


def _instruction_shapes(hlo_text: str) -> list[tuple[int, ...]]:
    """The output shape of every array-valued instruction in the optimised HLO."""
    return [
        tuple(int(d) for d in dims.split(",") if d) for dims in re.findall(r"= f32\[([\d,]*)\]\{[\d,]*\} \w", hlo_text)
    ]


def test_dense_mlp_weight_gradients_read_the_activation_gradients_in_place():
    """The dense SwiGLU's weight gradients are x^T @ dh over the rows. With [B, T, D] rows XLA:CPU first copied
    each [B, T, F] gradient into an F-major transpose (at the tiny preset's sizes, the slowest fusion of the
    training step); with the rows flattened to one axis the dots read the gradients where they lie."""
    mlp = MLP(TINY_DENSE, WIDTH, use_bias=False, dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mlp, nnx.Param)
    x = jax.random.normal(jax.random.key(1), (BATCH, SEQ, TINY_DENSE.hidden_size))  # [B, T, D]

    def loss(params, x):
        return jnp.sum(nnx.merge(graphdef, params)(x) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    shapes = _instruction_shapes(hlo)
    rows = BATCH * SEQ
    assert (rows, WIDTH) in shapes or (BATCH, SEQ, WIDTH) in shapes  # the gradients themselves are in the program
    transposed = [s for s in shapes if s in ((WIDTH, rows), (WIDTH, BATCH, SEQ))]
    assert not transposed, f"F-major copies of the [rows, F] activation gradients: {transposed}"


def test_blocked_gmm_lays_rows_into_tiles_with_one_gather():
    """The CPU grouped matmul pads each expert's rows to whole tiles. Built as a scatter of the rows into a
    zero-filled buffer, XLA:CPU ran a fill and an element-by-element scatter for every layout (the rows forward;
    the rows and their gradients backward); each padded slot gathering its row is one pass, and the tiny training
    step ran about 2% faster for it (forward about 4%)."""
    rows, k, n, groups = 40, 12, 10, 5
    lhs = jax.random.normal(jax.random.key(0), (rows, k))
    rhs = jax.random.normal(jax.random.key(1), (groups, k, n))
    group_sizes = jnp.asarray([9, 0, 14, 3, 10], jnp.int32)

    def row_loss(lhs):  # the weight gradient's per-expert sum is a scatter of its own; only the row layouts here
        return jnp.sum(gmm_blocked(lhs, rhs, group_sizes, tile=8) ** 2)

    for what, fn in (
        ("forward", lambda a: gmm_blocked(a, rhs, group_sizes, tile=8)),
        ("row gradient", jax.grad(row_loss)),
    ):
        hlo = jax.jit(fn).lower(lhs).compile().as_text()
        assert not re.search(r"\bscatter\(", hlo), f"the {what} scatters rows into a zero-filled tile buffer"


def test_blocked_gmm_runs_the_tiny_presets_rows_in_128_row_tiles():
    """A batch of 8 x 128 tokens routes 2048 rows to 8 experts (the embedded default's 16 x 128, 4096 rows). In 64-row
    tiles XLA:CPU ran 40 batched [64, 128] x [128, 192] matmuls well below its plain-matmul speed; in 128-row tiles
    the embedded default run took 153 s instead of 162 s, back to back. The compiled forward's tile matmul has the
    tile's shape (24 tiles of 128 rows)."""
    m, k, n, groups = 2048, 128, 192, 8
    lhs = jax.ShapeDtypeStruct((m, k), jnp.float32)
    rhs = jax.ShapeDtypeStruct((groups, k, n), jnp.float32)
    sizes = jax.ShapeDtypeStruct((groups,), jnp.int32)
    hlo = jax.jit(gmm_blocked).lower(lhs, rhs, sizes).compile().as_text()
    tile_dots = re.findall(r"= f32\[(\d+),(\d+),192\]\{[^}]*\} dot\(", hlo)
    assert tile_dots == [("24", "128")], tile_dots


def test_mtp_projection_weight_gradient_reads_the_activation_gradient_in_place():
    """The MTP depth's input projection ([2D] -> [D] over the rows) had [B, T, 2D] rows: its weight gradient
    x^T @ dy was built from a D-major transposed copy of dy, which XLA:CPU fused with the RMSNorm backward feeding
    it (3 ms of a 190 ms step of the tiny preset at batch 16). With one row axis the dot reads dy where it lies."""
    cfg = TINY_DENSE
    layer = MTPLayer(cfg, 0, ModelOptions(), dtype=jnp.float32, param_dtype=jnp.float32, rngs=nnx.Rngs(0))
    graphdef, proj, rest = nnx.split(layer, nnx.PathContains("proj"), ...)
    keys = jax.random.split(jax.random.key(1), 2)
    d = cfg.hidden_size
    h, embedded = (jax.random.normal(k, (BATCH, SEQ, d)) for k in keys)  # [B, T, D]
    positions = jnp.broadcast_to(jnp.arange(SEQ), (BATCH, SEQ))

    def loss(proj, h, embedded):  # only the projection's gradient: the block's own weight gradients are not built
        return jnp.sum(nnx.merge(graphdef, proj, rest)(h, embedded, positions, None, None) ** 2)

    hlo = jax.jit(jax.grad(loss)).lower(proj, h, embedded).compile().as_text()
    shapes = _instruction_shapes(hlo)
    rows = BATCH * SEQ
    transposed = [s for s in shapes if s in ((d, rows), (d, BATCH, SEQ))]
    assert not transposed, f"D-major copies of the [rows, D] projection-output gradient: {transposed}"
