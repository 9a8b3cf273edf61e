"""Pod readiness side by side: AOT-compile the a3b and a47b training steps for their TPU slices on this CPU host,
and set each report's estimated MFU against the published anchors.

    python -m benchmarks.aot_report                        # a3b_tpu on v5p-64 and a47b_tpu on v5p-512
    python -m benchmarks.aot_report --only a3b_tpu --json  # one report, as JSON
    python -m benchmarks.aot_report a3b_tpu:optim.grad_accum=4   # overrides per config, key=value
    python -m benchmarks.aot_report --topology a47b_tpu=v5p-256  # another slice

Each compile takes a few minutes on a small host (about 3 minutes for a3b on 2 cores). The MFU here is the
roofline estimate of `ernie_jax.aot` (see `ernie_jax.tools.hlo_stats`), not a measurement: it ranks configurations and
says how far a layout is from the anchors, nothing more.
"""

from __future__ import annotations

import argparse
import json
import sys

from ernie_jax.tools import aot_report as aot
from ernie_jax.training.config import apply_overrides, load_preset

TARGETS = {"a3b_tpu": "v5p-64", "a47b_tpu": "v5p-512"}
# Published MFU of comparable MoE training runs (MaxText's Mixtral v5p figure, Baidu's ERNIE 4.5 technical report,
# Marin's H100 runs), to put an estimate next to something real.
ANCHORS = {
    "MaxText Mixtral-8x7B on v5p": 0.52,
    "ERNIE 4.5 300B-A47B (Paddle, FP8)": 0.47,
    "Marin, ERNIE-like shape on 8xH100": 0.27,
}


def _row(r: dict) -> str:
    if "compile_error" in r:
        reason = r["compile_error"].splitlines()[-1][:120]
        return f"| {r['config']} | {r['topology']} ({r['chips']} chips) | {r['mesh_text']} | DOES NOT FIT: {reason} |"
    b, mfu = r["bytes_per_chip"], r["roofline_mfu"]
    tokens = r["global_batch"] * r["seq_len"]
    step = r["roofline"]["overlapped_s"]
    return (
        f"| {r['config']} | {r['topology']} ({r['chips']} chips) | {r['mesh_text']} | {b['peak_estimate'] / 1e9:.1f} GB"
        f" of {r['hbm_bytes'] / 1e9:.0f} ({'fits' if r['fits'] else 'DOES NOT FIT'}) | {r['compiled_over_model']:.2f}"
        f" | {step:.2f} s, {tokens / step / r['chips']:,.0f} tok/s/chip | {mfu['overlapped']:.1%} / {mfu['serial']:.1%}"
        f" | {r['compile_s']:.0f} s |"
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.aot_report", description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=sorted(TARGETS), action="append", help="run only this config")
    parser.add_argument("--json", action="store_true")
    parser.add_argument(
        "--topology", action="append", default=[], metavar="CONFIG=TOPOLOGY", help="e.g. a47b_tpu=v5p-256"
    )
    args, overrides = parser.parse_known_args(argv)
    per_config: dict[str, list[str]] = {}
    for item in overrides:
        name, sep, override = item.partition(":")
        if not sep or name not in TARGETS:
            parser.error(f"overrides are CONFIG:key=value with CONFIG in {sorted(TARGETS)}, got {item!r}")
        per_config.setdefault(name, []).append(override)
    targets = dict(TARGETS)
    for item in args.topology:
        name, _, topology = item.partition("=")
        if name not in TARGETS or not topology:
            parser.error(f"--topology wants CONFIG=TOPOLOGY with CONFIG in {sorted(TARGETS)}, got {item!r}")
        targets[name] = topology
    reports = []
    for name in args.only or TARGETS:
        cfg = apply_overrides(load_preset(name), per_config.get(name, []))
        print(f"compiling {name} for {targets[name]} ...", file=sys.stderr, flush=True)
        r = aot.compile_report(cfg, targets[name])
        r["mesh_text"] = " x ".join(f"{k} {v}" for k, v in r["mesh"].items() if v > 1)
        reports.append(r)
        if not args.json:
            print(aot.format_report(r), flush=True)
    if args.json:
        print(json.dumps(reports, indent=2))
        return 0 if all(r["fits"] for r in reports) else 1
    print()
    print("| config | slice | mesh | peak HBM per chip | compiled/model FLOPs | est. step | est. MFU overlapped / "
          "serial | compile |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for r in reports:
        print(_row(r))
    print()
    for r in reports:
        if "compile_error" in r:
            continue
        mfu = r["roofline_mfu"]["overlapped"]
        ratios = ", ".join(f"{mfu / v:.2f}x {k} ({v:.0%})" for k, v in ANCHORS.items())
        print(f"{r['config']}: estimated MFU {mfu:.1%} = {ratios}")
    return 0 if all(r["fits"] for r in reports) else 1


if __name__ == "__main__":
    sys.exit(main())
