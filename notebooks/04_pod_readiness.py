# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # Pod readiness from this host: the AOT report for ERNIE-4.5-21B-A3B on a v5p-64, drawn
#
# `python -m ernie_jax.aot --config=a3b_tpu --topology=v5p-64` compiles the trainer's own step (same code,
# shardings, batch and Pallas kernels) for a TPU slice through libtpu, on whatever host runs this: nothing is
# allocated, no TPU is needed. Here the same report, `ernie_jax.tools.aot_report.compile_report`, is drawn:
#
# - bytes per chip by kind (parameters, optimizer state, temporaries, ...) against the chip's HBM;
# - the roofline step time split by op kind (the report's `roofline_by_kind_s`: Pallas kernels by name, XLA
#   matmuls, gathers, copies, elementwise fusions, ...) and by collective; each op costs max(FLOPs / peak, bytes /
#   HBM bandwidth), each collective its bytes over one ICI link. A model to compare layouts, not a measurement.
#
# Then what-if cells: change the batch, the mesh or the remat policy and redraw. One compile of the full a3b step
# takes 2 to 5 minutes on 2 CPU cores, so by default the what-ifs compile the embedded `tiny` MoE on a v5p-8
# (seconds each); `POD_WHATIFS=full` runs them on the a3b preset itself, against the report compiled below.
# `POD_PRESET=a47b_tpu POD_TOPOLOGY=v5p-512` draws the 300B-A47B report instead.
#
# **On a TPU VM** the cells run unchanged (compiling for a topology does not touch the local chips). Setup (details
# in `01_quickstart`): `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu &&
# pip install -e ".[test,tpu]" jupyterlab` (the `tpu` extra brings libtpu, which this notebook needs on any host),
# then `jupyter lab --no-browser --port 8888 notebooks/` on the VM and
# `gcloud compute tpus tpu-vm ssh NAME --zone ZONE -- -N -L 8888:localhost:8888` on your machine.

# %%
# ruff: noqa: E402 - cells import what they use
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice when ipywidgets is not installed

import os
import time
from collections import defaultdict

import jax
import matplotlib.pyplot as plt
import numpy as np

import ernie_jax  # noqa: F401 - before the first JAX computation: keeps libtpu from initialising on a CPU host
from ernie_jax.chips import CHIPS
from ernie_jax.tools.aot_report import compile_report, format_report, resolve_topology
from ernie_jax.training.config import apply_overrides, load_preset

started = time.perf_counter()
PRESET = os.environ.get("POD_PRESET", "a3b_tpu")
TOPOLOGY = os.environ.get("POD_TOPOLOGY", "v5p-64")
print(f"JAX {jax.__version__}; this host: {jax.default_backend()}; compiling {PRESET} for {TOPOLOGY}")

# %% [markdown]
# ## 1. Compile the step once

# %%
reports: dict[str, dict] = {}  # label -> compile_report's dict


def compile_step(label: str, preset: str, topology: str, overrides: list[str] = ()) -> dict:
    """compile_report for preset + overrides on `topology` (what `python -m ernie_jax.aot --json` prints)."""
    start = time.perf_counter()
    report = compile_report(apply_overrides(load_preset(preset), list(overrides)), topology)
    report["wall_s"] = time.perf_counter() - start
    reports[label] = report
    return report


full = compile_step(f"{PRESET} on {TOPOLOGY}", PRESET, TOPOLOGY)
print(format_report(full))
print(f"(wall time of this cell: {full['wall_s']:.0f} s)")

# %% [markdown]
# ## 2. Bytes per chip and step time, drawn

# %%
MEMORY_KINDS = ("params", "opt_state", "temporaries", "other")
MEMORY_LABELS = {"params": "parameters", "opt_state": "optimizer state", "temporaries": "temporaries",
                 "other": "batch, biases, outputs, code"}  # fmt: skip
COLOURS = plt.get_cmap("tab10").colors


def memory_parts(r: dict) -> dict[str, float]:
    b = r["bytes_per_chip"]
    parts = {"params": b["params"], "opt_state": b["opt_state"], "temporaries": b["temporaries"]}
    parts["other"] = b["peak_estimate"] - sum(parts.values())
    return {k: v / 1e9 for k, v in parts.items()}


def roofline_split(r: dict, top: int = 11) -> dict[str, dict[str, float]]:
    """Seconds per step: compute + HBM per op kind (the report's `roofline_by_kind_s`; kinds past the `top`
    largest summed as "other"), and each collective's bytes over one ICI link."""
    if "roofline_by_kind_s" not in r:  # refused by libtpu: nothing compiled
        return {"compute": {}, "collectives": {}}
    compute = dict(list(r["roofline_by_kind_s"].items())[:top])
    compute["other"] = sum(list(r["roofline_by_kind_s"].values())[top:])
    ici = CHIPS[resolve_topology(r["topology"])[0]].ici_bytes_per_s
    collectives = {k: c["bytes"] / ici for k, c in r["collectives"].items() if c["bytes"]}
    return {"compute": compute, "collectives": collectives}


def draw(labels: list[str]) -> None:
    """Left: bytes per chip by kind against HBM. Middle: roofline seconds per op kind. Right: per collective."""
    rs = [reports[label] for label in labels]
    fig, axes = plt.subplots(1, 3, figsize=(17, 3.2 + 0.7 * len(rs)), gridspec_kw={"width_ratios": [1, 1.3, 1]})
    y = np.arange(len(rs))
    mem, comp, coll = axes
    peaks = [sum(memory_parts(r).values()) if "bytes_per_chip" in r else 0.0 for r in rs]
    hbm = max(r["hbm_bytes"] for r in rs) / 1e9
    # Against HBM when the step uses a fair part of it; in MB when it is a toy next to it.
    scale, unit = (1.0, "GB") if max(peaks) > 0.05 * hbm else (1e3, "MB")
    left = np.zeros(len(rs))
    for i, kind in enumerate(MEMORY_KINDS):
        widths = np.array([memory_parts(r)[kind] * scale if "bytes_per_chip" in r else 0.0 for r in rs])
        mem.barh(y, widths, left=left, color=COLOURS[i], label=MEMORY_LABELS[kind])
        left += widths
    if unit == "GB":
        mem.axvline(hbm, color="black", lw=2, label=f"HBM per chip ({hbm:.0f} GB)")
    for yi, r, peak in zip(y, rs, peaks, strict=True):
        text = f"{peak * scale:,.2f} {unit} of {r['hbm_bytes'] / 1e9:.0f} GB" if peak else "does not fit (refused)"
        mem.text(left[yi] * 1.02, yi, text, va="center", fontsize=8)
    mem.set(title="bytes per chip by kind", xlabel=unit, yticks=y, yticklabels=labels)
    mem.set_xlim(0, max(max(left), hbm * scale if unit == "GB" else 0) * 1.5)
    mem.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    for ax, part, title in ((comp, "compute", "roofline: compute + HBM, per op kind"),
                            (coll, "collectives", "roofline: ICI, per collective")):  # fmt: skip
        split = [roofline_split(r)[part] for r in rs]
        totals = defaultdict(float)
        for one in split:
            for kind, seconds in one.items():
                totals[kind] += seconds
        kinds = sorted(totals, key=totals.get, reverse=True)
        left = np.zeros(len(rs))
        for i, kind in enumerate(kinds):
            widths = np.array([one.get(kind, 0.0) * 1e3 for one in split])
            ax.barh(y, widths, left=left, color=plt.get_cmap("tab20").colors[i % 20], label=kind)
            left += widths
        for yi, total in zip(y, left, strict=True):
            text = "—" if not total else f"{total:,.0f} ms" if total >= 10 else f"{total:.2g} ms"
            ax.text(total * 1.01, yi, text, va="center", fontsize=8)
        ax.set(title=title, xlabel="ms per step", yticks=y, yticklabels=[] if ax is coll else labels)
        ax.set_xlim(0, max(max(left), 1e-9) * 1.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=2)
    fig.tight_layout()
    plt.show()
    for label, r in zip(labels, rs, strict=True):
        if "roofline" in r:
            rf, mfu = r["roofline"], r["roofline_mfu"]
            print(f"{label}: step {rf['overlapped_s'] * 1e3:,.1f} ms overlapped / {rf['serial_s'] * 1e3:,.1f} ms "
                  f"serial, MFU {mfu['overlapped']:.1%} / {mfu['serial']:.1%}, compiled/model FLOPs "
                  f"{r['compiled_over_model']:.2f}, peak {r['bytes_per_chip']['peak_estimate'] / 1e9:.2f} GB "
                  f"({'fits' if r['fits'] else 'does not fit'})")  # fmt: skip


draw([f"{PRESET} on {TOPOLOGY}"])

# %% [markdown]
# ## 3. What if...
#
# Each cell below compiles one change against the same baseline and redraws them all. `what_if` takes the
# overrides a `python -m ernie_jax.aot` command line would; try your own.

# %%
if os.environ.get("POD_WHATIFS") == "full":
    W_PRESET, W_TOPOLOGY, W_BASE = PRESET, TOPOLOGY, []
    baseline = f"{PRESET} on {TOPOLOGY}"  # reuses the compile of section 1
else:
    # The embedded default (the 21B-A3B layout shrunk: 4 layers, 8 experts, top-2; 16 x 128 tokens per step), MTP
    # head left out, on a v5p-8 (4 chips), data parallel.
    W_PRESET, W_TOPOLOGY = "tiny", "v5p-8"
    W_BASE = ["mtp.depth=0", "model.num_nextn_predict_layers=0", "mesh.data=-1", "dtype=bfloat16"]
    baseline = f"baseline: {W_PRESET} on {W_TOPOLOGY}"
    compile_step(baseline, W_PRESET, W_TOPOLOGY, W_BASE)
compared = [baseline]


def what_if(label: str, overrides: list[str]) -> None:
    r = compile_step(label, W_PRESET, W_TOPOLOGY, [*W_BASE, *overrides])
    print(f"{label} ({' '.join(overrides)}): compiled in {r['wall_s']:.0f} s")
    compared.append(label)
    draw(compared)


base_report = reports[baseline]
print(f"what-ifs on {W_PRESET} for {W_TOPOLOGY}; baseline remat={base_report['remat']}, mesh {base_report['mesh']}, "
      f"batch {base_report['global_batch']} x {base_report['seq_len']}")  # fmt: skip

# %% [markdown]
# **Remat.** Full rematerialisation keeps only each layer's input for the backward pass and runs the forward
# again: fewer temporaries, more FLOPs.

# %%
what_if("remat=full" if W_PRESET == "tiny" else "remat=dots", ["remat=full" if W_PRESET == "tiny" else "remat=dots"])

# %% [markdown]
# **Batch.** Twice the rows per step: temporaries (activations) grow with it, parameters and optimizer state
# do not, and the fixed per-step costs (gathering weights, reducing gradients) are spread over more tokens.

# %%
batch = reports[baseline]["global_batch"] * 2
what_if(f"batch {batch}", [f"data.global_batch_size={batch}"])

# %% [markdown]
# **Mesh.** Split the experts over the chips (`expert` axis) instead of replicating them: each chip holds a quarter
# of the experts' weights and optimizer state, and tokens travel to their experts' chip (all-gather and
# reduce-scatter of the routed rows here; ragged all-to-all in the TPU presets).

# %%
if W_PRESET == "tiny":
    what_if("experts split 4 ways", ["mesh.data=1", "mesh.expert=4"])
else:
    what_if("fsdp 8 x expert 4", ["mesh.fsdp=8", "mesh.expert=4"])

# %%
print(f"notebook ran in {time.perf_counter() - started:.0f} s")
