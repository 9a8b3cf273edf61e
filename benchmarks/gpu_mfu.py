"""Measured MFU of the trainer's step on this machine's first device, against the roofline estimate of the same
compiled program for that chip: the check of the AOT report's roofline model against hardware.

    python -m benchmarks.gpu_mfu                        # a3b_gpu, 4 layers at full width, on one GPU
    python -m benchmarks.gpu_mfu --layers 2 --batch 2   # the same with less memory
    python -m benchmarks.gpu_mfu --config tiny --batch 8 --seq 128 --steps 5   # anywhere (on CPU: the harness)

The step is the trainer's own (`jit_train_step`: forward, backward, optimizer, the preset's remat and kernels) on a
one-device mesh, fed a random batch of the schema's arrays. Depth is reduced (`--layers`; the first layer stays
dense as in the preset) so that one GPU holds it; width, experts and sequence length are the preset's. Further
`key=value` overrides are the trainer's (e.g. `remat=full`). Prints, and returns as a dict:
- the median step time over `--steps` steps after a warm-up step that compiles;
- MFU = model FLOPs / (step time x the chip's bf16 peak), as the trainer logs it;
- the roofline step time of the compiled program (`ernie_jax.tools.hlo_stats`: each op at max(FLOPs / peak,
  bytes / HBM bandwidth)), its MFU, and measured over roofline time;
- the compiled program's FLOPs over the model's (Pallas kernels count only where hlo_stats knows their cost), and
  XLA's own count beside it, with a note when the two differ by more than 10%.
On a device missing from `ernie_jax.chips` (a CPU) the peak is a measured matmul and the bandwidth a measured copy.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import jax.numpy as jnp
import numpy as np

import sharding
from ernie_jax.chips import chip_for_device_kind
from ernie_jax.tools.hlo_stats import Module, op_times
from ernie_jax.training.config import ConfigError, apply_overrides, load_preset
from ernie_jax.training.metrics import measured_copy_bytes_per_s, model_flops_per_token, peak_flops_per_device
from ernie_jax.training.state import batch_shapes, batch_shardings, build_train_state, jit_train_step


def random_batch(cfg, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """One global batch of the text schema: random tokens, one document per row, every target learned."""
    out = {}
    for key, (shape, dtype) in batch_shapes(cfg).items():
        if key in ("input_ids", "targets"):
            out[key] = rng.integers(0, cfg.model.vocab_size, shape, dtype=np.int64).astype(dtype)
        elif key == "positions":
            out[key] = np.broadcast_to(np.arange(shape[1], dtype=dtype), shape).copy()
        else:  # segment_ids, loss_mask
            out[key] = np.ones(shape, dtype)
    return out


def roofline_figures(hlo_text: str, cost: dict, model_flops: float, peak: float, bandwidth: float, step_s: float):
    """The roofline part of the report for one compiled program (hlo_stats on its HLO text)."""
    module = Module(hlo_text)
    ops = op_times(module, peak, bandwidth)
    roofline_s = sum(op.seconds for op in ops)
    return {
        "compiled_over_model_flops": module.flops() / model_flops,
        # XLA's own count visits a loop body once; hlo_stats weights it by its trip count but reads no cuBLAS call.
        "xla_cost_analysis_over_model_flops": float(cost.get("flops", float("nan"))) / model_flops,
        "roofline_s": roofline_s,
        "roofline_mfu": model_flops / (roofline_s * peak),
        "measured_over_roofline": step_s / roofline_s,
        "top_ops": [(op.kind, op.shape, op.seconds, op.bound) for op in ops[:8]],
    }


def measure(cfg, steps: int, dump_hlo: str | None = None) -> dict:
    """Run cfg's train step on the first device `steps` times after a warm-up; the report as a dict. dump_hlo: a
    file for the compiled program's HLO text, written before anything runs."""
    device = jax.devices()[0]
    mesh = sharding.make_mesh(data=1, fsdp=1, expert=1, tensor=1, devices=[device])
    state = build_train_state(cfg, mesh)
    step_fn = jit_train_step(cfg, state, mesh)
    shardings = batch_shardings(cfg, mesh)
    batch = {k: jax.device_put(v, shardings[k]) for k, v in random_batch(cfg, np.random.default_rng(0)).items()}
    params, biases, opt_state = state.params, state.biases, state.opt_state
    with sharding.use_mesh(mesh):
        compiled = step_fn.lower(params, biases, opt_state, batch, jnp.int32(0)).compile()
        hlo_text = compiled.as_text()
        if dump_hlo:
            with open(dump_hlo, "w") as f:
                f.write(hlo_text)
        params, biases, opt_state, metrics = compiled(params, biases, opt_state, batch, jnp.int32(0))
        jax.block_until_ready(params)
        times = []
        for i in range(steps):
            start = time.perf_counter()
            params, biases, opt_state, metrics = compiled(params, biases, opt_state, batch, jnp.int32(i + 1))
            jax.block_until_ready((params, metrics))
            times.append(time.perf_counter() - start)
    step_s = float(np.median(times))

    known = chip_for_device_kind(device.device_kind)
    if known is not None:
        chip_name, chip = known
        peak, bandwidth, hbm = chip.peak_bf16_flops, chip.hbm_bytes_per_s, chip.hbm_bytes
        source = f"{chip_name} datasheet (bf16 peak, HBM bandwidth)"
    else:
        peak, how = peak_flops_per_device(jnp.dtype(cfg.dtype))
        bandwidth, hbm = measured_copy_bytes_per_s(), float("nan")
        source = f"{how}; measured copy bandwidth"
    tokens = cfg.data.global_batch_size * cfg.data.seq_len
    model_flops = tokens * model_flops_per_token(cfg.model, cfg.data.seq_len, mtp_depth=cfg.mtp.depth)
    cost = compiled.cost_analysis()
    cost = (cost[0] if cost else {}) if isinstance(cost, list | tuple) else (cost or {})
    try:  # hlo_stats was built on TPU and CPU programs: a program it cannot read keeps the measured figures
        roofline = roofline_figures(hlo_text, cost, model_flops, peak, bandwidth, step_s)
    except Exception as e:  # noqa: BLE001 - reported in the output, next to the measurement
        roofline = {"roofline_error": f"{type(e).__name__}: {e}"}
    mem = compiled.memory_analysis()
    peak_bytes = mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
    peak_bytes += mem.temp_size_in_bytes
    return {
        "config": cfg.name,
        "device_kind": device.device_kind,
        "figures_from": source,
        "layers": cfg.model.num_hidden_layers,
        "batch": cfg.data.global_batch_size,
        "seq_len": cfg.data.seq_len,
        "dtype": cfg.dtype,
        "remat": cfg.remat,
        "final_loss": float(metrics["loss"]),
        "step_s": step_s,
        "step_s_all": times,
        "tokens_per_s": tokens / step_s,
        "model_flops": model_flops,
        "peak_flops": peak,
        "hbm_bytes_per_s": bandwidth,
        "mfu": model_flops / (step_s * peak),
        "memory_bytes": peak_bytes,
        "hbm_bytes": hbm,
        **roofline,
    }


def format_report(r: dict) -> str:
    lines = [
        f"{r['config']}: {r['layers']} layers, batch {r['batch']} x {r['seq_len']}, {r['dtype']}, remat "
        f"{r['remat']}, on {r['device_kind']} ({r['figures_from']})",
        f"measured step {r['step_s'] * 1e3:,.1f} ms (median of {len(r['step_s_all'])}), "
        f"{r['tokens_per_s']:,.0f} tokens/s, MFU {r['mfu']:.1%}; loss {r['final_loss']:.4f}",
        f"memory {r['memory_bytes'] / 1e9:.2f} GB"
        + (f" of {r['hbm_bytes'] / 1e9:.1f} GB" if np.isfinite(r["hbm_bytes"]) else " (no datasheet capacity)"),
    ]
    if "roofline_error" in r:
        lines.append(f"roofline: not computed, hlo_stats could not read this program ({r['roofline_error']})")
        return "\n".join(lines)
    lines.append(
        f"roofline step {r['roofline_s'] * 1e3:,.1f} ms, MFU {r['roofline_mfu']:.1%}; measured / roofline "
        f"{r['measured_over_roofline']:.2f}; compiled / model FLOPs {r['compiled_over_model_flops']:.2f}"
    )
    ours, xla = r["compiled_over_model_flops"], r["xla_cost_analysis_over_model_flops"]
    if not abs(ours - xla) <= 0.1 * xla:
        lines.append(
            f"note: XLA's cost analysis counts {xla:.2f} x the model's FLOPs where the roofline counts {ours:.2f} "
            "(XLA visits a loop body once; the roofline reads no cuBLAS call): compare before trusting the roofline"
        )
    lines.append("roofline's slowest ops:")
    lines += [f"  {s * 1e3:9.3f} ms  {kind:12s} {bound:7s} {shape}" for kind, shape, s, bound in r["top_ops"]]
    return "\n".join(lines)


def benchmark_config(name: str, layers: int, batch: int, seq: int | None, overrides: list[str]):
    """The preset `name` cut to `layers` decoder layers (MoE from the preset's first MoE layer to the last) and
    `batch` sequences of `seq` tokens on one device, then the user's `key=value` overrides."""
    preset = load_preset(name)
    if preset.data.format != "text":
        raise ConfigError(f"--config {name} trains on data.format={preset.data.format}; this benchmark feeds text")
    ours = [f"model.num_hidden_layers={layers}", "model.moe_layer_end_index=-1"]
    ours += [f"data.global_batch_size={batch}", "min_devices=1"]
    ours += ["mesh.data=1", "mesh.fsdp=1", "mesh.expert=1", "mesh.tensor=1", "mesh.dcn=1"]
    if seq is not None:
        ours.append(f"data.seq_len={seq}")
    return apply_overrides(preset, ours + overrides)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="a3b_gpu")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers kept (the first stays dense)")
    parser.add_argument("--batch", type=int, default=4, help="sequences per step")
    parser.add_argument("--seq", type=int, default=None, help="tokens per sequence (default: the preset's)")
    parser.add_argument("--steps", type=int, default=10, help="timed steps after the warm-up")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--dump-hlo", metavar="FILE", help="also write the compiled program's HLO text here")
    args, overrides = parser.parse_known_args(argv)
    unknown = [o for o in overrides if o.startswith("-")]
    if unknown:
        parser.error(f"unknown option(s) {unknown}")
    try:
        cfg = benchmark_config(args.config, args.layers, args.batch, args.seq, overrides)
    except ConfigError as e:
        parser.exit(2, f"error: {e}\n")
    backend = jax.default_backend()
    if cfg.platform not in ("any", backend):
        parser.exit(
            2,
            f"error: --config {args.config} runs {cfg.platform} kernels (platform={cfg.platform}); this host has "
            f"{backend} devices: run it on a {cfg.platform.upper()}, or check the harness here with --config tiny\n",
        )
    report = measure(cfg, args.steps, dump_hlo=args.dump_hlo)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return report


if __name__ == "__main__":
    main()
