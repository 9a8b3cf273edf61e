"""Chunked (sequence-tiled) cross-entropy: the same loss and gradients as the whole-sequence loss, in a bare loss
and in a full train step, and a chunk that does not divide the sequence is refused by name."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from ernie_jax.config import ConfigError
from ernie_jax.model import ErnieForCausalLM
from ernie_jax.training import loop as train_mod
from ernie_jax.training.config import apply_overrides, load_preset
from ernie_jax.training.losses import chunked_cross_entropy_sum, cross_entropy_sum
from ernie_jax.training.optim import make_optimizer
from ernie_jax.training.state import model_creator, split_model
from ernie_jax.training.step import make_train_step
from tests.helpers import SMALL_TRAIN_OVERRIDES, TINY_MOE, TINY_MOE_INTERVAL, assert_close, random_ids

B, T, CHUNK = 2, 16, 4


def _mask(batch: int, length: int, seed: int = 0) -> jnp.ndarray:
    """A loss mask with about a quarter of the tokens off, spread over every chunk."""
    return jnp.asarray(np.random.RandomState(seed).rand(batch, length) > 0.25, jnp.float32)


def _head_paths(cfg) -> list[str]:
    return ["embed" if cfg.tie_word_embeddings else "lm_head"] + (["lm_head_bias"] if cfg.lm_head_has_bias else [])


@pytest.mark.parametrize(
    "cfg",
    [TINY_MOE.replace(use_bias=True), TINY_MOE_INTERVAL],  # tied head + bias; untied head + bias
    ids=["tied", "untied"],
)
def test_chunked_loss_and_grads_match_whole_sequence(cfg):
    assert cfg.lm_head_has_bias and (cfg.tie_word_embeddings == (cfg is not TINY_MOE_INTERVAL))
    model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    ids = jnp.asarray(random_ids(B, T, cfg.vocab_size, seed=1))
    targets = jnp.asarray(random_ids(B, T, cfg.vocab_size, seed=2))
    mask = _mask(B, T)
    assert 0 < float(mask.sum()) < B * T

    # The split head is the old head: model(ids) is logits_from_hidden of the hidden states, bit for bit.
    h = model(ids, return_hidden=True)  # [B, T, D]
    np.testing.assert_array_equal(np.asarray(model(ids)), np.asarray(model.logits_from_hidden(h)))

    def loss(params, chunk: int):
        m = nnx.merge(graphdef, params, rest)
        h = m(ids, return_hidden=True)
        if chunk:
            return chunked_cross_entropy_sum(h, m.logits_from_hidden, targets, mask, chunk)
        return cross_entropy_sum(m.logits_from_hidden(h), targets, mask)

    grad = jax.jit(jax.value_and_grad(loss), static_argnums=1)
    whole, g_whole = grad(params, 0)
    chunked, g_chunked = grad(params, CHUNK)
    diffs = {"loss": assert_close(chunked, whole, jnp.float32, "loss")}
    flat_whole = dict(nnx.to_flat_state(g_whole))
    flat_chunked = dict(nnx.to_flat_state(g_chunked))
    assert flat_whole.keys() == flat_chunked.keys()
    for path, v in flat_whole.items():
        name = "/".join(map(str, path))
        diffs[name] = assert_close(flat_chunked[path].get_value(), v.get_value(), jnp.float32, name)
    # The head's gradient sums over every chunk: each of them must carry weight well above the tolerance, or
    # dropping a chunk's contribution (or the head's whole gradient) could pass unnoticed.
    for name in _head_paths(cfg):
        g = np.asarray(flat_whole[(name,)].get_value())
        assert np.max(np.abs(g)) > 1e-2, name
    print(
        f"{cfg.tie_word_embeddings=}: max |chunked - whole| loss {diffs['loss']:.3g}, grads {max(diffs.values()):.3g}"
    )


def test_one_chunk_per_token_and_bad_chunk():
    cfg = TINY_MOE
    model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(0))
    ids = jnp.asarray(random_ids(B, T, cfg.vocab_size, seed=3))
    mask = _mask(B, T, seed=4)
    h = model(ids, return_hidden=True)
    whole = cross_entropy_sum(model.logits_from_hidden(h), ids, mask)
    for chunk in (1, T):  # the extremes: one token per chunk, and a single chunk
        assert_close(chunked_cross_entropy_sum(h, model.logits_from_hidden, ids, mask, chunk), whole, jnp.float32)
    for bad in (0, 5, -4):
        with pytest.raises(ValueError, match="loss_chunk"):
            chunked_cross_entropy_sum(h, model.logits_from_hidden, ids, mask, bad)


def _step_metrics(cfg, batch):
    model = model_creator(cfg)()
    graphdef, params, biases = split_model(model)
    optimizer = make_optimizer(cfg.optim, cfg.steps, params)
    step = jax.jit(make_train_step(graphdef, cfg, optimizer))
    new_params, _, _, metrics = step(params, biases, optimizer.init(params), batch, jnp.zeros((), jnp.int32))
    return new_params, metrics


@pytest.mark.parametrize("accum", [1, 2])
def test_train_step_with_loss_chunk_matches_whole_sequence(accum):
    # No warmup, so the first step's update is not zero and the updated parameters are compared too.
    overrides = [*SMALL_TRAIN_OVERRIDES, "optim.warmup_steps=0", f"optim.grad_accum={accum}"]
    base = apply_overrides(load_preset("tiny"), overrides)
    chunked_cfg = apply_overrides(base, ["loss_chunk=8"])
    assert base.loss_chunk == 0 and chunked_cfg.loss_chunk == 8
    b, t, v = base.data.global_batch_size, base.data.seq_len, base.model.vocab_size
    ids = random_ids(b, t + 1, v, seed=5)
    batch = dict(
        input_ids=jnp.asarray(ids[:, :-1]),
        targets=jnp.asarray(ids[:, 1:]),
        segment_ids=jnp.ones((b, t), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        loss_mask=_mask(b, t, seed=6),
    )
    params_whole, whole = _step_metrics(base, batch)
    params_chunked, chunked = _step_metrics(chunked_cfg, batch)
    params_before = dict(nnx.to_flat_state(split_model(model_creator(base)())[1]))
    moved = [
        p for p, v in nnx.to_flat_state(params_whole) if not np.array_equal(v.get_value(), params_before[p].get_value())
    ]
    assert ("embed",) in moved, "the step did not update the head"
    diffs = {k: assert_close(chunked[k], whole[k], jnp.float32, k) for k in ("loss", "ce", "grad_norm", "tokens")}
    flat_whole = dict(nnx.to_flat_state(params_whole))
    for path, v in nnx.to_flat_state(params_chunked):
        name = "/".join(map(str, path))
        diffs[name] = assert_close(v.get_value(), flat_whole[path].get_value(), jnp.float32, name)
    print(f"accum={accum}: max |chunked - whole| metrics/params {max(diffs.values()):.3g}")


def test_loss_chunk_config_is_validated_and_overridable(capsys):
    cfg, _ = train_mod.parse_args(["loss_chunk=64"])  # the tiny preset: data.seq_len=128
    assert cfg.loss_chunk == 64
    with pytest.raises(ConfigError, match=r"loss_chunk: 48 must divide data.seq_len=128"):
        train_mod.parse_args(["loss_chunk=48"])
    with pytest.raises(ConfigError, match="loss_chunk"):
        train_mod.parse_args(["loss_chunk=-1"])
    with pytest.raises(ConfigError, match="loss_chunk"):  # re-validated when seq_len changes under it
        dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, seq_len=96))
    with pytest.raises(SystemExit):
        train_mod.parse_args(["--help"])
    assert "loss_chunk (int) = 0" in capsys.readouterr().out
