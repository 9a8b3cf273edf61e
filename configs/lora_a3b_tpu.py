"""LoRA SFT of ERNIE-4.5-21B-A3B on a small TPU slice: v5e-8 (8 chips of 16 GB), where full fine-tuning does not fit
(fp32 master weights and Adam state alone are 33 GB per chip). Adapters of rank 16 on every projection, routed experts
included; the base frozen in bf16 and split over the 8 chips by experts; 8 x 4096 tokens per step.

    python -m ernie_jax.aot --config=lora_a3b_tpu --topology=v5e-8            # fits (README "Fine-tuning")
    python -m ernie_jax.aot --config=lora_a3b_tpu --topology=v5e-8 lora.rank=0 lora.base_dtype=param   # does not
    python -m ernie_jax.train --config=lora_a3b_tpu --init-from-hf BASE data.sources=SFT.jsonl data.tokenizer=BASE
"""

from ernie_jax.config import ERNIE_4_5_21B_A3B
from ernie_jax.data import DataConfig
from ernie_jax.lora import LoRAConfig
from ernie_jax.training.config import CheckpointConfig, MeshConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="lora_a3b_tpu",
        model=ERNIE_4_5_21B_A3B,
        data=DataConfig(format="sft", seq_len=4096, global_batch_size=8),
        mesh=MeshConfig(data=1, fsdp=1, expert=8, tensor=1, moe_transport="ragged_a2a", moe_buffer_factor=2.0),
        lora=LoRAConfig(rank=16, base_dtype="bfloat16"),
        optim=OptimConfig(lr=2e-4, warmup_steps=20, weight_decay=0.0),
        checkpoint=CheckpointConfig(every=200, keep=2),
        steps=2000,
        run_dir="runs/lora_a3b_tpu",
        dtype="bfloat16",
        remat="full",
        loss_chunk=1024,
        sample_tokens=0,
        platform="tpu",
        min_devices=8,
    )
