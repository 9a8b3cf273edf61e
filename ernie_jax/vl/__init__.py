"""ERNIE 4.5 VL (`ernie4_5_vl_moe`) in Flax NNX: vision tower, resampler and the heterogeneous multimodal MoE decoder,
exact against transformers' `Ernie4_5_VLMoeForConditionalGeneration`.

    model = ernie_jax.vl.from_pretrained("path/to/vl-checkpoint", dtype=jnp.float32)
    logits = model(input_ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=types,
                   moe_mm_token_type_ids=ernie_jax.vl.moe_token_types(input_ids, model.config))
    ernie_jax.vl.save_pretrained(model, "out/")

    batch = ernie_jax.vl.ImageProcessor.from_pretrained("path/to/vl-checkpoint")([image_hwc_uint8])
    # batch["pixel_values"] [N, C*P*P] float32, batch["image_grid_thw"] [n, 3], as transformers' processor

    new = ernie_jax.generate(model, [prompt_ids], images=[[image_hwc_uint8]], max_new_tokens=64)  # generation.py

Training: `python -m ernie_jax.train --config=vl_tiny data.format=vl_sft ...` reads {"images", "messages"} rows
(`sft.py`) into packed rows that `model(...)` runs with static shapes (see its docstring).
"""

from ernie_jax.vl.checkpoint import from_pretrained, save_pretrained
from ernie_jax.vl.config import VisionConfig, VLConfig, VLTextConfig
from ernie_jax.vl.model import (
    ErnieVLForConditionalGeneration,
    abstract_model,
    modality_router_losses,
    moe_token_types,
)
from ernie_jax.vl.processor import ImageProcessor, smart_resize
from ernie_jax.vl.rope import rope_index

__all__ = [
    "ErnieVLForConditionalGeneration",
    "ImageProcessor",
    "VLConfig",
    "VLTextConfig",
    "VisionConfig",
    "abstract_model",
    "from_pretrained",
    "modality_router_losses",
    "moe_token_types",
    "rope_index",
    "save_pretrained",
    "smart_resize",
]
