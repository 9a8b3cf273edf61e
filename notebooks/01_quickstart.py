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
# # ERNIE 4.5 in JAX: quickstart
#
# Check the install against Hugging Face transformers, load a checkpoint, compare our logits with transformers'
# position by position, then generate and chat. With no checkpoint given, a small random one is made here by
# transformers' own `save_pretrained` (so its text is noise; the point is that both libraries produce the *same*
# noise). Set `ERNIE_CHECKPOINT=path/to/ERNIE-4.5-0.3B-PT` before starting Jupyter to run the same cells on a real
# checkpoint.
#
# **On a TPU VM** (the same cells run unchanged and use the TPU chips):
#
# ```bash
# # on the VM (e.g. gcloud compute tpus tpu-vm ssh NAME --zone ZONE)
# git clone <this repository> ernie-jax && cd ernie-jax
# pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu   # transformers' reference, CPU build
# pip install -e ".[test,tpu]" jupyterlab
# jupyter lab --no-browser --port 8888 notebooks/
# # on your laptop: forward the port, then open the http://localhost:8888/?token=... link the VM printed
# gcloud compute tpus tpu-vm ssh NAME --zone ZONE -- -N -L 8888:localhost:8888
# ```
#
# On a laptop or CPU host the same `pip install` works; `import ernie_jax` (before the first JAX computation) keeps
# libtpu from trying to initialise where there are no TPU chips.

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
import torch
import transformers
from transformers import AutoModelForCausalLM

import ernie_jax  # before the first JAX computation: TPU chips when present, else CPU (libtpu left alone)

transformers.utils.logging.disable_progress_bar()
started = time.perf_counter()
print(f"JAX {jax.__version__} on {jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}")

# %% [markdown]
# ## 1. Install check
#
# `python -m ernie_jax.verify` in a cell: transformers writes two small random checkpoints (dense, and MoE with the
# 21B-A3B layout), `ernie_jax.from_pretrained` loads them, and the largest logit difference is printed.

# %%
from ernie_jax.tools.verify import worst_logit_difference

# On TPU, float32 matmuls run as bfloat16 passes unless asked otherwise: comparisons with transformers ask for
# full float32 precision (no effect on CPU, where float32 matmuls are float32 already).
with jax.default_matmul_precision("highest"):
    worst = worst_logit_difference([])
assert worst <= 1e-4, worst

# %% [markdown]
# ## 2. A checkpoint
#
# `ERNIE_CHECKPOINT` if set; otherwise ERNIE-4.5-0.3B's architecture shrunk to 2 layers of width 128, random, saved
# by transformers, with ERNIE's tokenizer files beside it when they are found (`support.REAL_TOKENIZER`) or a small
# stand-in tokenizer trained here.

# %%
CHECKPOINT = os.environ.get("ERNIE_CHECKPOINT")
work = Path(tempfile.mkdtemp(prefix="ernie-quickstart-"))
if CHECKPOINT:
    path = Path(CHECKPOINT)
    print(f"checkpoint: {path}")
else:
    from ernie_jax.config import ERNIE_4_5_0P3B

    path = work / "ernie-small"
    print("tokenizer:", support.write_tokenizer(path))
    vocab = -(-ernie_jax.Tokenizer.from_pretrained(path).vocab_size // 128) * 128
    small = ERNIE_4_5_0P3B.replace(vocab_size=vocab, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, head_dim=32)  # fmt: skip
    support.hf_checkpoint(path, small)
    print(f"checkpoint: {path} ({small.num_params() / 1e6:.1f}M params, random, written by transformers)")

tokenizer = ernie_jax.Tokenizer.from_pretrained(path)
dtype = jnp.float32  # to compare with transformers in float32; jnp.bfloat16 is what a TPU run would usually take
model = ernie_jax.from_pretrained(path, dtype=dtype, progress=False)
print(model.config)

# %% [markdown]
# ## 3. Logits against transformers, position by position
#
# The same token ids through both models (transformers in fp32 on the CPU). Left: every logit of the sequence,
# ours against theirs. Right: the largest difference at each position; for scale, float32's resolution at the
# size of that position's logits, and what the same weights give when our model computes in bfloat16.

# %%
text = "The capital of France is Paris. The capital of Japan is"
ids = [tokenizer.bos_token_id, *tokenizer.encode(text, add_special_tokens=False)]
with jax.default_matmul_precision("highest"):
    ours = np.asarray(model(jnp.asarray([ids])), dtype=np.float32)[0]  # [T, V]
reference = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
with torch.no_grad():
    theirs = reference(torch.tensor([ids])).logits[0].numpy()
diff = np.abs(ours - theirs).max(axis=-1)
scale = np.abs(theirs).max(axis=-1)
bf16_model = ernie_jax.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
bf16_diff = np.abs(np.asarray(bf16_model(jnp.asarray([ids])), dtype=np.float32)[0] - theirs).max(axis=-1)
del bf16_model
print(f"{len(ids)} positions; max |Δlogit| {diff.max():.2e} in {jnp.dtype(dtype).name} "
      f"(bfloat16 compute: {bf16_diff.max():.2e}; largest |logit| {scale.max():.2f})")  # fmt: skip

fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4))
pick = np.random.default_rng(0).choice(ours.size, size=min(ours.size, 20000), replace=False)
left.scatter(theirs.ravel()[pick], ours.ravel()[pick], s=2, alpha=0.4)
lo, hi = theirs.min(), theirs.max()
left.plot([lo, hi], [lo, hi], color="grey", lw=0.8)
left.set(xlabel="transformers logit", ylabel="ernie_jax logit", title=f"{pick.size:,} logits of {ours.size:,}")
labels = [tokenizer.decode([i]).replace("\n", "\\n") or repr(i) for i in ids]
right.bar(range(len(ids)), np.maximum(diff, 1e-12), label=f"max |Δlogit|, ernie_jax in {jnp.dtype(dtype).name}")
right.plot(range(len(ids)), scale * np.finfo(np.float32).eps, "k.", label="float32 eps × max |logit|")
right.plot(range(len(ids)), bf16_diff, "r_", markersize=14, label="max |Δlogit|, ernie_jax in bfloat16")
right.set(yscale="log", ylabel="|ernie_jax - transformers|", title="largest difference per position")
right.set_xticks(range(len(ids)), labels, rotation=70, fontsize=8)
right.legend(fontsize=8)
fig.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Generate
#
# `ernie_jax.generate` takes a batch of prompts of any lengths (token-id lists) and returns each row's new tokens.
# Greedy here (`temperature=0.0`), so the result can be checked against transformers' `generate(do_sample=False)`.
# A random model with tied embeddings tends to repeat its input's last token; the point is that both agree.

# %%
prompts = [text, "Once upon a time"]
prompt_ids = [[tokenizer.bos_token_id, *tokenizer.encode(p, add_special_tokens=False)] for p in prompts]
start = time.perf_counter()
with jax.default_matmul_precision("highest"):  # greedy picks must not hinge on TPU's bfloat16 passes
    new = ernie_jax.generate(model, prompt_ids, max_new_tokens=24, temperature=0.0, eos_token_id=None)
print(f"generated 2 x 24 tokens in {time.perf_counter() - start:.2f} s (compile included)")
for p, p_ids, row in zip(prompts, prompt_ids, new, strict=True):
    with torch.no_grad():
        ref = reference.generate(torch.tensor([p_ids]), max_new_tokens=24, do_sample=False, eos_token_id=None)
    same = ref[0, len(p_ids) :].tolist() == row
    print(f"{p!r} -> {tokenizer.decode(row)!r}\n    identical to transformers' greedy tokens: {same}")

# %% [markdown]
# ## 5. Chat
#
# The checkpoint's own chat template (`Tokenizer.apply_chat_template`), history kept between turns; a reply ends at
# the template's end-of-turn token. This is what `python -m ernie_jax.generate --model DIR --chat` does. Sampled
# (temperature 0.7): with random weights the replies are noise drawn from the whole vocabulary; a trained
# checkpoint in `ERNIE_CHECKPOINT` answers.

# %%
end_of_turn = tokenizer.token_to_id(tokenizer.special_tokens.get("sep_token", support.END))
stop = [i for i in (tokenizer.eos_token_id, end_of_turn) if i is not None]
messages = [{"role": "system", "content": "You are a helpful assistant."}]
for turn, question in enumerate(["What is the capital of France?", "And of Japan?"]):
    messages.append({"role": "user", "content": question})
    chat_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    reply_ids = ernie_jax.generate(model, [chat_ids], max_new_tokens=32, eos_token_id=stop, temperature=0.7, seed=turn)
    reply_ids = reply_ids[0]
    reply = tokenizer.decode([t for t in reply_ids if t not in stop], skip_special_tokens=True)
    messages.append({"role": "assistant", "content": reply})
    print(f"user: {question}\nassistant ({len(reply_ids)} tokens): {reply!r}\n")
print("the last prompt, as the template rendered it:")
print(tokenizer.render_chat_template(messages[:-1], add_generation_prompt=True))

# %%
print(f"notebook ran in {time.perf_counter() - started:.0f} s")
