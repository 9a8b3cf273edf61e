"""The embedded default: a small ERNIE MoE (the 21B-A3B layout, shrunk) trained on CPU from text shipped with Python.

About 2½ to 3 minutes on 2 CPU cores (145–174 s measured): the loss clearly falls, a checkpoint is written,
a greedy sample is printed. It carries one MTP depth, trained alongside (mtp.depth=1), so the result can draft for
speculative decoding.
"""

from ernie_jax.config import ERNIE_4_5_21B_A3B
from ernie_jax.data import DataConfig
from ernie_jax.training.config import CheckpointConfig, MeshConfig, MTPConfig, OptimConfig, TrainConfig


def get_config() -> TrainConfig:
    model = ERNIE_4_5_21B_A3B.replace(
        vocab_size=264,  # byte tokenizer (259 ids) rounded up
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,  # layer 0 dense, layers 1-3 MoE, as in 21B-A3B
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=1024,
        moe_num_experts=8,
        moe_k=2,
        moe_intermediate_size=96,
        moe_num_shared_experts=1,
        moe_layer_end_index=-1,
        num_nextn_predict_layers=1,  # an MTP head, as the released -PT checkpoints carry
    )
    return TrainConfig(
        name="tiny",
        model=model,
        data=DataConfig(sources=("builtin:python-docs",), tokenizer="bytes", seq_len=128, global_batch_size=16),
        mesh=MeshConfig(data=-1),
        optim=OptimConfig(lr=3e-3, warmup_steps=30, decay="cosine", min_lr_ratio=0.1, weight_decay=0.01),
        checkpoint=CheckpointConfig(every=100, keep=2),
        # Saving only the matmul outputs for the backward and recomputing the elementwise work is faster on XLA:CPU
        # than stacking every saved activation per layer: the 900-step run took 228 s against 259 s with "none",
        # back to back, with the same final loss (benchmarks/cpu_profile.py --remat shows the step alone). With the
        # layers unrolled (below), "none" and "dots_all" measure the same.
        remat="dots_all",
        # Four layers compile quickly unrolled, and XLA:CPU then runs the step without the scan's loop and its
        # stacking of each layer's saved activations (benchmarks/cpu_profile.py --[no-]scan-layers shows the step).
        scan_layers=False,
        mtp=MTPConfig(depth=1, loss_weight=0.3),  # ERNIEKit's MTP weight
        steps=900,
        run_dir="runs/tiny",
        dtype="float32",
        log_every=10,
        sample_prompt="The ",
        sample_tokens=80,
    )
