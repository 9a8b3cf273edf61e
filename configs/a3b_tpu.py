"""ERNIE-4.5-21B-A3B pretraining on a TPU v5p-128 slice (64 chips; Cloud v5p-N counts TensorCores, 2 per chip):
FSDP 8 x expert 8, seq 4096, bf16, remat "attention". On v5p-64 (32 chips) use mesh.fsdp=4.

Tuned with `python -m ernie_jax.aot` (README "Performance"): expert-parallel receive buffers of 2 balanced shares
(mesh.moe_buffer_factor=2; 0 is the dropless worst case, 4x the memory and traffic here), a chunked LM-head loss,
and remat "attention": the backward recomputes each layer but for the flash kernel's keys, values, output and
statistics, which it keeps (13 GB per chip on v5p-64, for the attention forward kernel and key/value projections).

Data: set data.sources=... and data.tokenizer=<dir with ERNIE's tokenizer.model>; the default corpus is a demo.
"""

from ernie_jax.config import ERNIE_4_5_21B_A3B
from ernie_jax.data import DataConfig
from ernie_jax.training.config import CheckpointConfig, MeshConfig, MoELossConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="a3b_tpu",
        model=ERNIE_4_5_21B_A3B,
        data=DataConfig(seq_len=4096, global_batch_size=256),
        mesh=MeshConfig(data=1, fsdp=8, expert=8, tensor=1, moe_transport="ragged_a2a", moe_buffer_factor=2.0),
        optim=OptimConfig(lr=2.2e-4, min_lr_ratio=0.1, warmup_steps=2000, weight_decay=0.1, clip_norm=1.0),
        moe_loss=MoELossConfig(aux_loss_coef=1e-5, z_loss_coef=1e-4, ortho_loss_coef=1e-3, bias_update_rate=1e-3),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        steps=100_000,
        run_dir="runs/a3b_tpu",
        dtype="bfloat16",
        remat="attention",
        loss_chunk=1024,  # LM-head logits a chunk at a time: the whole [B, T, V] fp32 logits are 13.5 GB per chip
        platform="tpu",
        min_devices=64,
    )
