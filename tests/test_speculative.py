"""Speculative decoding with the MTP head: greedy output is plain greedy's token for token (drafts accepted or
not, rows stopping at EOS), and the acceptance rule leaves the target distribution exactly as it is."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
import sharding
from ernie_jax.generation import DecodeSpec, Sampling, decode_batch
from ernie_jax.generation.sampling import accept_draft
from ernie_jax.model import ErnieForCausalLM
from tests.helpers import TINY_DENSE, TINY_MOE

# A small vocabulary, so that a random MTP head's drafts are right often enough to exercise both branches.
SPEC_DENSE = TINY_DENSE.replace(vocab_size=12, num_nextn_predict_layers=1)
SPEC_MOE = TINY_MOE.replace(vocab_size=12, num_nextn_predict_layers=1, use_bias=True)
PROMPTS = [[3, 5, 7, 1, 2], [4], [9, 9, 8]]


def _model(cfg, seed=0):
    model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(seed))
    if model.lm_head_bias is not None:
        # Two favourite tokens for the main model and the MTP head alike (they share the head): a random MTP head
        # then guesses right about half the time, so accepted and rejected drafts both occur.
        model.lm_head_bias.set_value(jnp.zeros(cfg.vocab_size).at[jnp.array([5, 7])].set(4.0))
    return model


@pytest.mark.parametrize("cfg", [SPEC_DENSE, SPEC_MOE], ids=["dense", "moe_bias"])
def test_greedy_speculative_equals_plain_greedy(cfg):
    model = _model(cfg)
    plain = ernie_jax.generate(model, PROMPTS, max_new_tokens=20, temperature=0.0, eos_token_id=None)
    spec = DecodeSpec(Sampling(), max_new_tokens=20, eos_ids=(), pad_id=0, speculative=True)
    generated = decode_batch(model, PROMPTS, spec)
    drafts = [row[:20] for row in generated.tokens.tolist()]
    assert drafts == plain
    stats = generated.stats
    if model.lm_head_bias is not None:
        assert 0 < stats["accepted"] < stats["drafted"], stats  # both branches ran
    print(f"[speculative] {cfg.model_type} greedy: equal to plain greedy; acceptance {stats['acceptance']:.0%}")


def test_greedy_speculative_stops_rows_at_eos_like_plain_greedy():
    model = _model(SPEC_DENSE, seed=1)
    plain = ernie_jax.generate(model, PROMPTS, max_new_tokens=16, temperature=0.0, eos_token_id=None)
    eos = max(set(t for row in plain for t in row), key=lambda t: sum(row.count(t) for row in plain))
    want = ernie_jax.generate(model, PROMPTS, max_new_tokens=16, temperature=0.0, eos_token_id=eos)
    got = ernie_jax.generate(model, PROMPTS, max_new_tokens=16, temperature=0.0, eos_token_id=eos, speculative="mtp")
    assert got == want and any(len(row) < 16 for row in want)


def test_speculative_sampling_is_reproducible_and_refuses_what_it_cannot_do():
    model = _model(SPEC_DENSE)
    run = lambda seed: ernie_jax.generate(
        model, PROMPTS, max_new_tokens=8, temperature=0.9, top_k=6, seed=seed, speculative="mtp"
    )
    assert run(3) == run(3)
    with pytest.raises(ValueError, match="repetition penalty"):
        ernie_jax.generate(model, PROMPTS, max_new_tokens=4, repetition_penalty=1.2, speculative="mtp")
    with pytest.raises(ValueError, match="no MTP head"):
        ernie_jax.generate(_model(TINY_DENSE), PROMPTS, max_new_tokens=4, speculative="mtp")


def test_acceptance_rule_keeps_the_target_distribution():
    """Drafts drawn from q, accepted or replaced by accept_draft: the tokens come out distributed as p (chi-square
    over 200k independent rows), however far q is from p; and p == q accepts everything."""
    p = jnp.array([0.5, 0.2, 0.15, 0.1, 0.05, 0.0])
    q = jnp.array([0.05, 0.05, 0.1, 0.3, 0.3, 0.2])
    n = 200_000
    draft_key, accept_key = jax.random.split(jax.random.key(0))
    drafts = jax.random.categorical(draft_key, jnp.log(jnp.broadcast_to(q, (n, 6))), axis=-1).astype(jnp.int32)
    accepted, tokens = accept_draft(jnp.broadcast_to(p, (n, 6)), jnp.broadcast_to(q, (n, 6)), drafts, accept_key)
    counts = np.bincount(np.asarray(tokens), minlength=6)
    expected = np.asarray(p) * n
    nonzero = expected > 0
    chi2 = float(np.sum((counts[nonzero] - expected[nonzero]) ** 2 / expected[nonzero]))
    assert counts[~nonzero].sum() == 0 and chi2 < 20.5  # 4 degrees of freedom: p ~ 4e-4
    # The acceptance rate of speculative sampling is sum_v min(p, q).
    np.testing.assert_allclose(float(jnp.mean(accepted)), float(jnp.sum(jnp.minimum(p, q))), atol=0.005)
    same, _ = accept_draft(jnp.broadcast_to(p, (64, 6)), jnp.broadcast_to(p, (64, 6)), drafts[:64], accept_key)
    assert bool(jnp.all(same[np.asarray(p)[np.asarray(drafts[:64])] > 0]))


def test_speculative_on_the_eight_device_mesh_equals_one_device():
    if jax.device_count() < 8:
        pytest.skip("needs the 8 emulated CPU devices of tests/conftest.py")
    mesh = sharding.make_mesh(data=2, expert=4)
    model = _model(SPEC_MOE)
    one = ernie_jax.generate(model, PROMPTS, max_new_tokens=10, temperature=0.0, eos_token_id=None, speculative="mtp")
    sharded = ernie_jax.generate(
        model, PROMPTS, max_new_tokens=10, temperature=0.0, eos_token_id=None, speculative="mtp", mesh=mesh
    )
    assert sharded == one
