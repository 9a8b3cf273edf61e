"""ERNIE-4.5-300B-A47B pretraining on a TPU v5p-512 slice (256 chips; v5p-N counts TensorCores): FSDP 32 x expert 8,
seq 4096, bf16, full remat. On v5p-256 (128 chips, mesh.fsdp=16) the 512-row batch needs 123 GB per chip: use
data.global_batch_size=128 (76.9 GB per chip in `python -m ernie_jax.aot --config=a47b_tpu --topology=v5p-256`)."""

from ernie_jax.config import ERNIE_4_5_300B_A47B
from ernie_jax.data import DataConfig
from ernie_jax.training.config import CheckpointConfig, MeshConfig, MoELossConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="a47b_tpu",
        model=ERNIE_4_5_300B_A47B,
        data=DataConfig(seq_len=4096, global_batch_size=512),
        mesh=MeshConfig(data=1, fsdp=32, expert=8, tensor=1, moe_transport="ragged_a2a", moe_buffer_factor=2.0),
        optim=OptimConfig(lr=2.2e-4, min_lr_ratio=0.1, warmup_steps=200, weight_decay=0.1, clip_norm=1.0),
        moe_loss=MoELossConfig(aux_loss_coef=1e-5, ortho_loss_coef=0.0),
        checkpoint=CheckpointConfig(every=500, keep=3),
        steps=100_000,
        run_dir="runs/a47b_tpu",
        dtype="bfloat16",
        remat="full",
        loss_chunk=1024,  # LM-head logits a chunk at a time: the whole [B, T, V] fp32 logits are 13.5 GB per chip
        platform="tpu",
        min_devices=256,
    )
