"""`python -m ernie_jax.generate --model DIR [--chat] [--prompt TEXT]`: generate or chat from a checkpoint directory.

`ernie_jax.generate(model, prompts, ...)` is the API (ernie_jax/generation/); `from ernie_jax.generate import
greedy` is the trainer's sample. This module is callable as `generate` itself, because importing it makes
`ernie_jax.generate` name the module rather than the function (a submodule import rebinds the package attribute).
"""

from __future__ import annotations

import sys
import types

from ernie_jax.generation import GenerationConfig, generate, greedy

__all__ = ["GenerationConfig", "generate", "greedy"]


class _CallableModule(types.ModuleType):
    """`ernie_jax.generate(...)` keeps working after `import ernie_jax.generate` rebinds the package attribute."""

    def __call__(self, *args, **kwargs):
        return generate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
