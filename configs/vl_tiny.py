"""A small ERNIE-4.5-VL (the 28B-A3B layout, shrunk) for VL SFT on CPU: `data.format=vl_sft` conversations with
images. ERNIE's 103,424-token vocabulary, so a VL checkpoint's tokenizer (with its image tokens) fits:

    python -m ernie_jax.train --config=vl_tiny data.sources=chats.jsonl data.tokenizer=path/to/VL-checkpoint

Rows hold 128 tokens and 256 image patches (four 112 x 112 images; the image processor comes from the tokenizer
directory's preprocessor_config.json, else ERNIE-4.5-VL's defaults, which allow far larger images).
"""

from ernie_jax.data import DataConfig
from ernie_jax.training.config import CheckpointConfig, MeshConfig, OptimConfig, TrainConfig
from ernie_jax.vl import VisionConfig, VLConfig, VLTextConfig


def get_config() -> TrainConfig:
    model = VLConfig(
        text=VLTextConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,  # layer 0 dense, layers 1-2 modality-isolated MoE, as in 28B-A3B
            num_attention_heads=4,
            num_key_value_heads=2,
            head_dim=16,
            mrope_section=(3, 3, 2),  # (h, w, t) frequency pairs: head_dim / 2
            max_position_embeddings=1024,
            moe_num_experts=8,
            moe_k=2,
            moe_intermediate_size=(32, 16),  # text experts wider than vision experts
            moe_num_shared_experts=1,
        ),
        vision=VisionConfig(depth=2, hidden_size=64, num_heads=4, intermediate_size=128),
    )
    return TrainConfig(
        name="vl_tiny",
        model=model,
        data=DataConfig(format="vl_sft", seq_len=128, vision_patches=256, global_batch_size=8),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=10, decay="cosine", min_lr_ratio=0.1, weight_decay=0.01),
        checkpoint=CheckpointConfig(every=50, keep=2),
        steps=100,
        run_dir="runs/vl_tiny",
        dtype="float32",
        loss_chunk=32,  # the LM head over 103,424 ids a slice of the row at a time
        log_every=5,
        sample_tokens=0,
    )
