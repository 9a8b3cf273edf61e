"""ERNIE 4.5 in JAX/Flax NNX: exact Hugging Face parity, expert parallelism, Pallas kernels."""

from ernie_jax import runtime_env

runtime_env.configure()  # before any JAX backend starts

# ruff: noqa: E402

from ernie_jax.config import ARCHITECTURES, ConfigError, ErnieConfig
from ernie_jax.generation import GenerationConfig, generate
from ernie_jax.hf.checkpoint import CheckpointError, from_pretrained, save_pretrained
from ernie_jax.model import ErnieForCausalLM, abstract_model
from ernie_jax.options import ModelOptions
from ernie_jax.quant import quantize
from ernie_jax.tokenizer import Tokenizer
from ernie_jax.vl import ErnieVLForConditionalGeneration

__all__ = [
    "ARCHITECTURES",
    "CheckpointError",
    "ConfigError",
    "ErnieConfig",
    "ErnieForCausalLM",
    "GenerationConfig",
    "ErnieVLForConditionalGeneration",
    "ModelOptions",
    "Tokenizer",
    "abstract_model",
    "from_pretrained",
    "generate",
    "quantize",
    "save_pretrained",
]
