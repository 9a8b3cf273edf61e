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
# # Inside the MoE: expert load, router losses and the aux-free correction bias
#
# ERNIE 4.5's MoE router picks each token's top-k experts on `softmax(router logits) + correction bias`, and mixes
# the chosen experts with the *unbiased* probabilities. The bias is not trained by gradients: after every step it
# moves by `bias += rate * sign(mean load - load)` (`moe_loss.bias_update_rate`), so overloaded experts are picked
# less and idle ones more, without a loss term pulling on the router (ERNIE also keeps an aux load-balance loss and a
# router z-loss, each with its coefficient in `moe_loss.*`).
#
# Two short runs of the embedded default (`configs/tiny.py`: the 21B-A3B layout shrunk to one dense and three MoE
# layers of 8 experts, top-2, on Python's own documentation), both without the aux loss so that the bias is the only
# balancing force: one with the bias update, one without. Drawn: loss, aux loss and z-loss live; every expert's load
# per layer over training as heatmaps; each layer's imbalance in both runs; the biases the first run ended with.
#
# **On a TPU VM** the cells run unchanged on the TPU chips. Setup (details in `01_quickstart`):
# `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && pip install -e ".[test,tpu]"
# jupyterlab`, then `jupyter lab --no-browser --port 8888 notebooks/` on the VM and
# `gcloud compute tpus tpu-vm ssh NAME --zone ZONE -- -N -L 8888:localhost:8888` on your machine.

# %%
# ruff: noqa: E402 - cells import what they use
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice when ipywidgets is not installed

import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import support
from flax import nnx

import ernie_jax  # before the first JAX computation: TPU chips when present, else CPU (libtpu left alone)
import ernie_jax.train
from ernie_jax.moe import CorrectionBias
from ernie_jax.training.config import apply_overrides, load_preset

started = time.perf_counter()
print(f"JAX {jax.__version__} on {jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}")

# %% [markdown]
# ## 1. The runs
#
# 200 steps of 16 × 128 bytes each (`MOE_STEPS=N` in the environment for a quicker look), the preset's MTP head
# left out (it has nothing to do with routing), the final model exported in float32 to read its biases back.

# %%
work = Path(tempfile.mkdtemp(prefix="ernie-moe-"))
STEPS, RATE = int(os.environ.get("MOE_STEPS", 200)), 1e-3  # RATE: the preset's bias_update_rate (ERNIE's)


def run_config(name: str, rate: float):
    return apply_overrides(
        load_preset("tiny"),
        [
            f"steps={STEPS}",
            "log_every=5",
            "moe_loss.aux_loss_coef=0",
            f"moe_loss.bias_update_rate={rate}",
            "mtp.depth=0",
            "model.num_nextn_predict_layers=0",
            "sample_tokens=0",
            "checkpoint.every=1000",
            f"run_dir={work / name}",
            f"export_hf={work / name / 'hf'}",
            "export_dtype=float32",
        ],
    )


cfg = run_config("with_bias", RATE)
print(cfg.model)
print(cfg.moe_loss)

# %% [markdown]
# ## 2. With the aux-free bias update: loss, aux loss and z-loss, live
#
# The aux loss is still computed and logged (its coefficient is 0, so it does not train anything): per MoE layer
# `E · Σ_e f_e · P_e`, the fraction of tokens sent to each expert times its mean router probability, summed over the
# three layers; 1 per layer when the load is uniform. The z-loss is the mean squared log-sum-exp of the router logits.

# %%
plot = support.LivePlot(
    {"cross-entropy (bytes)": ["ce"], "aux loss (3 layers)": ["aux_loss"], "router z-loss": ["z_loss"]}
)
with_bias = ernie_jax.train.train(cfg, "tiny", progress=False, on_log=plot)
runs = {"with bias update": plot.rows}
print(f"loss {with_bias['first_loss']:.2f} -> {with_bias['last_loss']:.2f} in {with_bias['wall_s']:.0f} s")

# %% [markdown]
# ## 3. The same run without it

# %%
plot = support.LivePlot(
    {"cross-entropy (bytes)": ["ce"], "aux loss (3 layers)": ["aux_loss"], "router z-loss": ["z_loss"]}
)
without = ernie_jax.train.train(run_config("without_bias", 0.0), "tiny", progress=False, on_log=plot)
runs["without"] = plot.rows
print(f"loss {without['first_loss']:.2f} -> {without['last_loss']:.2f} in {without['wall_s']:.0f} s")

# %% [markdown]
# ## 4. Expert load per layer over training
#
# Each panel is one MoE layer: a row per expert, a column per logged step, the colour the expert's share of the
# layer's top-2 assignments in that step's batch relative to a uniform share (1 = balanced; 2 = twice its share).

# %%
fig, axes = plt.subplots(2, 3, figsize=(15, 6), sharex=True, sharey=True)
for row_axes, (name, rows) in zip(axes, runs.items(), strict=True):
    load = np.array([r["expert_load"] for r in rows], dtype=np.float64)  # [logged steps, layers, experts]
    share = load / load.mean(axis=-1, keepdims=True)
    steps = [r["step"] for r in rows]
    for layer, ax in enumerate(row_axes):
        image = ax.imshow(share[:, layer].T, aspect="auto", cmap="coolwarm", vmin=0, vmax=2, interpolation="nearest",
                          extent=(steps[0], steps[-1], share.shape[-1] - 0.5, -0.5))  # fmt: skip
        ax.set(title=f"{name}: MoE layer {layer + 1}", ylabel="expert" if layer == 0 else None)
for ax in axes[-1]:
    ax.set_xlabel("step")
fig.colorbar(image, ax=axes, label="load / uniform load")
plt.show()

# %% [markdown]
# ## 5. Imbalance and aux loss, both runs
#
# `load_imbalance` (logged per layer) is the busiest expert's load over the mean load: 1 is perfectly balanced,
# 4 would mean one expert takes half of a layer's top-2 assignments.

# %%
fig, axes = plt.subplots(1, 4, figsize=(18, 3.6))
for name, rows in runs.items():
    steps = [r["step"] for r in rows]
    imbalance = np.array([r["load_imbalance"] for r in rows])
    for layer in range(imbalance.shape[1]):
        axes[layer].plot(steps, imbalance[:, layer], label=name)
        axes[layer].set(title=f"MoE layer {layer + 1}: max load / mean load", xlabel="step")
    axes[3].plot(steps, [r["aux_loss"] for r in rows], label=name)
axes[3].set(title="aux loss (3 layers; 3 = balanced)", xlabel="step")
for ax in axes:
    ax.legend(fontsize=8)
fig.tight_layout()
plt.show()
for name, rows in runs.items():
    last = np.array([r["load_imbalance"] for r in rows[-5:]]).mean(axis=0)
    print(f"{name:17s} imbalance over the last 5 logged steps, per layer: {np.round(last, 2)}")

# %% [markdown]
# ## 6. The biases the run ended with
#
# Read back from the exported checkpoint (`e_score_correction_bias` in transformers' names; a `CorrectionBias`
# variable here, which the optimizer never sees). Next to each expert's bias, its load share over the run's first
# and last 20 steps: experts that were overloaded early have been pushed down, idle ones up.

# %%
model = ernie_jax.from_pretrained(work / "with_bias" / "hf", dtype=jnp.float32, progress=False)
biases = np.concatenate([np.asarray(v.get_value()) for _, v in nnx.iter_graph(model) if isinstance(v, CorrectionBias)])
load = np.array([r["expert_load"] for r in runs["with bias update"]], dtype=np.float64)
share = load / load.mean(axis=-1, keepdims=True)
early, late = share[:4].mean(axis=0), share[-4:].mean(axis=0)  # logged every 5 steps: the first and last 20 steps
fig, axes = plt.subplots(1, biases.shape[0], figsize=(15, 3.6), sharey=False)
experts = np.arange(biases.shape[1])
for layer, ax in enumerate(axes):
    ax.bar(experts, biases[layer], color=np.where(biases[layer] < 0, "tab:red", "tab:blue"))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set(title=f"MoE layer {layer + 1}", xlabel="expert", ylabel="correction bias" if layer == 0 else None)
    twin = ax.twinx()
    twin.plot(experts, early[layer], "ko--", label="load share, first 20 steps")
    twin.plot(experts, late[layer], "g^-", label="load share, last 20 steps")
    twin.set_ylim(0, max(2.5, float(early.max()) * 1.1))
    if layer == len(axes) - 1:
        twin.legend(fontsize=8, loc="upper right")
fig.tight_layout()
plt.show()
corr = [np.corrcoef(early[layer], biases[layer])[0, 1] for layer in range(biases.shape[0])]
print("correlation of early load share with final bias, per layer:", np.round(corr, 2))
print(f"bias range {biases.min():+.3f} .. {biases.max():+.3f} after {STEPS} steps of ±{RATE}")

# %%
print(f"notebook ran in {time.perf_counter() - started:.0f} s")
