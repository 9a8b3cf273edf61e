"""Decode readiness from a CPU host: AOT-compile one KV-cache decode step of a preset's model for a TPU slice.

    python -m ernie_jax.aot --decode --config=a3b_tpu --topology=v5p-8 [--batch 64] [--cache 4096] [--mesh expert=4]

The step is what `ernie_jax.generate` runs per token: one token per row through every layer against a KV cache of
`--cache` slots, the LM head and the next-token choice, with the cache donated. Weights are bf16 (routers fp32), or
int8/nf4 for the decoder's matmuls with `quantize=` (dequantised per layer inside the scan), sharded by the rules
table over the mesh; nothing is allocated. The report gives HBM per chip (weights, cache, temporaries) and the
HBM-bandwidth bound: a decode step must read every weight and the whole cache once, so tokens/s per chip can be at
most (rows per chip) / ((weight bytes + cache bytes per chip) / HBM bandwidth). The compiled step's own roofline time
(`ernie_jax.tools.hlo_stats`) shows how close the program is to that bound.
"""

from __future__ import annotations

import math
import time

import jax
import jax.numpy as jnp
from flax import nnx

import sharding
from ernie_jax import quant
from ernie_jax.chips import CHIPS
from ernie_jax.config import ConfigError, ErnieConfig
from ernie_jax.model import ErnieForCausalLM
from ernie_jax.options import ModelOptions
from ernie_jax.tools.hlo_stats import Module, roofline_seconds

CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")


def tree_bytes_per_chip(tree) -> int:
    """Bytes one chip holds of a tree of ShapeDtypeStructs carrying shardings."""
    return sum(math.prod(x.sharding.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def default_decode_mesh(model: ErnieConfig, chips: int) -> dict[str, int]:
    """Experts over every chip when they divide (weights are read, not gathered: no FSDP at decode), else data."""
    if model.is_moe and model.moe_num_experts % chips == 0:
        return {sharding.mesh.DATA: 1, sharding.mesh.EXPERT: chips}
    return {sharding.mesh.DATA: chips}


def decode_report(
    model_cfg: ErnieConfig, devices, gen: str, *, batch: int, cache: int, mesh_sizes: dict, quantize: str | None = None
) -> dict:
    """Compile one decode step for `devices` (a TPU topology's) and return the report as a dict.

    quantize: "int8" or "nf4": the decoder's matmul weights stored quantized (`ernie_jax.quant`), as
    `from_pretrained(..., quantize=...)` loads them; None: bf16."""
    chips = len(devices)
    mesh = sharding.make_mesh(**mesh_sizes, devices=devices)
    # Kernels traced for the TPU (compiled Mosaic, not interpreted); the MoE runs expert-parallel with allgather.
    options = ModelOptions(platform="tpu")

    def create():
        model = ErnieForCausalLM(
            model_cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16, options=options
        )
        return model if quantize is None else quant.quantize(model, quantize)

    graphdef, state = nnx.split(nnx.eval_shape(create))
    state_sh = sharding.state_shardings(state, mesh)
    a_state = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), state, state_sh)

    abstract_model = nnx.merge(graphdef, state)
    cache_shape = jax.eval_shape(lambda: abstract_model.init_cache(batch, cache))
    cache_sh = jax.tree.map(
        lambda x: sharding.named_sharding(CACHE_AXES if x.ndim == 5 else (None,) * x.ndim, mesh, shape=x.shape),
        cache_shape,
    )
    a_cache = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), cache_shape, cache_sh)
    rows_sh = sharding.named_sharding(("batch",), mesh, shape=(batch,))
    if batch % rows_sh.shard_shape((batch,))[0]:
        raise ConfigError(f"--batch: {batch} rows do not divide over the mesh's batch shards ({dict(mesh.shape)})")
    a_rows = jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=rows_sh)

    def decode_step(state, cache, tokens, positions):
        model = nnx.merge(graphdef, state)
        h, cache = model.forward_cached(tokens[:, None], positions[:, None], cache)  # [B, 1, D]
        logits = model.logits_from_hidden(h)[:, -1]  # [B, V]
        return jnp.argmax(logits, axis=-1).astype(jnp.int32), cache

    step = jax.jit(
        decode_step,
        donate_argnums=(1,),
        in_shardings=(state_sh, cache_sh, rows_sh, rows_sh),
        out_shardings=(rows_sh, cache_sh),
    )
    started = time.perf_counter()
    with sharding.use_mesh(mesh):
        lowered = step.lower(a_state, a_cache, a_rows, a_rows)
        compiled = lowered.compile()
    compile_s = time.perf_counter() - started

    chip = CHIPS[gen]
    mem = compiled.memory_analysis()
    weights, kv = tree_bytes_per_chip(a_state), tree_bytes_per_chip(a_cache)
    peak = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    rows_per_chip = batch / chips
    bound_s = (weights + kv) / chip.hbm_bytes_per_s
    roofline = roofline_seconds(
        Module(compiled.as_text()), chip.peak_bf16_flops, chip.hbm_bytes_per_s, chip.ici_bytes_per_s
    )
    return {
        "chips": chips,
        "device_kind": devices[0].device_kind,
        "mesh": dict(mesh.shape),
        "batch": batch,
        "cache": cache,
        "weights_dtype": quantize or "bf16",
        "params": model_cfg.num_params(),
        "compile_s": compile_s,
        "bytes_per_chip": {"weights": weights, "kv_cache": kv, "temporaries": mem.temp_size_in_bytes, "peak": peak},
        "hbm_bytes": chip.hbm_bytes,
        "fits": peak <= chip.hbm_bytes,
        "hbm_bound_step_s": bound_s,
        "hbm_bound_tokens_per_s_per_chip": rows_per_chip / bound_s,
        "roofline": roofline,
        "roofline_tokens_per_s_per_chip": rows_per_chip / roofline["overlapped_s"],
    }


def format_decode_report(name: str, topology: str, r: dict) -> str:
    b, gb = r["bytes_per_chip"], (lambda x: f"{x / 1e9:7.2f} GB")
    rf = r["roofline"]
    return "\n".join(
        [
            f"{name} decode on {topology} ({r['chips']} x {r['device_kind']}), mesh {r['mesh']}, batch {r['batch']}, "
            f"KV cache {r['cache']} slots, {r.get('weights_dtype', 'bf16')} weights ({r['params'] / 1e9:.1f}B params); "
            f"compile {r['compile_s']:.1f} s",
            "  bytes per chip:",
            f"    weights          {gb(b['weights'])}",
            f"    KV cache         {gb(b['kv_cache'])}",
            f"    temporaries      {gb(b['temporaries'])}",
            f"    peak estimate    {gb(b['peak'])}  of {gb(r['hbm_bytes'])} HBM ({b['peak'] / r['hbm_bytes']:.0%}): "
            + ("fits" if r["fits"] else "DOES NOT FIT: more chips, a smaller batch or cache"),
            f"  HBM-bandwidth bound (every weight and the whole cache read once per step): "
            f"{r['hbm_bound_step_s'] * 1e3:.2f} ms/step, {r['hbm_bound_tokens_per_s_per_chip']:,.0f} tokens/s per chip",
            f"  compiled step, roofline model: compute+HBM {rf['compute_s'] * 1e3:.2f} ms, "
            f"ICI {rf['collective_s'] * 1e3:.2f} ms -> {r['roofline_tokens_per_s_per_chip']:,.0f} tokens/s per chip "
            f"({r['hbm_bound_step_s'] / rf['overlapped_s']:.0%} of the bound)",
        ]
    )
