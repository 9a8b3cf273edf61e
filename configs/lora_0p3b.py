"""LoRA SFT of ERNIE-4.5-0.3B on any backend: adapters of rank 8 on every projection, the base frozen in bf16.

    python -m ernie_jax.train --config=lora_0p3b --init-from-hf BASE data.sources=SFT.jsonl data.tokenizer=BASE \
        export_hf=MERGED export_peft=ADAPTER

BASE is a Hugging Face ERNIE-4.5-0.3B directory with its tokenizer files; SFT.jsonl holds conversations (OpenAI-style
`messages` or ERNIEKit's src/tgt, see README "Fine-tuning"). Loss on the assistant's replies only.
"""

from ernie_jax.config import ERNIE_4_5_0P3B
from ernie_jax.data import DataConfig
from ernie_jax.lora import LoRAConfig
from ernie_jax.training.config import CheckpointConfig, MeshConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    return TrainConfig(
        name="lora_0p3b",
        model=ERNIE_4_5_0P3B,
        data=DataConfig(format="sft", seq_len=2048, global_batch_size=16, num_epochs=None),
        mesh=MeshConfig(data=-1),
        # ERNIEKit's LoRA defaults: rank 8, alpha 2 * rank; a LoRA learning rate (adapters start at B = 0).
        lora=LoRAConfig(rank=8, base_dtype="bfloat16"),
        optim=OptimConfig(lr=2e-4, warmup_steps=20, weight_decay=0.0, min_lr_ratio=0.1),
        checkpoint=CheckpointConfig(every=200, keep=2),
        steps=1000,
        run_dir="runs/lora_0p3b",
        dtype="bfloat16",
        remat="dots",
        sample_tokens=0,
    )
