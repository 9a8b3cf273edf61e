"""HF checkpoint I/O: sharded files with an index, loading onto a mesh, and clear errors for bad checkpoints."""

from __future__ import annotations

import json
import logging
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import ernie_jax
import sharding
from tests.helpers import TINY_MOE, assert_close, hf_logits, hf_model, random_ids, save_hf


@pytest.fixture(scope="module")
def moe_checkpoint(tmp_path_factory):
    model = hf_model(TINY_MOE, seed=7)
    return save_hf(model, tmp_path_factory.mktemp("moe")), model


def _copy(src, dst, edit=None):
    """Copy a single-file checkpoint, optionally editing its tensors dict."""
    tensors = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
    if edit:
        edit(tensors)
    os.makedirs(dst, exist_ok=True)
    safetensors.numpy.save_file(tensors, os.path.join(dst, "model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return dst


def test_sharded_save_writes_index_and_per_expert_tensors(moe_checkpoint, tmp_path):
    path, hf = moe_checkpoint
    model = ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False)
    ernie_jax.save_pretrained(model, tmp_path, max_shard_bytes=20_000, progress=False)
    with open(tmp_path / "model.safetensors.index.json") as f:
        weight_map = json.load(f)["weight_map"]
    assert len(set(weight_map.values())) > 3
    assert "model.layers.1.mlp.experts.7.down_proj.weight" in weight_map
    assert not (tmp_path / "model.safetensors").exists()
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".ernie-save-")], "temporary files left behind"
    router = safetensors.numpy.load_file(tmp_path / weight_map["model.layers.1.mlp.gate.weight"])
    assert router["model.layers.1.mlp.gate.weight"].dtype == np.float32
    ids = random_ids(2, 6, TINY_MOE.vocab_size, seed=8)
    reloaded = ernie_jax.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    assert_close(reloaded(jnp.asarray(ids)), hf_logits(hf, ids), np.float32, "sharded round trip")


def test_bf16_save_keeps_router_fp32(moe_checkpoint, tmp_path):
    path, _ = moe_checkpoint
    model = ernie_jax.from_pretrained(path, dtype=jnp.bfloat16, progress=False)
    ernie_jax.save_pretrained(model, tmp_path, progress=False)
    with safetensors.safe_open(tmp_path / "model.safetensors", "np") as f:
        assert f.get_slice("model.layers.1.mlp.gate.weight").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.mlp.moe_statics.e_score_correction_bias").get_dtype() == "F32"
        assert f.get_slice("model.layers.1.mlp.experts.0.up_proj.weight").get_dtype() == "BF16"
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_load_onto_mesh_places_each_parameter(moe_checkpoint):
    path, hf = moe_checkpoint
    mesh = sharding.make_mesh(data=1, fsdp=2, expert=2, tensor=2)
    model = ernie_jax.from_pretrained(path, dtype=jnp.float32, mesh=mesh, progress=False)
    w_gate = model.groups[1].layers[0].ffn.w_gate[...]  # [R, E, D, F]
    spec = w_gate.sharding.spec
    assert tuple(spec) == (None, "expert", "fsdp", "tensor")
    # Each device holds a quarter of the experts' rows... and no device holds all experts.
    assert all(s.data.shape[1] == TINY_MOE.moe_num_experts // 2 for s in w_gate.addressable_shards)
    ids = random_ids(2, 6, TINY_MOE.vocab_size, seed=9)
    ours = jax.jit(lambda m, x: m(x))(model, jnp.asarray(ids))
    assert_close(ours, hf_logits(hf, ids), np.float32, "mesh-loaded model")


def test_missing_tensor_is_named(moe_checkpoint, tmp_path):
    path, _ = moe_checkpoint
    key = "model.layers.2.mlp.experts.3.up_proj.weight"
    _copy(path, tmp_path, lambda t: t.pop(key))
    with pytest.raises(ernie_jax.CheckpointError, match=key.replace(".", r"\.")):
        ernie_jax.from_pretrained(tmp_path, progress=False)


def test_extra_tensor_is_named(moe_checkpoint, tmp_path):
    path, _ = moe_checkpoint
    _copy(path, tmp_path, lambda t: t.update({"model.layers.0.mlp.surprise.weight": np.zeros(3, np.float32)}))
    with pytest.raises(ernie_jax.CheckpointError, match=r"model\.layers\.0\.mlp\.surprise\.weight"):
        ernie_jax.from_pretrained(tmp_path, progress=False)


def test_misshaped_tensor_names_both_shapes(moe_checkpoint, tmp_path):
    path, _ = moe_checkpoint
    key = "model.layers.0.self_attn.k_proj.weight"
    _copy(path, tmp_path, lambda t: t.update({key: np.zeros((24, 32), np.float32)}))
    with pytest.raises(
        ernie_jax.CheckpointError,
        match=r"k_proj\.weight: checkpoint has shape \[24, 32\], the "
        r"config expects \[16, 32\]",
    ):
        ernie_jax.from_pretrained(tmp_path, progress=False)


def test_mtp_tensors_are_skipped_with_one_log_line(moe_checkpoint, tmp_path, project_logs):
    caplog = project_logs
    path, hf = moe_checkpoint
    extra = {
        "model.mtp_linear_proj.0.weight": np.zeros((32, 64), np.float32),
        "model.mtp_emb_norm.0.weight": np.ones(32, np.float32),
    }
    _copy(path, tmp_path, lambda t: t.update(extra))
    with caplog.at_level(logging.INFO, logger="ernie_jax.hf.checkpoint"):
        model = ernie_jax.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    mtp_lines = [r for r in caplog.records if "multi-token-prediction" in r.getMessage()]
    assert len(mtp_lines) == 1 and "2 multi-token-prediction tensors" in mtp_lines[0].getMessage()
    ids = random_ids(1, 5, TINY_MOE.vocab_size)
    assert_close(model(jnp.asarray(ids)), hf_logits(hf, ids), np.float32)


def test_no_safetensors_gives_a_clear_error(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_MOE.to_hf_config()))
    with pytest.raises(ernie_jax.CheckpointError, match="no model.safetensors"):
        ernie_jax.from_pretrained(tmp_path, progress=False)


def test_incomplete_sharded_checkpoint_is_refused(moe_checkpoint, tmp_path):
    path, _ = moe_checkpoint
    model = ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False)
    ernie_jax.save_pretrained(model, tmp_path, max_shard_bytes=20_000, progress=False)
    victim = sorted(n for n in os.listdir(tmp_path) if n.endswith(".safetensors"))[-1]
    os.remove(tmp_path / victim)
    with pytest.raises(ernie_jax.CheckpointError, match="incomplete"):
        ernie_jax.from_pretrained(tmp_path, progress=False)


def test_generation_config_comes_with_the_checkpoint(moe_checkpoint, tmp_path):
    path, _ = moe_checkpoint
    written = ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False).generation_config
    assert written is not None and written.do_sample is False  # transformers' save_pretrained wrote one
    _copy(path, tmp_path, lambda t: None)  # model and config only
    assert ernie_jax.from_pretrained(tmp_path, dtype=jnp.float32, progress=False).generation_config is None
    real = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ERNIE-4.5-0.3B-Base")
    released = {"do_sample": True, "top_p": 0.8, "temperature": 0.8, "eos_token_id": 2, "pad_token_id": 0}
    if os.path.isfile(os.path.join(real, "generation_config.json")):
        with open(os.path.join(real, "generation_config.json")) as f:
            released = json.load(f)
    with open(tmp_path / "generation_config.json", "w") as f:
        json.dump(released, f)
    config = ernie_jax.from_pretrained(tmp_path, dtype=jnp.float32, progress=False).generation_config
    assert config is not None and config.top_p == released["top_p"] and config.temperature == released["temperature"]
