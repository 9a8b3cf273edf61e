"""Text generation with a KV cache: prefill, an on-device decode loop, sampling, generation_config.json defaults."""

from ernie_jax.generation.api import generate, greedy, resolve_generation_config
from ernie_jax.generation.config import GenerationConfig
from ernie_jax.generation.decode import (
    DecodeSpec,
    DecodeState,
    Generated,
    decode_batch,
    decode_loop,
    new_tokens_per_row,
    prefill,
)
from ernie_jax.generation.sampling import Sampling, choose_tokens, top_k_filter, top_p_filter

__all__ = [
    "DecodeSpec",
    "DecodeState",
    "GenerationConfig",
    "Generated",
    "Sampling",
    "choose_tokens",
    "decode_batch",
    "decode_loop",
    "generate",
    "greedy",
    "new_tokens_per_row",
    "prefill",
    "resolve_generation_config",
    "top_k_filter",
    "top_p_filter",
]
