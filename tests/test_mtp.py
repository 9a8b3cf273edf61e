"""Multi-token prediction: the MTP head's forward against a numpy reference written from Paddle's formula, its
tensors through save_pretrained / from_pretrained (and the transposed released variant), and MTP training.

Reference (per depth d, position t): x = concat(emb_norm(E[ids[t + d + 1]]), hidden_norm(h_t)) @ P, where h is the
main model's last-layer output (before the final norm) for d = 0 and the previous depth's block output after;
h'_t = dense decoder layer(x); logits = lm_head(final_norm(h')) predicts ids[t + d + 2].
"""

from __future__ import annotations

import contextlib
import json
import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import ernie_jax
from ernie_jax.model import ErnieForCausalLM
from ernie_jax.training import loop as train_mod
from ernie_jax.training.config import ConfigError, apply_overrides, load_preset
from tests.helpers import SMALL_TRAIN_OVERRIDES, TINY_DENSE, TINY_MOE, assert_close, hf_logits, hf_model, random_ids
from tests.test_references import np_attention, np_swiglu

MTP_DENSE = TINY_DENSE.replace(num_nextn_predict_layers=2)
MTP_MOE_BIAS = TINY_MOE.replace(num_nextn_predict_layers=1, use_bias=True, tie_word_embeddings=False)


def _model(cfg, seed=0) -> ErnieForCausalLM:
    model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(seed))
    # Non-trivial norms so that a swapped or skipped norm shows.
    for _, var in nnx.iter_graph(model):
        if isinstance(var, nnx.Param) and var.get_metadata().get("logical_axes", ())[-1:] == ("norm",):
            var.set_value(var.get_value() * (1.0 + 0.3 * jax.random.normal(jax.random.key(7), var.shape)))
    return model


def np_rms(x, w, eps):
    x = np.asarray(x, np.float64)
    return x / np.sqrt(np.mean(x * x, -1, keepdims=True) + eps) * np.asarray(w, np.float64)


def np_rope(x, positions, theta):
    h = x.shape[-1]
    angle = positions[..., None, None].astype(np.float64) * theta ** (-np.arange(0, h, 2) / h)
    out = np.empty_like(x, dtype=np.float64)
    even, odd = x[..., 0::2], x[..., 1::2]
    out[..., 0::2] = even * np.cos(angle) - odd * np.sin(angle)
    out[..., 1::2] = odd * np.cos(angle) + even * np.sin(angle)
    return out


def np_dense_layer(x, p: dict, cfg, positions):
    """One pre-norm ERNIE decoder layer (attention + SwiGLU) from its definition, weights as our [in, out]."""
    v = lambda name: np.asarray(p[name], np.float64)
    normed = np_rms(x, v("input_norm.weight"), cfg.rms_norm_eps)
    q = np.einsum("btd,dnh->btnh", normed, v("attn.wq"))
    k = np.einsum("btd,dkh->btkh", normed, v("attn.wk"))
    val = np.einsum("btd,dkh->btkh", normed, v("attn.wv"))
    if cfg.use_bias:
        q, k, val = q + v("attn.bq"), k + v("attn.bk"), val + v("attn.bv")
    q, k = np_rope(q, positions, cfg.rope_theta), np_rope(k, positions, cfg.rope_theta)
    attn = np.einsum("btnh,nhd->btd", np_attention(q, k, val, np.ones(positions.shape, int)), v("attn.wo"))
    x = x + attn + (v("attn.bo") if cfg.use_bias else 0.0)
    normed = np_rms(x, v("post_attn_norm.weight"), cfg.rms_norm_eps)
    if cfg.use_bias:
        gate = normed @ v("ffn.gate") + v("ffn.gate_bias")
        up = normed @ v("ffn.up") + v("ffn.up_bias")
        return x + (gate / (1 + np.exp(-gate)) * up) @ v("ffn.down") + v("ffn.down_bias")
    return x + np_swiglu(normed, v("ffn.gate"), v("ffn.up"), v("ffn.down"))


def np_mtp_logits(model: ErnieForCausalLM, last_hidden: np.ndarray, ids: np.ndarray) -> list[np.ndarray]:
    cfg = model.config
    flat = {".".join(map(str, k)): v.get_value() for k, v in nnx.to_flat_state(nnx.state(model))}
    embed = np.asarray(flat["embed"], np.float64)
    head = embed.T if cfg.tie_word_embeddings else np.asarray(flat["lm_head"], np.float64)
    head_bias = np.asarray(flat["lm_head_bias"], np.float64) if cfg.lm_head_has_bias else 0.0
    h, outs = np.asarray(last_hidden, np.float64), []
    for d in range(cfg.num_nextn_predict_layers):
        p = {k[len(f"mtp.{d}.") :]: v for k, v in flat.items() if k.startswith(f"mtp.{d}.")}
        length = min(h.shape[1], ids.shape[1] - d - 1)
        emb = embed[ids[:, d + 1 : d + 1 + length]]
        x = np.concatenate(
            [
                np_rms(emb, p["emb_norm.weight"], cfg.rms_norm_eps),
                np_rms(h[:, :length], p["hidden_norm.weight"], cfg.rms_norm_eps),
            ],
            axis=-1,
        ) @ np.asarray(p["proj"], np.float64)
        if cfg.use_bias:
            x = x + np.asarray(p["proj_bias"], np.float64)
        block = {k[len("block.") :]: v for k, v in p.items() if k.startswith("block.")}
        positions = np.broadcast_to(np.arange(length), (ids.shape[0], length))
        h = np_dense_layer(x, block, cfg, positions)
        outs.append(np_rms(h, flat["final_norm.weight"], cfg.rms_norm_eps) @ head + head_bias)
    return outs


def _last_hidden(model, ids) -> np.ndarray:
    """The main model's last-layer output before the final norm, read off the model's own layer groups."""
    h = model.embed_tokens(jnp.asarray(ids))
    positions = jnp.broadcast_to(jnp.arange(ids.shape[1]), ids.shape)
    for group in model.groups:
        h, _ = group(h, positions, None, None)
    return np.asarray(h)


@pytest.mark.parametrize("cfg", [MTP_DENSE, MTP_MOE_BIAS], ids=["dense_depth2", "moe_bias_untied"])
def test_mtp_logits_match_the_reference_formula(cfg):
    model = _model(cfg)
    ids = random_ids(2, 9, cfg.vocab_size, seed=3)
    logits, mtp_logits = model(jnp.asarray(ids), return_mtp_logits=True)
    assert logits.shape == (2, 9, cfg.vocab_size)
    assert [x.shape[1] for x in mtp_logits] == [9 - d - 1 for d in range(cfg.num_nextn_predict_layers)]
    expected = np_mtp_logits(model, _last_hidden(model, ids), ids)
    for d, (got, want) in enumerate(zip(mtp_logits, expected, strict=True)):
        err = assert_close(got, want, np.float32, f"depth {d}")
        print(f"[mtp] {cfg.model_type} depth {d}: max |dlogit| vs the numpy reference {err:.1e}")


def test_mtp_input_ids_extend_every_depth_to_the_full_window():
    """Training rows carry T + depth tokens: each depth then covers all T positions, and its first positions equal
    those of the shorter inference call (attention is causal, so later tokens cannot change earlier outputs)."""
    model = _model(MTP_DENSE)
    ids = random_ids(2, 11, MTP_DENSE.vocab_size, seed=4)
    _, short = model(jnp.asarray(ids[:, :9]), return_mtp_logits=True)
    _, full = model(jnp.asarray(ids[:, :9]), return_mtp_logits=True, mtp_input_ids=jnp.asarray(ids))
    assert [x.shape[1] for x in full] == [9, 9]
    for s, f in zip(short, full, strict=True):
        assert_close(f[:, : s.shape[1]], s, np.float32)


def test_mtp_tensors_round_trip_bit_exact(tmp_path):
    model = _model(MTP_MOE_BIAS)
    ernie_jax.save_pretrained(model, tmp_path, dtype=jnp.float32, progress=False)
    names = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    assert names["model.mtp_linear_proj.0.weight"].shape == (32, 64)  # torch [out, in]
    assert "model.mtp_block.0.self_attn.q_proj.weight" in names and "model.mtp_emb_norm.0.weight" in names
    assert json.loads((tmp_path / "config.json").read_text())["num_nextn_predict_layers"] == 1
    loaded = ernie_jax.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(loaded)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))


def test_transformers_loads_a_checkpoint_with_mtp_tensors_and_ignores_them(tmp_path):
    """Our export stays a transformers checkpoint: the main model's logits are transformers', MTP or not."""
    from transformers import AutoModelForCausalLM

    model = _model(MTP_DENSE)
    ernie_jax.save_pretrained(model, tmp_path, dtype=jnp.float32, progress=False)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, dtype="float32").eval()
    ids = random_ids(1, 7, MTP_DENSE.vocab_size)
    assert_close(model(jnp.asarray(ids)), hf_logits(hf, ids), np.float32)


def test_transposed_projection_is_fixed_with_a_log_line(tmp_path, project_logs):
    caplog = project_logs  # the project's loggers stop propagating once an entry point has set up logging
    model = _model(MTP_DENSE.replace(num_nextn_predict_layers=1))
    ernie_jax.save_pretrained(model, tmp_path, dtype=jnp.float32, progress=False)
    tensors = safetensors.numpy.load_file(str(tmp_path / "model.safetensors"))
    key = "model.mtp_linear_proj.0.weight"
    tensors[key] = np.ascontiguousarray(tensors[key].T)  # as one released upload had it: [2D, D]
    safetensors.numpy.save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.INFO, logger="ernie_jax.hf.transfer"):
        loaded = ernie_jax.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    assert any("stored transposed" in r.getMessage() and key in r.getMessage() for r in caplog.records)
    np.testing.assert_array_equal(np.asarray(loaded.mtp[0].proj.get_value()), np.asarray(model.mtp[0].proj.get_value()))


def test_a_checkpoint_without_mtp_tensors_still_loads_and_a_missing_head_is_named(tmp_path, project_logs):
    caplog = project_logs
    plain = hf_model(TINY_DENSE)
    plain.save_pretrained(tmp_path / "plain")
    model = ernie_jax.from_pretrained(tmp_path / "plain", dtype=jnp.float32, progress=False)
    assert model.mtp is None
    with pytest.raises(ValueError, match="no MTP head"):
        model(jnp.zeros((1, 4), jnp.int32), return_mtp_logits=True)
    # transformers re-saving a released -PT model keeps num_nextn_predict_layers but drops the MTP tensors.
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    (tmp_path / "plain" / "config.json").write_text(json.dumps({**config, "num_nextn_predict_layers": 1}))
    with caplog.at_level(logging.WARNING, logger="ernie_jax.hf.checkpoint"):
        model = ernie_jax.from_pretrained(tmp_path / "plain", dtype=jnp.float32, progress=False)
    assert model.mtp is None and any("holds no MTP tensors" in r.getMessage() for r in caplog.records)
    # Some MTP tensors but not all: a damaged head is named, never half-loaded.
    ours = _model(MTP_DENSE.replace(num_nextn_predict_layers=1))
    ernie_jax.save_pretrained(ours, tmp_path / "partial", dtype=jnp.float32, progress=False)
    tensors = safetensors.numpy.load_file(str(tmp_path / "partial" / "model.safetensors"))
    del tensors["model.mtp_emb_norm.0.weight"]
    safetensors.numpy.save_file(tensors, str(tmp_path / "partial" / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ernie_jax.CheckpointError, match="mtp_emb_norm.0.weight"):
        ernie_jax.from_pretrained(tmp_path / "partial", dtype=jnp.float32, progress=False)


def test_mtp_depth_needs_an_mtp_head():
    cfg = load_preset("tiny")
    with pytest.raises(ConfigError, match=r"mtp\.depth: 1 but model\.num_nextn_predict_layers=0"):
        apply_overrides(cfg, ["mtp.depth=1", "model.num_nextn_predict_layers=0"])


def test_mtp_training_logs_its_loss_and_learns(tmp_path):
    """A short MTP run: rows carry seq_len + depth tokens, the MTP loss is logged separately and falls, and
    loss = ce + aux terms + loss_weight * mtp_loss as logged."""
    cfg = apply_overrides(
        load_preset("tiny"),
        [*SMALL_TRAIN_OVERRIDES, f"run_dir={tmp_path}", "steps=30", "log_every=5", "sample_tokens=0",
         "model.num_nextn_predict_layers=1", "mtp.depth=1", "mtp.loss_weight=0.3"],
    )  # fmt: skip
    train_mod.train(cfg, progress=False)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all("mtp_loss" in r for r in rows)
    first, last = rows[0], rows[-1]
    assert last["mtp_loss"] < first["mtp_loss"] - 0.3
    for r in rows:
        terms = r["ce"] + 1e-2 * r["aux_loss"] + 1e-4 * r["z_loss"] + 1e-3 * r["ortho_loss"] + 0.3 * r["mtp_loss"]
        assert r["loss"] == pytest.approx(terms, rel=1e-5, abs=1e-6)


def test_mtp_targets_stay_inside_each_document():
    """Hand-checked row: documents [10 11 12 | 20 21 | 30 ...] packed in T + 2 = 8 tokens; depth d at position t
    learns targets[t + d + 1], and only while that target is in t's document (and a real token)."""
    from ernie_jax.training.losses import mtp_targets

    batch = {
        "input_ids": jnp.array([[10, 11, 12, 20, 21, 30, 31, 0]]),
        "targets": jnp.array([[11, 12, 13, 21, 22, 31, 32, 0]]),
        "segment_ids": jnp.array([[1, 1, 1, 2, 2, 3, 3, 0]]),
        "positions": jnp.array([[0, 1, 2, 0, 1, 0, 1, 0]]),
        "loss_mask": jnp.array([[1, 1, 1, 1, 1, 1, 1, 0]], jnp.float32),
    }
    (t1, m1), (t2, m2) = mtp_targets(batch, seq_len=6, depth=2)
    np.testing.assert_array_equal(t1, [[12, 13, 21, 22, 31, 32]])
    np.testing.assert_array_equal(m1, [[1, 1, 0, 1, 0, 1]])
    np.testing.assert_array_equal(t2, [[13, 21, 22, 31, 32, 0]])
    np.testing.assert_array_equal(m2, [[1, 0, 0, 0, 0, 0]])


def test_init_from_a_checkpoint_without_mtp_lowers_the_presets_depth(tmp_path, project_logs):
    """The embedded default trains one MTP depth; a checkpoint without a head trains without MTP, with a warning
    (the rows' length follows), and a checkpoint with one keeps it."""
    caplog = project_logs
    for depths in (0, 1):
        path = tmp_path / f"ckpt{depths}"
        path.mkdir()
        (path / "config.json").write_text(json.dumps(MTP_DENSE.replace(num_nextn_predict_layers=depths).to_hf_config()))
        cfg = apply_overrides(load_preset("tiny"), [f"init_from_hf={path}"])
        assert cfg.mtp.depth == 1
        with caplog.at_level(logging.WARNING, logger="ernie_jax.train"):
            fitted = train_mod.fit_mtp_depth(cfg)
        assert fitted.mtp.depth == depths and fitted.run_data.lookahead == depths
    assert sum("has 0 MTP depth(s)" in r.getMessage() for r in caplog.records) == 1


def test_mtp_step_on_the_mesh_with_remat_and_chunked_loss_equals_one_device():
    """The MTP loss with everything a pod run turns on: the 8-device mesh (experts over 4, batch over 8), full
    remat, the chunked LM-head loss and packed rows of T + 1 tokens; the step's losses and gradients' effect on the
    parameters equal one device's."""
    if jax.device_count() < 8:
        pytest.skip("needs the 8 emulated CPU devices of tests/conftest.py")
    import optax

    import sharding
    from ernie_jax.training.state import split_model
    from ernie_jax.training.step import make_train_step

    cfg = apply_overrides(
        load_preset("tiny"),
        ["mtp.depth=1", "mtp.loss_weight=0.3", "remat=full", "loss_chunk=8", "data.seq_len=16",
         "data.global_batch_size=8"],
    )  # fmt: skip
    model_cfg = MTP_MOE_BIAS.replace(num_nextn_predict_layers=1)
    rng = np.random.RandomState(0)
    ids = rng.randint(1, model_cfg.vocab_size, (8, 18))
    segments = np.where(np.arange(17) < 9, 1, 2)[None].repeat(8, 0)  # two documents per row of 17
    positions = np.where(segments == 1, np.arange(17), np.arange(17) - 9)
    batch = {
        "input_ids": jnp.asarray(ids[:, :17]),
        "targets": jnp.asarray(ids[:, 1:]),
        "segment_ids": jnp.asarray(segments),
        "positions": jnp.asarray(positions),
        "loss_mask": jnp.ones((8, 17), jnp.float32),
    }
    results = []
    for mesh in (None, sharding.make_mesh(data=2, expert=4)):
        model = ErnieForCausalLM(model_cfg, rngs=nnx.Rngs(0), options=cfg.model_options())
        if mesh is not None:
            nnx.update(model, sharding.shard_state(nnx.state(model), mesh))
        graphdef, params, biases = split_model(model)
        optimizer = optax.sgd(0.1)
        step = jax.jit(make_train_step(graphdef, cfg, optimizer))
        with sharding.use_mesh(mesh) if mesh is not None else contextlib.nullcontext():
            new_params, _, _, metrics = step(params, biases, optimizer.init(params), batch, jnp.int32(0))
        results.append((metrics, new_params))
    (one, p_one), (eight, p_eight) = results
    for key in ("loss", "ce", "mtp_loss"):
        np.testing.assert_allclose(float(eight[key]), float(one[key]), rtol=1e-5, err_msg=key)
    for (path, a), (_, b) in zip(nnx.to_flat_state(p_eight), nnx.to_flat_state(p_one), strict=True):
        assert_close(a.get_value(), b.get_value(), np.float32, ".".join(map(str, path)))
