"""ERNIE-4.5-0.3B (dense) fine-tuning or pretraining on any backend; start from weights with --init-from-hf DIR."""

from ernie_jax.config import ERNIE_4_5_0P3B
from ernie_jax.data import DataConfig
from ernie_jax.training.config import CheckpointConfig, MeshConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="0p3b",
        model=ERNIE_4_5_0P3B,
        data=DataConfig(seq_len=2048, global_batch_size=32),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-4, warmup_steps=200),
        checkpoint=CheckpointConfig(every=500, keep=3),
        steps=10_000,
        run_dir="runs/0p3b",
        dtype="bfloat16",
        remat="dots",
    )
