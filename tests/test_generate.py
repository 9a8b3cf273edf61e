"""KV-cache generation: greedy equals transformers' generate token for token, cached logits equal the full forward,
sampling filters against numpy, seeds, EOS per row, generation_config.json defaults, streaming."""

from __future__ import annotations

import json
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
from ernie_jax.generate import greedy
from ernie_jax.generation import (
    DecodeSpec,
    GenerationConfig,
    Sampling,
    decode_batch,
    decode_loop,
    prefill,
    top_k_filter,
    top_p_filter,
)
from ernie_jax.generation.sampling import apply_repetition_penalty
from tests.helpers import TINY_DENSE, TINY_MOE, TINY_MOE_INTERVAL, assert_close, hf_model, save_hf

VARIANTS = {"dense_tied": TINY_DENSE, "moe_shared": TINY_MOE, "moe_interval2_bias_untied": TINY_MOE_INTERVAL}
PROMPT_LENGTHS = (5, 12, 1, 9)  # different lengths: the batch is left-padded
NEW_TOKENS = 16
# $ERNIE_TOKENIZER_DIR, else ../shared/data/ERNIE-4.5-0.3B-Base beside the repository root (as test_tokenizer.py)
RELEASED_DIR = os.environ.get(
    "ERNIE_TOKENIZER_DIR",
    os.path.join(
        os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "..", "shared", "data", "ERNIE-4.5-0.3B-Base"
    ),
)
RELEASED_GENERATION_CONFIG = os.path.join(RELEASED_DIR, "generation_config.json")


def make_prompts(lengths=PROMPT_LENGTHS, seed=3, vocab=128):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, vocab, n).tolist() for n in lengths]


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> (our model loaded from the checkpoint transformers wrote, the transformers model)."""
    out = {}
    for name, cfg in VARIANTS.items():
        hf = hf_model(cfg)
        path = save_hf(hf, tmp_path_factory.mktemp(name))
        out[name] = (ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False), hf)
    return out


def hf_generate(hf, prompts, max_new_tokens, eos_token_id=None, pad_token_id=0, **kwargs):
    """transformers' greedy generate on the left-padded batch; new tokens only, cut after each row's EOS."""
    import torch

    width = max(map(len, prompts))
    ids = np.full((len(prompts), width), pad_token_id, np.int64)
    mask = np.zeros_like(ids)
    for i, prompt in enumerate(prompts):
        ids[i, width - len(prompt) :] = prompt
        mask[i, width - len(prompt) :] = 1
    with torch.no_grad():
        out = hf.generate(
            torch.as_tensor(ids),
            attention_mask=torch.as_tensor(mask),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos_token_id,
            pad_token_id=pad_token_id,
            **kwargs,
        )
    rows = out[:, width:].numpy().tolist()
    if eos_token_id is None:
        return rows
    return [row[: row.index(eos_token_id) + 1] if eos_token_id in row else row for row in rows]


@pytest.mark.parametrize("name", list(VARIANTS))
def test_greedy_equals_transformers(checkpoints, name):
    model, hf = checkpoints[name]
    prompts = make_prompts()
    start = time.perf_counter()
    expected = hf_generate(hf, prompts, NEW_TOKENS)
    hf_seconds = time.perf_counter() - start
    ours = ernie_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=None)
    start = time.perf_counter()
    ours = ernie_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=None)
    seconds = time.perf_counter() - start
    assert ours == expected
    assert all(len(row) == NEW_TOKENS for row in ours)
    print(
        f"[generate] {name}: greedy equal to transformers on {len(prompts)} prompts of lengths {PROMPT_LENGTHS}, "
        f"{NEW_TOKENS} new tokens each (ours {seconds * 1e3:.0f} ms compiled, transformers {hf_seconds * 1e3:.0f} ms)"
    )


@pytest.mark.parametrize("name", list(VARIANTS))
def test_rows_stop_independently_at_eos(checkpoints, name):
    """An EOS that row 0 emits mid-way stops row 0 there (EOS included); the other rows match transformers."""
    model, hf = checkpoints[name]
    prompts = make_prompts()
    free = ernie_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=None)
    eos = free[0][NEW_TOKENS // 2]
    ours = ernie_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=eos)
    assert ours == hf_generate(hf, prompts, NEW_TOKENS, eos_token_id=eos)
    assert ours[0][-1] == eos and len(ours[0]) <= NEW_TOKENS // 2 + 1
    assert any(len(row) == NEW_TOKENS and eos not in row for row in ours), "no row ran on past row 0's stop"


@pytest.mark.parametrize("name", list(VARIANTS))
def test_cached_logits_equal_full_forward(checkpoints, name):
    """Every step's logits from the cache equal a full forward over the left-padded prompt plus the tokens so far."""
    model, _ = checkpoints[name]
    spec = DecodeSpec(Sampling(), max_new_tokens=NEW_TOKENS, eos_ids=(), pad_id=0, record_logits=True)
    generated = decode_batch(model, make_prompts(), spec)
    assert generated.steps == NEW_TOKENS
    ids = np.concatenate([generated.prompt_ids, generated.tokens], axis=1)  # [B, P + M]
    slots = np.arange(ids.shape[1])[None, :]
    mask = (slots >= generated.row_start[:, None]).astype(np.int32)
    positions = np.maximum(slots - generated.row_start[:, None], 0)
    full = model(jnp.asarray(ids), attention_mask=jnp.asarray(mask), positions=jnp.asarray(positions))
    width = generated.prompt_ids.shape[1]
    expected = np.asarray(full)[:, width - 1 : width - 1 + NEW_TOKENS]  # logits that chose new token t
    diff = assert_close(generated.logits, expected, np.float32, name)
    print(f"[generate] {name}: cached vs full-forward logits over {NEW_TOKENS} steps, max|d|={diff:.1e}")


def test_greedy_keeps_the_trainer_signature(checkpoints):
    model, hf = checkpoints["moe_shared"]
    prompt = make_prompts()[1]
    out = greedy(model, prompt, 8)
    assert out[: len(prompt)] == prompt and out[len(prompt) :] == hf_generate(hf, [prompt], 8)[0]
    eos = out[len(prompt) + 3]
    assert greedy(model, prompt, 8, eos_id=eos) == out[: len(prompt) + 4]
    assert greedy(model, prompt, 0) == prompt


def test_sampling_is_reproducible_and_top_k_1_is_greedy(checkpoints):
    model, _ = checkpoints["moe_interval2_bias_untied"]
    prompts = make_prompts()
    sample = lambda seed, temperature=1.0, **kw: ernie_jax.generate(
        model, prompts, max_new_tokens=NEW_TOKENS, temperature=temperature, eos_token_id=None, seed=seed, **kw
    )
    first = sample(7, top_p=0.9)
    assert sample(7, top_p=0.9) == first
    assert sample(8, top_p=0.9) != first
    greedy_rows = ernie_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=None)
    assert sample(7, top_k=1) == greedy_rows
    assert sample(9, top_k=1, temperature=5.0) == greedy_rows


def numpy_top_p_kept(logits: np.ndarray, p: float) -> np.ndarray:
    """Reference: per row, the smallest set of most probable tokens whose probabilities sum to at least p."""
    kept = np.zeros(logits.shape, bool)
    for row, values in enumerate(logits.astype(np.float64)):
        probs = np.exp(values - values.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        size = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1  # first prefix whose mass reaches p
        kept[row, order[:size]] = True
    return kept


@pytest.mark.parametrize("p", [0.05, 0.3, 0.8, 0.95, 1.0])
def test_top_p_keeps_the_smallest_set_reaching_p(p):
    logits = np.random.RandomState(0).randn(6, 97).astype(np.float32) * 3
    filtered = np.asarray(top_p_filter(jnp.asarray(logits), p))
    np.testing.assert_array_equal(np.isfinite(filtered), numpy_top_p_kept(logits, p))
    kept = np.isfinite(filtered)
    np.testing.assert_array_equal(filtered[kept], logits[kept])


def test_top_k_and_repetition_penalty_match_references():
    logits = np.random.RandomState(1).randn(3, 40).astype(np.float32)
    filtered = np.asarray(top_k_filter(jnp.asarray(logits), 5))
    expected = logits >= np.sort(logits, axis=-1)[:, -5:-4]
    np.testing.assert_array_equal(np.isfinite(filtered), expected)
    seen = np.random.RandomState(2).rand(3, 40) < 0.3
    penalised = np.asarray(apply_repetition_penalty(jnp.asarray(logits), jnp.asarray(seen), 1.3))
    reference = np.where(seen, np.where(logits < 0, logits * 1.3, logits / 1.3), logits)
    np.testing.assert_allclose(penalised, reference, rtol=1e-6)


def test_repetition_penalty_changes_greedy_output(checkpoints):
    model, _ = checkpoints["moe_shared"]
    prompts = make_prompts()
    plain = ernie_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=None)
    penalised = ernie_jax.generate(
        model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=None, repetition_penalty=1e4
    )
    assert penalised != plain
    for prompt, row in zip(prompts, penalised, strict=True):  # with a huge penalty only unseen tokens are chosen
        assert len(set(row)) == len(row) and not set(row) & set(prompt)


def test_greedy_with_repetition_penalty_equals_transformers(checkpoints):
    """Equal-length prompts: transformers' penalty also counts left padding, ours only the row's own tokens."""
    model, hf = checkpoints["moe_interval2_bias_untied"]
    prompts = make_prompts(lengths=(7, 7, 7))
    kwargs = dict(max_new_tokens=NEW_TOKENS, repetition_penalty=1.5)
    expected = hf_generate(hf, prompts, **kwargs)
    assert ernie_jax.generate(model, prompts, temperature=0.0, eos_token_id=None, **kwargs) == expected


def test_defaults_come_from_generation_config(checkpoints, tmp_path):
    model, _ = checkpoints["moe_shared"]
    prompts = make_prompts()
    released = {"do_sample": True, "top_p": 0.8, "temperature": 0.8, "eos_token_id": 2, "pad_token_id": 0}
    (tmp_path / "generation_config.json").write_text(json.dumps(released))
    config = GenerationConfig.from_pretrained(tmp_path)
    assert config == GenerationConfig(do_sample=True, temperature=0.8, top_p=0.8, eos_token_id=(2,), pad_token_id=0)
    from_file = ernie_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, generation_config=tmp_path, seed=3)
    explicit = ernie_jax.generate(
        model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.8, top_p=0.8, eos_token_id=2, seed=3
    )
    assert from_file == explicit
    (tmp_path / "generation_config.json").write_text(json.dumps({**released, "do_sample": False}))
    greedy_rows = ernie_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, eos_token_id=2)
    assert ernie_jax.generate(model, prompts, max_new_tokens=NEW_TOKENS, generation_config=tmp_path) == greedy_rows
    assert GenerationConfig.from_pretrained(tmp_path / "missing") is None


@pytest.mark.skipif(not os.path.exists(RELEASED_GENERATION_CONFIG), reason="released checkpoint files not present")
def test_released_generation_config_reads():
    config = GenerationConfig.from_pretrained(os.path.dirname(RELEASED_GENERATION_CONFIG))
    assert (config.do_sample, config.temperature, config.top_p, config.eos_token_id) == (True, 0.8, 0.8, (2,))


def test_stream_sees_every_token_in_order(checkpoints):
    model, _ = checkpoints["dense_tied"]
    prompts = make_prompts()[:2]
    steps: list[list[int | None]] = []
    free = ernie_jax.generate(model, prompts, max_new_tokens=8, temperature=0.0, eos_token_id=None)
    eos = free[0][3]
    out = ernie_jax.generate(model, prompts, max_new_tokens=8, temperature=0.0, eos_token_id=eos, stream=steps.append)
    jax.effects_barrier()
    for row, tokens in enumerate(out):
        assert [step[row] for step in steps if step[row] is not None] == tokens
    assert steps[4][0] is None  # row 0 stopped after its EOS at step 3


def test_bad_prompts_are_refused(checkpoints):
    model, _ = checkpoints["dense_tied"]
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        ernie_jax.generate(model, [[5], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        ernie_jax.generate(model, [[5, 500]], max_new_tokens=2)
    assert ernie_jax.generate(model, [[5], [6, 7]], max_new_tokens=0) == [[], []]


def test_decode_loop_runs_on_device_and_donates_the_cache(checkpoints):
    """One while loop on device (no per-token dispatch), and the prefill's cache buffers are reused in place."""
    model, _ = checkpoints["moe_shared"]
    graphdef, params = nnx.split(model)
    spec = DecodeSpec(Sampling(), max_new_tokens=8, eos_ids=(), pad_id=0)
    prompt_ids = np.ones((2, 16), np.int32)
    row_start, done, key = np.array([3, 0], np.int32), np.zeros(2, bool), jax.random.key(0)
    state = prefill(graphdef, params, prompt_ids, row_start, done, key, spec=spec, cache_size=24)
    keys = state.cache.layers[0][0].keys
    assert keys.shape == (1, 2, 24, TINY_MOE.num_key_value_heads, TINY_MOE.resolved_head_dim)  # K heads, not N
    lowered = decode_loop.lower(graphdef, params, state, key, spec=spec).as_text()
    assert "stablehlo.while" in lowered
    final = decode_loop(graphdef, params, state, key, spec=spec)
    assert keys.is_deleted(), "the cache was copied, not donated"
    assert int(final.step) == 8 and int(final.cache.fill) == 16 + 7
