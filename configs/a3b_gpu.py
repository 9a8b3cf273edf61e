"""ERNIE-4.5-21B-A3B on one 8-GPU node (H100/H200): FSDP over 8 GPUs, experts replicated (EP=1 inside a node, the
practical choice on GPUs today, as in published JAX MoE runs on H100 nodes), seq 4096, bf16, remat of non-matmul
activations."""

from ernie_jax.config import ERNIE_4_5_21B_A3B
from ernie_jax.data import DataConfig
from ernie_jax.training.config import CheckpointConfig, MeshConfig, MoELossConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="a3b_gpu",
        model=ERNIE_4_5_21B_A3B,
        data=DataConfig(seq_len=4096, global_batch_size=32),
        mesh=MeshConfig(data=1, fsdp=8, expert=1, tensor=1, moe_transport="allgather"),
        optim=OptimConfig(lr=2.2e-4, warmup_steps=2000),
        moe_loss=MoELossConfig(aux_loss_coef=1e-5),
        checkpoint=CheckpointConfig(every=1000, keep=3),
        steps=100_000,
        run_dir="runs/a3b_gpu",
        dtype="bfloat16",
        remat="dots",
        platform="gpu",
        min_devices=8,
    )
