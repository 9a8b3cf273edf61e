"""Helpers shared by the kernels: tile picking, output structs and operands that work inside shard_map."""

from __future__ import annotations

import jax


def round_up(x: int, multiple: int) -> int:
    return -(-x // multiple) * multiple


def pick_tile(dim: int, preferred: int, candidates=(512, 256, 128)) -> int:
    """Largest candidate <= preferred that divides dim; the full dim when none does (a full-extent block is
    always a legal Mosaic block, and small test shapes take this branch)."""
    for c in candidates:
        if c <= preferred and dim % c == 0:
            return c
    return dim


def out_struct(shape, dtype, *operands) -> jax.ShapeDtypeStruct:
    """ShapeDtypeStruct for a pallas_call output.

    Inside `shard_map(check_vma=True)` pallas_call needs to know over which manual mesh axes the output varies:
    the union of the operands' varying axes. Outside shard_map the set is empty and harmless.
    """
    mats = [jax.typeof(x).mat for x in operands]
    varying = frozenset().union(*(m.varying for m in mats))
    mat = type(mats[0])(varying=varying, unreduced=frozenset(), reduced=frozenset())
    return jax.ShapeDtypeStruct(tuple(shape), dtype, manual_axis_type=mat)


def match_vma(*xs):
    """Mark every operand as varying over the union of the operands' manual axes (a no-op outside shard_map).

    pallas_call requires its operands to agree; a replicated weight next to sharded tokens would not.
    """
    varying = frozenset().union(*(jax.typeof(x).mat.varying for x in xs))
    if not varying:
        return xs
    out = []
    for x in xs:
        missing = tuple(sorted(varying - jax.typeof(x).mat.varying))
        out.append(jax.lax.pcast(x, missing, to="varying") if missing else x)
    return tuple(out)
