"""`generate`: transformers-like generation for ErnieForCausalLM, and `greedy`, the trainer's sample."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Sequence

from jax.sharding import Mesh

import sharding
from ernie_jax.generation.config import GenerationConfig
from ernie_jax.generation.decode import DecodeSpec, StreamFn, decode_batch, new_tokens_per_row
from ernie_jax.generation.sampling import Sampling
from ernie_jax.model import with_options

log = logging.getLogger(__name__)

FROM_CONFIG = ...  # default of an argument whose value comes from the generation config


def resolve_generation_config(model, generation_config: GenerationConfig | str | os.PathLike | None):
    """The generation config to take defaults from: the argument (a config or a checkpoint directory), else the
    one `from_pretrained` attached to the model, else greedy with the model config's EOS and padding ids."""
    if isinstance(generation_config, (str, os.PathLike)):
        generation_config = GenerationConfig.from_pretrained(generation_config)
    if generation_config is None:
        generation_config = getattr(model, "generation_config", None)
    if generation_config is None:
        eos = model.config.eos_token_id
        generation_config = GenerationConfig(eos_token_id=None if eos is None else (eos,))
    return generation_config


def generate(
    model,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = FROM_CONFIG,
    top_k: int | None = FROM_CONFIG,
    top_p: float | None = FROM_CONFIG,
    repetition_penalty: float = FROM_CONFIG,
    eos_token_id: int | Sequence[int] | None = FROM_CONFIG,
    pad_token_id: int = FROM_CONFIG,
    seed: int = 0,
    generation_config: GenerationConfig | str | os.PathLike | None = None,
    stream: StreamFn | None = None,
    mesh: Mesh | None = None,
    moe_transport: str | None = None,
    speculative: str | None = None,
    images: Sequence[Sequence] | None = None,
    image_processor=None,
) -> list[list[int]]:
    """Continue each prompt (a list of token ids; lengths may differ) by up to `max_new_tokens` tokens.

    Returns one list of *new* token ids per prompt, ending at and including the first EOS when the row stops
    there. Rows stop independently; `eos_token_id=None` never stops early.

    Arguments left out take the generation config's value (`generation_config`, a GenerationConfig or a checkpoint
    directory holding generation_config.json; else the model's `generation_config` attribute; else greedy with
    the model config's EOS). `temperature=0.0` is greedy; with `do_sample: false` in the config the default
    temperature is 0. top_k / top_p None disable the filter. The same `seed` gives the same samples.
    The repetition penalty sees each row's prompt and generated tokens, not its padding.
    `stream(tokens)` is called from the device loop after every step, one entry per prompt (None once stopped);
    the callable is part of the compiled loop's cache key, so pass the same one again to reuse the compile.
    With `mesh=` (the mesh the model was loaded onto; or inside `sharding.use_mesh(...)`) the batch and the cache
    are sharded over it (the batch padded with idle rows to divide it) and MoE layers run expert-parallel with
    the model's own run options (`model.options`), or with `moe_transport` when given.
    `speculative="mtp"` drafts each next token with the model's MTP head and verifies it with the main model in the
    same forward (up to two tokens per forward): greedy output is plain greedy's token for token, and sampling
    keeps the model's distribution (standard speculative sampling). The acceptance rate is logged.
    `images` (ERNIE-4.5-VL models): per prompt, a list of images ([H, W, C] numpy arrays, possibly empty), the k-th
    shown where the prompt's k-th run of image placeholder ids stands: one placeholder is expanded to the image's
    token count, as transformers' processor does, or the run already has that count. They are preprocessed by
    `image_processor` (an `ernie_jax.vl.ImageProcessor`; default ERNIE-4.5-VL's with the model's patch and merge
    sizes); the returned tokens follow the prompt as given.
    """
    if moe_transport is not None and moe_transport != model.options.moe_transport:
        model = with_options(model, moe_transport=moe_transport, moe_buffer_factor=0.0)
    config = resolve_generation_config(model, generation_config)
    if temperature is FROM_CONFIG:
        temperature = config.temperature if config.do_sample else 0.0
    if top_k is FROM_CONFIG:
        top_k = config.top_k
    if top_p is FROM_CONFIG:
        top_p = config.top_p
    if repetition_penalty is FROM_CONFIG:
        repetition_penalty = config.repetition_penalty
    if eos_token_id is FROM_CONFIG:
        eos_token_id = config.eos_token_id
    if pad_token_id is FROM_CONFIG:
        pad_token_id = config.pad_token_id if config.pad_token_id is not None else model.config.pad_token_id or 0
    eos_ids = () if eos_token_id is None else (eos_token_id,) if isinstance(eos_token_id, int) else eos_token_id
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if max_new_tokens == 0:
        return [[] for _ in prompts]
    if speculative not in (None, "mtp"):
        raise ValueError(f"speculative: None or 'mtp', got {speculative!r}")
    if speculative and getattr(model, "mtp", None) is None:
        raise ValueError("speculative='mtp': this model has no MTP head (config num_nextn_predict_layers=0)")
    if speculative and repetition_penalty != 1.0:
        raise ValueError("speculative='mtp' with a repetition penalty is not supported; use repetition_penalty=1.0")
    spec = DecodeSpec(
        sampling=Sampling(float(temperature), top_k, top_p, float(repetition_penalty)),
        max_new_tokens=int(max_new_tokens),
        eos_ids=tuple(int(i) for i in eos_ids),
        pad_id=int(pad_token_id),
        stream=stream,
        speculative=bool(speculative),
    )
    prompt_inputs = None
    if images is not None:
        from ernie_jax.vl.generation import image_prompts  # text generation never loads the VL package

        prompts, prompt_inputs = image_prompts(model, prompts, images, image_processor)
    with sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
        generated = decode_batch(model, prompts, spec, seed=seed, prompt_inputs=prompt_inputs)
    if generated.stats is not None:
        st = generated.stats
        log.info(
            "speculative (mtp): %d of %d drafts accepted (%.0f%%), %.2f tokens per main-model forward",
            st["accepted"],
            st["drafted"],
            100 * st["acceptance"],
            st["tokens_per_forward"],
        )
    return new_tokens_per_row(generated, spec.eos_ids)


def greedy(model, prompt_ids: list[int], max_new_tokens: int, eos_id: int | None = None) -> list[int]:
    """The prompt extended greedily by up to `max_new_tokens` tokens (stopping after `eos_id`), prompt included."""
    new = generate(model, [prompt_ids], max_new_tokens=max_new_tokens, temperature=0.0, eos_token_id=eos_id)[0]
    return [*prompt_ids, *new]
