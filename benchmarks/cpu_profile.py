"""Where ernie-jax's CPU time goes: the tiny preset's training step (or forward) under XLA's profiler, each op's
time attributed to the line of this repository that emitted it.

    python -m benchmarks.cpu_profile [--forward] [--steps 5] [--top 25] [--remat POLICY] [--[no-]scan-layers]

Prints the median wall time of a step, the op time per step summed over XLA's threads (it can exceed the wall time
when ops run side by side), the step's temporary buffer and the minor page faults per step (fresh pages touched),
and the source lines that account for most of the op time. Ops XLA made on its own, without a source location
(mostly buffer copies and zero-fills), are listed as "(no source line)".
The model is the one `cpu_vs_transformers` measures (the tiny preset without its MTP head, with the preset's remat
policy and layer scan unless --remat or --[no-]scan-layers say otherwise), in fp32, with random weights; the
training step is value, gradient and AdamW, as there.
"""

from __future__ import annotations

import argparse
import collections
import glob
import gzip
import json
import linecache
import os
import re
import resource
import shutil
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import ernie_jax
from benchmarks.peers import tiny_benchmark_model, train_step
from ernie_jax.model import with_options
from ernie_jax.options import REMAT_CHOICES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NO_SOURCE = "(no source line)"


def source_lines(hlo_text: str) -> dict[str, str]:
    """HLO instruction name -> "path:line" of the innermost frame inside this repository (NO_SOURCE if none)."""
    tables: dict[str, dict[int, str]] = {"FileNames": {}, "FileLocations": {}, "StackFrames": {}}
    section = None
    for line in hlo_text.splitlines():
        if line in tables or line == "FunctionNames":
            section = line
            continue
        if not line.strip():
            section = None
            continue
        if section in tables and (match := re.match(r"(\d+) (.*)", line)):
            tables[section][int(match.group(1))] = match.group(2)
    files = {i: name.strip('"') for i, name in tables["FileNames"].items()}
    locations = {}
    for i, text in tables["FileLocations"].items():
        file_id, line_no = re.search(r"file_name_id=(\d+).* line=(\d+)", text).groups()
        locations[i] = (files[int(file_id)], int(line_no))
    frames = {}
    for i, text in tables["StackFrames"].items():
        location, parent = re.search(r"file_location_id=(\d+) parent_frame_id=(\d+)", text).groups()
        frames[i] = (int(location), int(parent))

    def ours(frame: int) -> str:
        seen = set()
        while frame in frames and frame not in seen:  # innermost first, then its callers
            seen.add(frame)
            location, frame = frames[frame]
            path, line_no = locations[location]
            if path.startswith(ROOT) and "site-packages" not in path:
                return f"{os.path.relpath(path, ROOT)}:{line_no}"
        return NO_SOURCE

    names = {}
    for line in hlo_text.splitlines():
        if match := re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = ", line):
            frame = re.search(r"stack_frame_id=(\d+)", line)
            names.setdefault(match.group(1), ours(int(frame.group(1))) if frame else NO_SOURCE)
    return names


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--forward", action="store_true", help="profile the forward instead of the training step")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--top", type=int, default=25)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--remat", choices=REMAT_CHOICES, help="the layer scan's remat policy (default: the preset's)")
    parser.add_argument(
        "--scan-layers",
        action=argparse.BooleanOptionalAction,
        help="run the layers in a scan, or unrolled with --no-scan-layers (default: the preset's)",
    )
    args = parser.parse_args(argv)

    cfg, options = tiny_benchmark_model()
    args.remat = args.remat or options["remat"]
    args.scan_layers = options["scan_layers"] if args.scan_layers is None else args.scan_layers
    model = with_options(
        ernie_jax.ErnieForCausalLM(cfg, rngs=nnx.Rngs(0)), remat=args.remat, scan_layers=args.scan_layers
    )
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = np.random.RandomState(0).randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    inputs, targets = jnp.asarray(ids[:, :-1]), jnp.asarray(ids[:, 1:])
    optimizer = optax.adamw(1e-4)
    opt_state = optimizer.init(params)

    if args.forward:
        compiled = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x)).lower(params, rest, inputs).compile()
        run = lambda: jax.block_until_ready(compiled(params, rest, inputs))  # noqa: E731
    else:
        compiled = jax.jit(train_step(graphdef, optimizer)).lower(params, rest, opt_state, inputs, targets).compile()
        run = lambda: jax.block_until_ready(compiled(params, rest, opt_state, inputs, targets))  # noqa: E731
    lines = source_lines(compiled.as_text())

    run()
    times = []
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(max(args.steps, 3)):
        start = time.perf_counter()
        run()
        times.append(time.perf_counter() - start)
    # Fresh pages the step touched (minor faults): the per-step temporary buffer, when the allocator maps it anew.
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults_before) / len(times)
    trace_dir = tempfile.mkdtemp(prefix="ernie-cpu-profile-")
    with jax.profiler.trace(trace_dir, create_perfetto_trace=True):
        for _ in range(args.steps):
            run()
    (trace_file,) = glob.glob(os.path.join(trace_dir, "**", "*.trace.json.gz"), recursive=True)
    with gzip.open(trace_file) as f:
        events = [e for e in json.load(f)["traceEvents"] if e.get("ph") == "X" and e.get("name") in lines]
    shutil.rmtree(trace_dir, ignore_errors=True)
    per_line = collections.Counter()
    for event in events:
        per_line[lines[event["name"]]] += event["dur"] / 1e3 / args.steps  # microseconds -> ms per step
    total = sum(per_line.values())
    what = "forward" if args.forward else "training step (value, gradient, AdamW)"
    device = jax.devices()[0].device_kind
    print(
        f"tiny preset {what}, batch {args.batch} x {args.seq}, fp32, remat={args.remat}, "
        f"scan_layers={args.scan_layers}, {device}"
    )
    print(f"wall {np.median(times) * 1e3:.1f} ms per step (median); op time {total:.1f} ms per step over all threads")
    temp_mb = compiled.memory_analysis().temp_size_in_bytes / 2**20
    print(f"temporary buffer {temp_mb:.1f} MiB per step; {faults:,.0f} minor page faults per step")
    for line, ms in per_line.most_common(args.top):
        path, _, number = line.rpartition(":")
        code = linecache.getline(os.path.join(ROOT, path), int(number)).strip() if path else ""
        print(f"{ms:8.2f} ms  {100 * ms / total:5.1f}%  {line:45s} {code[:70]}")
    return {"wall_ms": float(np.median(times) * 1e3), "op_ms": total, "page_faults": faults, "lines": dict(per_line)}


if __name__ == "__main__":
    main()
