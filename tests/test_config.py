"""ErnieConfig: validation messages, released presets, HF config.json in both layouts."""

from __future__ import annotations

import dataclasses

import jax
import pytest

from ernie_jax.config import (
    ERNIE_4_5_0P3B,
    ERNIE_4_5_21B_A3B,
    ERNIE_4_5_300B_A47B,
    ConfigError,
    ErnieConfig,
)
from ernie_jax.model import abstract_model
from tests.helpers import TINY_MOE, TINY_MOE_INTERVAL, released_layout_config


def _count(model) -> int:
    from flax import nnx

    return sum(x.size for x in jax.tree.leaves(nnx.state(model)))


@pytest.mark.parametrize(
    "preset, expected",
    [(ERNIE_4_5_21B_A3B, 21_825_437_888), (ERNIE_4_5_0P3B, 360_748_032), (ERNIE_4_5_300B_A47B, 299_484_163_264)],
)
def test_preset_parameter_counts(preset, expected):
    assert preset.num_params() == expected
    assert _count(abstract_model(preset)) == expected  # the built (abstract) model agrees with the formula


def test_presets_match_the_facts_sheet():
    a3b = ERNIE_4_5_21B_A3B
    assert a3b.resolved_head_dim == 128 and a3b.layer_kinds.count("moe") == 27 and a3b.layer_kinds[0] == "dense"
    assert a3b.layer_groups == ((("dense",), 1), (("moe",), 27))
    a47b = ERNIE_4_5_300B_A47B
    assert a47b.layer_groups == ((("dense",), 3), (("moe",), 51)) and not a47b.tie_word_embeddings
    assert ERNIE_4_5_0P3B.num_attention_heads * ERNIE_4_5_0P3B.resolved_head_dim == 2048


def test_layer_groups_for_interleaved_moe():
    cfg = TINY_MOE_INTERVAL.replace(num_hidden_layers=7, moe_layer_start_index=3)
    assert cfg.layer_kinds == ("dense", "dense", "dense", "moe", "dense", "moe", "dense")
    assert cfg.layer_groups == ((("dense",), 3), (("moe", "dense"), 2))
    flat = [i for group in cfg.group_layer_indices() for pos in zip(*group, strict=True) for i in pos]
    assert flat == list(range(7))


@pytest.mark.parametrize(
    "changes, field",
    [
        (dict(num_key_value_heads=3), "num_key_value_heads"),
        (dict(moe_k=9), "moe_k"),
        (dict(moe_layer_start_index=5), "moe_layer_start_index"),
        (dict(moe_layer_end_index=7), "moe_layer_end_index"),
        (dict(hidden_act="gelu"), "hidden_act"),
        (dict(hidden_size=30, head_dim=None), "head_dim"),
        (dict(moe_layer_interval=0), "moe_layer_interval"),
    ],
)
def test_invalid_values_name_the_field(changes, field):
    with pytest.raises(ConfigError, match=rf"ErnieConfig\.{field}:"):
        dataclasses.replace(TINY_MOE, **changes)


def test_released_layout_is_read():
    hf = released_layout_config(ERNIE_4_5_21B_A3B)
    assert "head_dim" not in hf and "rope_parameters" not in hf and hf["moe_layer_end_index"] == -1
    cfg = ErnieConfig.from_hf_config(hf)
    assert cfg.resolved_head_dim == 128 and cfg.resolved_moe_layer_end_index == 27 and cfg.rope_theta == 500000.0
    assert cfg.num_params() == 21_825_437_888
    hf["head_dim"] = None  # some copies write null
    assert ErnieConfig.from_hf_config(hf).resolved_head_dim == 128


def test_transformers_layout_round_trips_through_transformers():
    from transformers import Ernie4_5_MoeConfig

    hf = TINY_MOE.to_hf_config()
    theirs = Ernie4_5_MoeConfig(**{k: v for k, v in hf.items() if k not in ("architectures", "model_type")})
    back = ErnieConfig.from_hf_config(theirs.to_dict())
    assert back == TINY_MOE.replace(head_dim=TINY_MOE.resolved_head_dim)  # written explicitly, same architecture
    assert theirs.moe_layer_end_index == TINY_MOE.resolved_moe_layer_end_index


def test_vision_language_config_is_refused_clearly():
    with pytest.raises(ConfigError, match="vision-language"):
        ErnieConfig.from_hf_config({"model_type": "ernie4_5_vl_moe", "text_config": {}})
