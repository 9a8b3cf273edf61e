"""Prove pod readiness from a CPU host: AOT-compile the trainer's own step for a TPU topology through libtpu.

    python -m ernie_jax.aot --config=a3b_tpu --topology=v5p-64 [--json] [key=value ...]

Nothing is allocated: parameters, biases and optimizer state are `ShapeDtypeStruct`s carrying the trainer's
shardings, the batch is the preset's global batch. The report gives bytes per chip against the chip's HBM,
compile time, compiled vs model FLOPs, a step-time estimate and the MFU it implies, and the collectives per step.

FLOPs, step time and collectives come from `ernie_jax.tools.hlo_stats`, which weights every loop body of the
compiled HLO by its trip count: XLA's `cost_analysis()` visits the layer scan's body once, and libtpu's own cost
model returns a negative `optimal_seconds` for this module (it is printed anyway). The step time is a roofline
model (per op max(FLOPs / peak, bytes / HBM bandwidth), plus collective bytes over one ICI link), given with
communication overlapped and serial: an estimate to compare configurations, not a measurement.

Topology names (Cloud TPU naming): v4-N and v5p-N count TensorCores (2 per chip, so v5p-64 = 32 chips = 2x4x4);
v5e-N / v5litepod-N and v6e-N count chips (v6e-64 = 8x8). A raw libtpu name such as "v5p:2x4x4" also works.
When the preset's mesh does not have as many devices as the topology has chips, mesh.fsdp becomes -1 (the rest).
"""

from __future__ import annotations

import os

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import sharding  # noqa: E402
from ernie_jax.chips import CHIPS  # noqa: E402
from ernie_jax.config import ConfigError  # noqa: E402
from ernie_jax.tools.aot_decode import decode_report, default_decode_mesh, format_decode_report  # noqa: E402
from ernie_jax.tools.hlo_stats import Module, op_times, roofline_seconds, seconds_by_kind  # noqa: E402
from ernie_jax.training.config import TrainConfig, apply_overrides, load_preset  # noqa: E402
from ernie_jax.training.metrics import model_flops_per_token  # noqa: E402
from ernie_jax.training.state import abstract_batch, build_train_state, jit_train_step  # noqa: E402
from sharding.mesh import FSDP, MeshError  # noqa: E402
from sharding.rules import ShardingError  # noqa: E402

TOP_OPS = 12  # ops listed by roofline time in the report
TPU_GENERATIONS = ("v4", "v5p", "v5e", "v6e")  # keys of ernie_jax.chips.CHIPS, also libtpu's names
SHAPES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8",
             512: "8x8x8", 1024: "8x8x16", 2048: "8x16x16", 4096: "16x16x16"}  # fmt: skip
SHAPES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}


def resolve_topology(name: str) -> tuple[str, str, int]:
    """(generation, libtpu topology name, chips) for "v5p-64" (Cloud naming) or "v5p:2x4x4" (libtpu naming)."""
    if ":" in name:
        gen, shape = name.split(":", 1)
        gen = "v5e" if gen in ("v5e", "v5litepod") else gen
        if gen not in TPU_GENERATIONS:
            raise SystemExit(f"--topology: unknown generation {gen!r}; one of {', '.join(TPU_GENERATIONS)}")
        return gen, f"{gen}:{shape}", math.prod(int(x) for x in shape.split("x"))
    m = re.fullmatch(r"(v4|v5p|v5e|v5litepod|v6e)-(\d+)", name)
    if not m:
        raise SystemExit(f"--topology: expected e.g. v5p-64, v4-32, v6e-64 or v5p:2x4x4, got {name!r}")
    gen = "v5e" if m.group(1) == "v5litepod" else m.group(1)
    chips, rem = divmod(int(m.group(2)), CHIPS[gen].cores_per_chip)
    shapes = SHAPES_3D if gen in ("v4", "v5p") else SHAPES_2D
    if rem or chips not in shapes:
        raise SystemExit(f"--topology: {name} is not a slice size this tool knows; pass a libtpu name like v5p:2x4x4")
    return gen, f"{gen}:{shapes[chips]}", chips


def topology_devices(libtpu_name: str):
    from jax.experimental import topologies

    return topologies.get_topology_desc(platform="tpu", topology_name=libtpu_name).devices


def fit_mesh(cfg: TrainConfig, chips: int) -> tuple[dict[str, int], str | None]:
    sizes = dict(cfg.mesh.sizes)
    if -1 in sizes.values() or math.prod(sizes.values()) == chips:
        return sizes, None
    note = f"preset mesh {sizes} has {math.prod(sizes.values())} devices, the topology {chips} chips: mesh.{FSDP}=-1"
    sizes[FSDP] = -1
    return sizes, note


def _tree_bytes_per_chip(tree) -> int:
    total = 0
    for x in jax.tree.leaves(tree):
        shard = x.sharding.shard_shape(x.shape)
        total += math.prod(shard) * jnp.dtype(x.dtype).itemsize
    return total


def _cost(compiled) -> dict:
    cost = compiled.cost_analysis()
    if isinstance(cost, list | tuple):
        cost = cost[0] if cost else {}
    return dict(cost or {})


def compile_report(cfg: TrainConfig, topology: str, dump_hlo: str | None = None) -> dict:
    """AOT-compile cfg's train step for `topology` and return the report as a dict."""
    gen, libtpu_name, chips = resolve_topology(topology)
    devices = topology_devices(libtpu_name)
    if len(devices) != chips:
        raise SystemExit(f"--topology: libtpu gave {len(devices)} devices for {libtpu_name}, expected {chips}")
    sizes, mesh_note = fit_mesh(cfg, chips)
    mesh = sharding.make_mesh(**sizes, devices=devices)
    replicated = sharding.replicated(mesh)

    # The trainer's own state builder, abstract: ShapeDtypeStructs on the trainer's shardings, kernels for the TPU.
    state = build_train_state(cfg, mesh, abstract=True, platform="tpu")
    a_params, a_biases, a_opt = state.params, state.biases, state.opt_state
    a_batch = abstract_batch(cfg, mesh)
    a_step = jax.ShapeDtypeStruct((), jnp.int32, sharding=replicated)
    step_fn = jit_train_step(cfg, state, mesh)

    started = time.perf_counter()
    with sharding.use_mesh(mesh):
        lowered = step_fn.lower(a_params, a_biases, a_opt, a_batch, a_step)
    lower_s = time.perf_counter() - started
    header = {
        "config": cfg.name,
        "topology": topology,
        "libtpu_topology": libtpu_name,
        "device_kind": devices[0].device_kind,
        "chips": chips,
        "mesh": dict(mesh.shape),
        "mesh_note": mesh_note,
        "moe_transport": cfg.mesh.moe_transport,
        "moe_buffer_factor": cfg.mesh.moe_buffer_factor,
        "batch_shards": cfg.data.global_batch_size
        // a_batch["input_ids"].sharding.shard_shape(a_batch["input_ids"].shape)[0],
        "grad_accum": cfg.optim.grad_accum,
        "loss_chunk": cfg.loss_chunk,
        "remat": cfg.remat,
        "layers": cfg.model.num_hidden_layers,
        "global_batch": cfg.data.global_batch_size,
        "seq_len": cfg.data.seq_len,
        "params": cfg.model.num_params(),
        "active_params": cfg.model.num_active_params(),
        "lower_s": lower_s,
    }
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as e:
        if "RESOURCE_EXHAUSTED" not in str(e):
            raise
        # libtpu refuses a program whose temporaries exceed HBM: report it like any other "does not fit".
        return {**header, "fits": False, "hbm_bytes": CHIPS[gen].hbm_bytes, "compile_error": str(e).strip()}
    compile_s = time.perf_counter() - started - lower_s

    mem = compiled.memory_analysis()
    chip = CHIPS[gen]
    hbm = chip.hbm_bytes
    peak_bytes = (
        mem.argument_size_in_bytes
        + mem.output_size_in_bytes
        - mem.alias_size_in_bytes
        + mem.temp_size_in_bytes
        + mem.generated_code_size_in_bytes
    )
    cost = _cost(compiled)
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    per_token = model_flops_per_token(
        cfg.model, cfg.data.seq_len, mtp_depth=cfg.mtp.depth, vision_patches=cfg.data.vision_patches
    )
    model_flops = per_token * tokens
    peak_flops = chip.peak_bf16_flops
    xla_optimal_s = cost.get("optimal_seconds")
    hlo_text = compiled.as_text()
    if dump_hlo:
        with open(dump_hlo, "w") as f:
            f.write(hlo_text)
    module = Module(hlo_text)  # every loop body weighted by its trip count (cost_analysis visits it once)
    compiled_flops = module.flops()  # of the SPMD-partitioned module: per chip
    roofline = roofline_seconds(module, peak_flops, chip.hbm_bytes_per_s, chip.ici_bytes_per_s)
    ops = op_times(module, peak_flops, chip.hbm_bytes_per_s)
    model_per_chip = model_flops / chips
    return {
        **header,
        "compile_s": compile_s,
        "bytes_per_chip": {
            "params": _tree_bytes_per_chip(a_params),
            "biases": _tree_bytes_per_chip(a_biases),
            "opt_state": _tree_bytes_per_chip(a_opt),
            "batch": _tree_bytes_per_chip(a_batch),
            "arguments": mem.argument_size_in_bytes,
            "outputs": mem.output_size_in_bytes,
            "aliased": mem.alias_size_in_bytes,
            "temporaries": mem.temp_size_in_bytes,
            "generated_code": mem.generated_code_size_in_bytes,
            "peak_estimate": peak_bytes,
        },
        "hbm_bytes": hbm,
        "fits": peak_bytes <= hbm,
        "compiled_flops_per_chip": compiled_flops,
        "kernel_flops_per_chip": module.flops_by_kernel(),
        "xla_cost_analysis_flops_per_chip": float(cost.get("flops", float("nan"))),  # loop bodies counted once
        "model_flops": model_flops,
        "model_flops_per_chip": model_per_chip,
        "compiled_over_model": compiled_flops * chips / model_flops,
        "peak_flops_per_chip": peak_flops,
        "xla_optimal_seconds": float(xla_optimal_s) if xla_optimal_s is not None else None,
        "roofline": roofline,
        "roofline_by_kind_s": seconds_by_kind(ops),  # compute+HBM time by op kind; collectives are apart
        "top_ops": [dataclasses.asdict(op) for op in ops[:TOP_OPS]],
        "roofline_mfu": {
            "overlapped": model_per_chip / (roofline["overlapped_s"] * peak_flops),
            "serial": model_per_chip / (roofline["serial_s"] * peak_flops),
        },
        "loops": {"trip_counts": sorted(set(module.trip_counts.values())), "unknown": module.unknown_trip_counts},
        "collectives": module.collectives(),
    }


def _gb(x: float) -> str:
    return f"{x / 1e9:7.2f} GB"


def fit_hints(r: dict) -> str:
    hints = []
    more = 2 * r["grad_accum"]
    if r["global_batch"] % more == 0 and (r["global_batch"] // more) % r["batch_shards"] == 0:
        hints.append(f"optim.grad_accum={more} (smaller micro-batches; the global batch is unchanged)")
    if not r["loss_chunk"]:
        hints.append("loss_chunk=1024 (LM-head logits one chunk at a time)")
    if r["moe_transport"] == "ragged_a2a" and not r["moe_buffer_factor"]:
        hints.append("mesh.moe_buffer_factor=2 (expert-parallel buffers of 2 balanced shares, not the worst case)")
    hints.append("a larger slice (more fsdp)")
    return "to fit: " + ", ".join(hints)


def format_report(r: dict) -> str:
    lines = [
        f"{r['config']} on {r['topology']} ({r['libtpu_topology']}, {r['chips']} x {r['device_kind']}), "
        f"mesh {r['mesh']}, moe {r['moe_transport']} (buffer factor {r['moe_buffer_factor'] or 'worst case'}), "
        f"remat {r['remat']}, grad_accum {r['grad_accum']}, loss_chunk {r['loss_chunk']}",
    ]
    if r["mesh_note"]:
        lines.append(f"  note: {r['mesh_note']}")
    if "compile_error" in r:
        reason = r["compile_error"].splitlines()[-1]
        return "\n".join([*lines, f"  DOES NOT FIT: libtpu refused the program: {reason}", f"  {fit_hints(r)}"])
    b = r["bytes_per_chip"]
    lines += [
        f"  model: {r['params'] / 1e9:.1f}B params ({r['active_params'] / 1e9:.2f}B active), {r['layers']} layers; "
        f"global batch {r['global_batch']} x {r['seq_len']} tokens",
        f"  compile: lower {r['lower_s']:.1f} s + compile {r['compile_s']:.1f} s",
        "  bytes per chip:",
        f"    params            {_gb(b['params'])}  (fp32 masters; a LoRA base in lora.base_dtype)",
        f"    optimizer state   {_gb(b['opt_state'])}",
        f"    biases + batch    {_gb(b['biases'] + b['batch'])}",
        f"    arguments         {_gb(b['arguments'])}  (outputs {_gb(b['outputs'])}, aliased {_gb(b['aliased'])})",
        f"    temporaries       {_gb(b['temporaries'])}",
        f"    peak estimate     {_gb(b['peak_estimate'])}  of {_gb(r['hbm_bytes'])} HBM "
        f"({b['peak_estimate'] / r['hbm_bytes']:.0%}): {'fits' if r['fits'] else 'DOES NOT FIT; ' + fit_hints(r)}",
        f"  FLOPs per step per chip: compiled {r['compiled_flops_per_chip']:.3e} (HLO matmuls and kernel estimates, "
        f"loop bodies x trip count) vs model {r['model_flops_per_chip']:.3e}: ratio {r['compiled_over_model']:.2f}",
        "    of which Pallas kernels: "
        + ", ".join(f"{k} {v:.2e}" for k, v in r["kernel_flops_per_chip"].items() if k != "xla")
        + f"; XLA cost_analysis() alone: {r['xla_cost_analysis_flops_per_chip']:.3e} (loop bodies once)",
    ]
    rf, mfu = r["roofline"], r["roofline_mfu"]
    optimal = r["xla_optimal_seconds"]
    lines += [
        f"  step time (roofline model from the HLO): compute+HBM {rf['compute_s'] * 1e3:.0f} ms, ICI "
        f"{rf['collective_s'] * 1e3:.0f} ms -> {rf['overlapped_s'] * 1e3:.0f} ms overlapped / "
        f"{rf['serial_s'] * 1e3:.0f} ms serial: MFU {mfu['overlapped']:.1%} / {mfu['serial']:.1%} of "
        f"{r['peak_flops_per_chip'] / 1e12:.0f} TFLOP/s",
        "  XLA cost model: "
        + (
            f"optimal_seconds {optimal:.3g} (no usable estimate for this module)"
            if optimal is None or optimal <= 0
            else f"optimal_seconds {optimal:.3g} (loop bodies once)"
        ),
        "  collectives per step (loop bodies x trip count; result bytes per chip):",
    ]
    for name, c in r["collectives"].items():
        if c["count"]:
            lines.append(f"    {name:18s} {c['count']:5d}  {c['bytes'] / 2**30:9.2f} GiB")
    lines.append("  compute+HBM time by op kind: " + ", ".join(
        f"{kind} {s * 1e3:.0f} ms ({s / rf['compute_s']:.0%})" for kind, s in r["roofline_by_kind_s"].items()
        if s >= 0.005 * rf["compute_s"]
    ))  # fmt: skip
    lines.append(f"  top {len(r['top_ops'])} ops by roofline time (per step, loop bodies x trip count):")
    lines.append(f"    {'ms':>7s} {'share':>6s} {'kind':22s} {'runs':>5s} {'GFLOP':>9s} {'GB':>8s}  bound    shape")
    for op in r["top_ops"]:
        lines.append(
            f"    {op['seconds'] * 1e3:7.1f} {op['seconds'] / rf['compute_s']:6.1%} {op['kind'][:22]:22s} "
            f"{op['runs']:5d} {op['flops'] / 1e9:9.1f} {op['bytes'] / 1e9:8.2f}  {op['bound']:7s}  "
            f"{op['shape'][:60]}"
        )
    if r["loops"]["unknown"]:
        lines.append(f"  note: trip counts unknown for {r['loops']['unknown']}: counted once")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m ernie_jax.aot",
        description="AOT-compile the train step for a TPU topology on this host; overrides are key=value.",
    )
    parser.add_argument("--config", default="a3b_tpu")
    parser.add_argument("--topology", default="v5p-64", help="v5p-64, v4-32, v6e-64, v5e-16, or v5p:2x4x4")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--dump-hlo", metavar="FILE", help="also write the compiled (partitioned) HLO text here")
    parser.add_argument("--decode", action="store_true", help="compile one KV-cache decode step instead")
    parser.add_argument("--batch", type=int, default=64, help="--decode: rows decoded together")
    parser.add_argument("--cache", type=int, default=4096, help="--decode: KV cache slots per row")
    parser.add_argument("--mesh", default="", help="--decode: e.g. expert=4 or data=2,expert=4 (default: experts)")
    parser.add_argument(
        "--quantize", choices=("int8", "nf4"), help="--decode: weights stored quantized (ernie_jax.quant)"
    )
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unknown option(s) {unknown}")
    # The preset's platform/min_devices describe where it trains, not this host: AOT ignores them.
    try:
        cfg = apply_overrides(load_preset(args.config), overrides)
        if args.decode:
            return decode_main(cfg, args)
        report = compile_report(cfg, args.topology, dump_hlo=args.dump_hlo)
    except (ConfigError, MeshError, ShardingError) as e:  # a config or mesh that cannot work here: say why, no trace
        parser.exit(2, f"error: {e}\n")
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0 if report["fits"] else 1


def decode_main(cfg: TrainConfig, args) -> int:
    gen, libtpu_name, chips = resolve_topology(args.topology)
    try:
        sizes = dict(part.split("=") for part in args.mesh.split(",") if part) if args.mesh else None
        sizes = {k: int(v) for k, v in sizes.items()} if sizes else default_decode_mesh(cfg.model, chips)
    except ValueError:
        raise ConfigError(
            f"--mesh: expected axis=size pairs like expert=4 or data=2,expert=4, got {args.mesh!r}"
        ) from None
    report = decode_report(
        cfg.model,
        topology_devices(libtpu_name),
        gen,
        batch=args.batch,
        cache=args.cache,
        mesh_sizes=sizes,
        quantize=args.quantize,
    )
    print(json.dumps(report, indent=2) if args.json else format_decode_report(cfg.name, args.topology, report))
    return 0 if report["fits"] else 1
