"""Greedy decoding for samples and smoke checks (no KV cache: one jitted full forward per token)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """Extend `prompt_ids` greedily. The sequence lives in a fixed-length buffer, so there is one compile."""
    total = len(prompt_ids) + max_new_tokens
    graphdef, state = nnx.split(model)

    @jax.jit
    def next_token(state, ids, length):
        logits = nnx.merge(graphdef, state)(ids)  # causal: tokens after `length` do not affect earlier logits
        return jnp.argmax(logits[0, length - 1]).astype(jnp.int32)

    ids = np.zeros((1, total), np.int32)
    ids[0, : len(prompt_ids)] = prompt_ids
    length = len(prompt_ids)
    while length < total:
        token = int(next_token(state, jnp.asarray(ids), length))
        ids[0, length] = token
        length += 1
        if eos_id is not None and token == eos_id:
            break
    return ids[0, :length].tolist()
