"""ERNIE-4.5-VL-28B-A3B supervised fine-tuning (data.format=vl_sft) on a TPU v5p-64 slice (32 chips; Cloud v5p-N
counts TensorCores, 2 per chip): FSDP 4 x expert 8, both expert pools (64 text experts of width 1536, 64 vision
experts of width 512, 6 of each pool per token) split 8 ways, bf16, full remat, a chunked LM-head loss.

Rows of 4096 tokens carry up to 4096 image patches (four 448 x 448 images, 1024 image tokens). The architecture is
transformers' Ernie4_5_VLMoeConfig defaults, which are the released checkpoint's; start from it with
`--init-from-hf path/to/ERNIE-4.5-VL-28B-A3B-PT data.tokenizer=path/to/ERNIE-4.5-VL-28B-A3B-PT`.
Check the fit from a CPU host first: `python -m ernie_jax.aot --config=vl_a3b_tpu --topology=v5p-64`.
"""

from ernie_jax.data import DataConfig
from ernie_jax.training.config import CheckpointConfig, MeshConfig, MoELossConfig, OptimConfig, TrainConfig
from ernie_jax.vl import VLConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="vl_a3b_tpu",
        model=VLConfig(),  # 28 layers (layer 0 dense), 2560 wide; vision tower 32 x 1280; 29.4B parameters
        data=DataConfig(format="vl_sft", seq_len=4096, vision_patches=4096, global_batch_size=128),
        mesh=MeshConfig(data=1, fsdp=4, expert=8, tensor=1, moe_transport="ragged_a2a", moe_buffer_factor=2.0),
        optim=OptimConfig(lr=1e-5, min_lr_ratio=0.1, warmup_steps=100, weight_decay=0.1, clip_norm=1.0),
        moe_loss=MoELossConfig(aux_loss_coef=1e-5, z_loss_coef=1e-4, ortho_loss_coef=1e-3, bias_update_rate=1e-3),
        checkpoint=CheckpointConfig(every=500, keep=3),
        steps=5_000,
        run_dir="runs/vl_a3b_tpu",
        dtype="bfloat16",
        remat="full",
        loss_chunk=1024,  # LM-head logits a chunk at a time, as a3b_tpu
        sample_tokens=0,
        platform="tpu",
        min_devices=32,
    )
