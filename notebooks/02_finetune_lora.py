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
# # LoRA fine-tuning (SFT) of ERNIE 4.5, exported to Hugging Face and PEFT
#
# The trainer of `python -m ernie_jax.train`, called from Python with the `lora_0p3b` preset: LoRA adapters of
# rank 8 on every projection of a frozen base, trained on conversations rendered with the checkpoint's own chat
# template (loss on the assistant's replies only). The loss is drawn while it trains; the model answers the same
# questions before and after; the result is exported as a merged Hugging Face checkpoint and as a PEFT adapter,
# and transformers and peft load both.
#
# The base: `ERNIE_BASE=path/to/ERNIE-4.5-0.3B-PT` if set; otherwise a small random ERNIE-4.5-0.3B-shaped model
# written here by transformers, with ERNIE's real tokenizer files when they are found (else a stand-in tokenizer
# trained here). A random base knows nothing, so what it learns here is the conversation set itself.
#
# **On a TPU VM** the cells run unchanged on the TPU chips. Setup (details in `01_quickstart`):
# `pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && pip install -e ".[test,tpu]"
# jupyterlab`, then `jupyter lab --no-browser --port 8888 notebooks/` on the VM and
# `gcloud compute tpus tpu-vm ssh NAME --zone ZONE -- -N -L 8888:localhost:8888` on your machine.

# %%
# ruff: noqa: E402 - cells import what they use
import warnings

warnings.filterwarnings("ignore", message="IProgress not found")  # tqdm's notice when ipywidgets is not installed
warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notices, seen by peft

import json
import os
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import support
import torch
import transformers

import ernie_jax  # before the first JAX computation: TPU chips when present, else CPU (libtpu left alone)
import ernie_jax.train
from ernie_jax.console import setup_logging
from ernie_jax.training.config import apply_overrides, load_preset

transformers.utils.logging.disable_progress_bar()
setup_logging()  # the trainer's log lines, as the command prints them
DTYPE = jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16  # compute dtype for generation
started = time.perf_counter()
print(f"JAX {jax.__version__} on {jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}")

# %% [markdown]
# ## 1. The base and the conversations
#
# The random base is initialised with a wider spread than transformers' default (`initializer_range` 0.1, not
# 0.02): with tied embeddings of spread 0.02, no hidden state can give any token more than about 1e-4 of the
# probability over ERNIE's 103K-token vocabulary, and the loss could not fall below about 9.

# %%
from ernie_jax.config import ERNIE_4_5_0P3B

work = Path(tempfile.mkdtemp(prefix="ernie-finetune-"))
BASE = os.environ.get("ERNIE_BASE")
if BASE:
    base = Path(BASE)
else:
    base = work / "base"
    print("tokenizer:", support.write_tokenizer(base, extra_text=[json.dumps(c) for c in support.conversations(64)]))
    vocab = -(-ernie_jax.Tokenizer.from_pretrained(base).vocab_size // 128) * 128
    small = ERNIE_4_5_0P3B.replace(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                                   initializer_range=0.1)  # fmt: skip
    support.hf_checkpoint(base, small)
tokenizer = ernie_jax.Tokenizer.from_pretrained(base)

data = work / "sft.jsonl"
rows = support.conversations(256)
data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
print(f"{len(rows)} conversations in {data}; one of them, as the chat template renders it:\n")
print(tokenizer.render_chat_template(rows[2]["messages"]))

# %% [markdown]
# ## 2. The run config
#
# The `lora_0p3b` preset (rank 8, alpha 16, adapters on q/k/v/o and the MLP, base frozen in bfloat16), shortened
# for a notebook: 8 rows of 64 tokens per step (conversations packed whole), 80 steps (`FINETUNE_STEPS=N` in the
# environment for a quicker look), a learning rate suited to adapters on a random base. On CPU the compute and the
# frozen base are float32 (bfloat16 matmuls are emulated there); on TPU the preset's bfloat16.

# %%
run = work / "run"
STEPS = int(os.environ.get("FINETUNE_STEPS", 80))
overrides = [
    f"init_from_hf={base}",
    f"data.sources={data}",
    f"data.tokenizer={base}",
    "data.seq_len=64",
    "data.global_batch_size=8",
    f"steps={STEPS}",
    "optim.lr=5e-3",
    "optim.warmup_steps=10",
    "log_every=4",
    *(["dtype=float32", "lora.base_dtype=param"] if jax.default_backend() == "cpu" else []),
    f"run_dir={run}",
    f"export_hf={work / 'merged'}",
    f"export_peft={work / 'adapter'}",
]
cfg = apply_overrides(load_preset("lora_0p3b"), overrides)
print("python -m ernie_jax.train --config=lora_0p3b", " ".join(overrides))
print(cfg.lora)

# %% [markdown]
# ## 3. Before: the base answers

# %%
QUESTIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "What is the capital of Kenya?"}],
    [{"role": "system", "content": "Answer in one sentence."},
     {"role": "user", "content": "What is the capital of Peru?"}],
]  # fmt: skip
STOP = [i for i in (tokenizer.eos_token_id, tokenizer.token_to_id(support.END)) if i is not None]


def answers(model) -> list[str]:
    """Greedy replies of `model` to QUESTIONS, through the chat template."""
    prompts = [tokenizer.apply_chat_template(q, add_generation_prompt=True) for q in QUESTIONS]
    replies = ernie_jax.generate(model, prompts, max_new_tokens=16, temperature=0.0, eos_token_id=STOP)
    return [tokenizer.decode([t for t in r if t not in STOP], skip_special_tokens=True) for r in replies]


before = answers(ernie_jax.from_pretrained(base, dtype=DTYPE, progress=False))
for q, a in zip(QUESTIONS, before, strict=True):
    print(f"{q[-1]['content']!r} -> {a!r}")

# %% [markdown]
# ## 4. Train, with the loss drawn live
#
# `ernie_jax.train.train(cfg, on_log=...)` calls back after every logged step with the row it writes to
# `metrics.jsonl`; `support.LivePlot` redraws the curves from it. `ce` is the cross-entropy on the assistant's
# tokens.

# %%
plot = support.LivePlot({"loss on assistant tokens": ["ce"], "gradient norm": ["grad_norm"], "learning rate": ["lr"]})
summary = ernie_jax.train.train(cfg, "lora_0p3b", progress=False, on_log=plot)
print(f"loss {summary['first_loss']:.3f} -> {summary['last_loss']:.3f} in {summary['wall_s']:.0f} s "
      f"({summary['end_step']} steps); metrics in {run / 'metrics.jsonl'}")  # fmt: skip

# %% [markdown]
# ## 5. After: the merged export answers
#
# `export_hf` wrote the merged model (W + s·A·B) in Hugging Face format; loaded back like any checkpoint.

# %%
merged = ernie_jax.from_pretrained(work / "merged", dtype=DTYPE, progress=False)
after = answers(merged)
for q, b, a in zip(QUESTIONS, before, after, strict=True):
    print(f"{q[-1]['content']!r}\n    before: {b!r}\n    after:  {a!r}")

# %% [markdown]
# ## 6. transformers and peft load the exports
#
# - transformers loads the merged checkpoint: its logits against ours on the same ids.
# - peft puts the adapter on the original base (`PeftModel.from_pretrained(base, adapter)`): its logits against
#   the merged checkpoint's. On CPU the run keeps the base in float32 (`lora.base_dtype=param`), so the two agree to
#   float32 rounding. With the preset's bfloat16 base (on TPU) the merge W + s·A·B is computed in bfloat16, so the
#   merged weights carry bfloat16 rounding that peft's float32 sum does not: expect a difference of that size.
# - and peft's model answers the questions greedily through transformers' `generate`.

# %%
from peft import PeftModel
from transformers import AutoModelForCausalLM

ids = tokenizer.apply_chat_template(QUESTIONS[0], add_generation_prompt=True)
merged32 = ernie_jax.from_pretrained(work / "merged", dtype=jnp.float32, progress=False)
with jax.default_matmul_precision("highest"):  # full float32 matmuls on TPU too, as transformers computes on CPU
    ours = np.asarray(merged32(jnp.asarray([ids])), dtype=np.float32)[0]
hf_merged = AutoModelForCausalLM.from_pretrained(work / "merged", dtype=torch.float32).eval()
hf_base = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
with torch.no_grad():
    theirs = hf_merged(torch.tensor([ids])).logits[0].numpy()
    peft_model = PeftModel.from_pretrained(hf_base, work / "adapter").eval()
    peft_logits = peft_model(torch.tensor([ids])).logits[0].numpy()
scale = np.abs(theirs).max()
print(f"merged: ernie_jax vs transformers   max |Δlogit| {np.abs(ours - theirs).max():.2e} (max |logit| {scale:.1f})")
print(f"PEFT on the base vs merged          max |Δlogit| {np.abs(peft_logits - theirs).max():.2e}")
for q in QUESTIONS:
    prompt = torch.tensor([tokenizer.apply_chat_template(q, add_generation_prompt=True)])
    with torch.no_grad():
        out = peft_model.generate(prompt, max_new_tokens=16, do_sample=False, eos_token_id=STOP)[0, prompt.shape[1] :]
    reply = tokenizer.decode([t for t in out.tolist() if t not in STOP], skip_special_tokens=True)
    print(f"peft + transformers: {q[-1]['content']!r} -> {reply!r}")
print(sorted(p.name for p in (work / "adapter").iterdir()), sorted(p.name for p in (work / "merged").iterdir()))

# %%
print(f"notebook ran in {time.perf_counter() - started:.0f} s")
