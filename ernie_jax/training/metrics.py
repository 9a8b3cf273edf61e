"""Training metrics: a jsonl log, TensorBoard event files, and the model FLOPs and peak FLOP/s behind MFU."""

from __future__ import annotations

import json
import math
import os
import time

import jax
import jax.numpy as jnp

from ernie_jax.chips import chip_for_device_kind
from ernie_jax.config import ErnieConfig


def model_flops_per_token(cfg: ErnieConfig, seq_len: int, mtp_depth: int = 0, vision_patches: int = 0) -> float:
    """Training FLOPs per token: 6 * active params (the head counted once) + causal attention scores and values;
    each trained MTP depth adds its block, projection and another pass through the LM head. A VL model
    (`vision_patches` image patches per row of `seq_len` tokens) adds its vision tower and resampler per patch,
    spread over the row's tokens, with attention counted as if the row's patches were one image (an upper bound)."""
    attn_layer = 6 * seq_len * cfg.num_attention_heads * cfg.resolved_head_dim  # causal: half of 12
    flops = 6.0 * cfg.num_active_params(include_embedding=True) + cfg.num_hidden_layers * attn_layer
    if mtp_depth:
        per_depth = cfg.mtp_params() // max(cfg.num_nextn_predict_layers, 1) + cfg.vocab_size * cfg.hidden_size
        flops += mtp_depth * (6.0 * per_depth + attn_layer)
    if vision_patches:
        flops += vision_patches * cfg.vision_flops_per_patch(vision_patches) / seq_len
    return flops


def peak_flops_per_device(dtype=jnp.float32) -> tuple[float, str]:
    """(FLOP/s, how it was obtained). CPUs have no datasheet figure here: measure a matmul instead."""
    kind = jax.devices()[0].device_kind
    known = chip_for_device_kind(kind)
    if known is not None:
        return known[1].peak_bf16_flops, f"{kind} bf16 peak"
    if jax.default_backend() == "cpu":
        n = 1024
        seconds = seconds_per_chained_call(lambda x: x @ x, jnp.ones((n, n), dtype))
        measured = 2 * n**3 / seconds / max(jax.local_device_count(), 1)
        return measured, f"measured {jnp.dtype(dtype).name} matmul on this CPU"
    return float("nan"), f"unknown peak for {kind}"


def measured_copy_bytes_per_s(n_bytes: int = 256 * 2**20) -> float:
    """Bytes read plus written per second by a jitted elementwise pass over an n_bytes array: the memory bandwidth
    of a device with no datasheet figure (a CPU)."""
    return 2 * n_bytes / seconds_per_chained_call(lambda a: a + 1.0, jnp.zeros(n_bytes // 4, jnp.float32))


def seconds_per_chained_call(fn, x: jax.Array, reps: int = 5) -> float:
    """Seconds per call of jit(fn), each call fed the last one's output, after a warm-up call that compiles."""
    f = jax.jit(fn)
    f(x).block_until_ready()
    start = time.perf_counter()
    for _ in range(reps):
        x = f(x)
    x.block_until_ready()
    return (time.perf_counter() - start) / reps


class MetricsWriter:
    """Appends one JSON object per logged step to run_dir/metrics.jsonl and writes TensorBoard scalars."""

    def __init__(self, run_dir: str, enabled: bool = True, resume_step: int = 0):
        """`resume_step`: the step the run resumes from. Rows logged after it by the interrupted run (steps the
        resumed run trains again) are dropped, so every step appears once."""
        self.enabled = enabled
        self._tb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        path = os.path.join(run_dir, "metrics.jsonl")
        _drop_rows_after(path, resume_step)
        self._jsonl = open(path, "a")  # noqa: SIM115 - closed in close()
        try:
            from tensorboardX import SummaryWriter

            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        except ImportError:  # tensorboardX is a declared dependency; keep training if it is missing anyway
            self._tb = None

    def write(self, step: int, scalars: dict) -> None:
        if not self.enabled:
            return
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        self._jsonl.flush()
        if self._tb is not None:  # non-finite values stay in the jsonl (TensorBoard would warn on every one)
            for k, v in scalars.items():
                if isinstance(v, list):
                    for i, x in enumerate(v):
                        if math.isfinite(x):
                            self._tb.add_scalar(f"{k}/moe_layer_{i}", x, step)
                elif math.isfinite(v):
                    self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            if self._tb is not None:
                self._tb.close()


def _drop_rows_after(path: str, step: int) -> None:
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = f.readlines()
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by a kill -9
        if row_step <= step:
            keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        tmp = path + ".tmp"
        with open(tmp, "w") as f:
            f.writelines(keep)
        os.replace(tmp, path)
