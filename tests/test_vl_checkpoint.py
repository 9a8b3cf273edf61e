"""ERNIE 4.5 VL config and checkpoint I/O: config.json both ways, sharded saves, mesh loading, errors naming tensors."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
from flax import nnx

import ernie_jax.vl as vl
import sharding
from ernie_jax.config import ConfigError
from ernie_jax.hf.checkpoint import CheckpointError
from tests.test_vl_parity import VARIANTS, hf_vl_model


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("vl_ckpt")
    hf_vl_model(VARIANTS["base"]["text"], VARIANTS["base"]["top"]).save_pretrained(path)
    return str(path)


def _flat(model) -> dict:
    return {path: np.asarray(v.get_value()) for path, v in nnx.to_flat_state(nnx.state(model))}


def test_vl_config_round_trips_through_transformers(checkpoint):
    from transformers import Ernie4_5_VLMoeConfig

    cfg = vl.VLConfig.from_hf_config(checkpoint)
    assert cfg.text.mlp_layer_types == ("dense", "sparse", "sparse")
    assert cfg.text.moe_intermediate_size == (32, 16) and cfg.text.mrope_section == (3, 3, 2)
    assert cfg.vision.rope_theta == 10000.0 and cfg.vision.hidden_act == "quick_gelu"
    hf = Ernie4_5_VLMoeConfig(**{k: v for k, v in cfg.to_hf_config().items() if k != "architectures"})
    assert vl.VLConfig.from_hf_config(hf.to_dict()) == cfg
    assert vl.VLConfig.from_hf_config(cfg.to_hf_config()) == cfg


@pytest.mark.parametrize(
    "change, field",
    [
        (dict(mrope_section=(3, 3, 3)), "mrope_section"),  # does not sum to head_dim / 2 = 8
        (dict(mrope_section=(4, 2, 2)), "mrope_section"),  # height and width must be equal
        (dict(moe_k=5), "moe_k"),
        (dict(mlp_layer_types=("dense", "moe", "sparse")), "mlp_layer_types"),
        (dict(moe_intermediate_size=(32,)), "moe_intermediate_size"),
    ],
)
def test_vl_config_refuses_bad_text_fields(checkpoint, change, field):
    text = vl.VLConfig.from_hf_config(checkpoint).text
    with pytest.raises(ConfigError, match=field):
        vl.VLTextConfig(**{**{f: getattr(text, f) for f in text.__dataclass_fields__}, **change})


def test_vl_config_refuses_other_model_types(tmp_path):
    with pytest.raises(ConfigError, match="ernie4_5_vl_moe"):
        vl.VLConfig.from_hf_config({"model_type": "ernie4_5_moe"})
    with pytest.raises(ConfigError, match="temporal_merge_size"):
        vl.VisionConfig(temporal_merge_size=3)


def test_vl_sharded_save_is_read_by_transformers_and_us(checkpoint, tmp_path):
    from transformers import Ernie4_5_VLMoeForConditionalGeneration

    model = vl.from_pretrained(checkpoint, dtype=jnp.float32, progress=False)
    vl.save_pretrained(model, tmp_path, max_shard_bytes=200_000, progress=False)
    with open(tmp_path / "model.safetensors.index.json") as f:
        shards = set(json.load(f)["weight_map"].values())
    assert len(shards) > 1 and not os.path.exists(tmp_path / "model.safetensors")
    original = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(checkpoint).state_dict()
    reloaded = Ernie4_5_VLMoeForConditionalGeneration.from_pretrained(tmp_path).state_dict()
    assert set(original) == set(reloaded)
    assert all(np.array_equal(original[k].numpy(), reloaded[k].numpy()) for k in original)
    ours, again = _flat(model), _flat(vl.from_pretrained(tmp_path, dtype=jnp.float32, progress=False))
    assert all(np.array_equal(ours[k], again[k]) for k in ours)
    # Saving again in one file removes the shards and the index (no stale files that look like a checkpoint).
    vl.save_pretrained(model, tmp_path, progress=False)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]


def test_vl_bf16_save_keeps_routers_fp32(checkpoint, tmp_path):
    model = vl.from_pretrained(checkpoint, dtype=jnp.bfloat16, progress=False)
    vl.save_pretrained(model, tmp_path, progress=False)
    tensors = safetensors.numpy.load_file(tmp_path / "model.safetensors")
    assert tensors["model.layers.1.mlp.gate.weight_1"].dtype == np.float32
    assert tensors["model.layers.1.mlp.moe_statics.e_score_correction_bias"].dtype == np.float32
    assert tensors["model.layers.1.mlp.experts.5.up_proj.weight"].dtype == jnp.bfloat16
    with open(tmp_path / "config.json") as f:
        assert json.load(f)["dtype"] == "bfloat16"


def test_vl_load_on_a_mesh_places_each_pool_expert_parallel(checkpoint):
    mesh = sharding.make_mesh(data=2, expert=4)
    placed = vl.from_pretrained(checkpoint, dtype=jnp.float32, mesh=mesh, progress=False)
    single = _flat(vl.from_pretrained(checkpoint, dtype=jnp.float32, progress=False))
    for path, value in _flat(placed).items():
        np.testing.assert_array_equal(value, single[path], err_msg=str(path))
    w_up = placed.groups[1].layer.ffn.vision.w_up[...]  # [R, E, D, F]
    assert isinstance(w_up.sharding, jax.sharding.NamedSharding)
    assert {s.data.shape[1] for s in w_up.addressable_shards} == {1}  # 4 experts over expert=4


def _rewrite(src: str, dst, edit) -> str:
    tensors = safetensors.numpy.load_file(os.path.join(src, "model.safetensors"))
    edit(tensors)
    os.makedirs(dst, exist_ok=True)
    safetensors.numpy.save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(src, "config.json")) as f, open(os.path.join(dst, "config.json"), "w") as g:
        g.write(f.read())
    return str(dst)


def test_vl_checkpoint_errors_name_the_tensor(checkpoint, tmp_path):
    vision_expert = "model.layers.2.mlp.experts.6.down_proj.weight"
    missing = _rewrite(checkpoint, tmp_path / "missing", lambda t: t.pop(vision_expert))
    with pytest.raises(CheckpointError, match=vision_expert.replace(".", r"\.")):
        vl.from_pretrained(missing, dtype=jnp.float32, progress=False)

    def bad_shape(t):
        t["model.layers.1.mlp.moe_statics.e_score_correction_bias"] = np.zeros((1, 4), np.float32)

    wrong = _rewrite(checkpoint, tmp_path / "wrong", bad_shape)
    with pytest.raises(CheckpointError, match=r"e_score_correction_bias: checkpoint has shape \[1, 4\].*\[2, 4\]"):
        vl.from_pretrained(wrong, dtype=jnp.float32, progress=False)

    def extra(t):
        t["model.layers.0.mlp.experts.0.up_proj.weight"] = np.zeros((8, 64), np.float32)

    extra_path = _rewrite(checkpoint, tmp_path / "extra", extra)
    with pytest.raises(CheckpointError, match="not part of this config"):
        vl.from_pretrained(extra_path, dtype=jnp.float32, progress=False)
