"""The map between Hugging Face tensor names/layouts and this package's parameters.

On disk (released -PT checkpoints and transformers `save_pretrained`), linear weights are torch [out, in] and
routed experts are stored one tensor per expert. Here weights are [in, out], attention weights keep a head axis,
experts are stacked [E, ...], and layers of a scanned group are stacked [R, ...]. One `TensorMap` describes
one of our parameters: which HF tensor feeds each (repeat, expert) slice, and how to transform it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ernie_jax.config import ErnieConfig

Path = tuple[str | int, ...]


@dataclasses.dataclass(frozen=True)
class TensorMap:
    path: Path  # our parameter path in the model state
    hf_keys: np.ndarray  # object array of HF names, shape = lead dims of our parameter ([], [R] or [R, E])
    hf_shape: tuple[int, ...]  # shape of each HF tensor
    local_shape: tuple[int, ...]  # shape of our parameter per lead index
    to_local: Callable[[np.ndarray], np.ndarray]
    to_hf: Callable[[np.ndarray], np.ndarray]  # our slice -> the HF tensor (or its row `part`)
    part: int | None = None  # our slice is row `part` of an HF tensor shared with another parameter (VL biases)
    keep_fp32: bool = False  # router weight and correction bias are fp32 on disk and in memory
    # A copy of the released checkpoints stored this tensor transposed (the MTP projection of one 300B upload):
    # a tensor of exactly the reversed shape is accepted and transposed on load, with a log line.
    transposed_ok: bool = False

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.hf_keys.shape, *self.local_shape)

    @property
    def name(self) -> str:
        return ".".join(map(str, self.path))


def _linear(out_f: int, in_f: int):
    """torch Linear [out, in] <-> ours [in, out]."""
    return (out_f, in_f), (in_f, out_f), (lambda w: w.T), (lambda w: w.T)


def _heads_out(heads: int, head_dim: int, d: int):
    """q/k/v_proj [N*H, D] <-> ours [D, N, H]."""
    return (
        (heads * head_dim, d),
        (d, heads, head_dim),
        lambda w: w.T.reshape(d, heads, head_dim),
        lambda w: w.reshape(d, heads * head_dim).T,
    )


def _heads_in(heads: int, head_dim: int, d: int):
    """o_proj [D, N*H] <-> ours [N, H, D]."""
    return (
        (d, heads * head_dim),
        (heads, head_dim, d),
        lambda w: w.T.reshape(heads, head_dim, d),
        lambda w: w.reshape(heads * head_dim, d).T,
    )


def _reshape(hf_shape: tuple[int, ...], local_shape: tuple[int, ...]):
    return hf_shape, local_shape, (lambda w: w.reshape(local_shape)), (lambda w: w.reshape(hf_shape))


def _layer_entries(cfg: ErnieConfig, kind: str) -> list[tuple[Path, str, tuple, bool, bool]]:
    """(local path, HF suffix after `model.layers.{i}.`, transform, per_expert, keep_fp32) for one layer."""
    d, n, kv, h = cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.resolved_head_dim
    out: list[tuple[Path, str, tuple, bool, bool]] = [
        (("input_norm", "weight"), "input_layernorm.weight", _reshape((d,), (d,)), False, False),
        (("post_attn_norm", "weight"), "post_attention_layernorm.weight", _reshape((d,), (d,)), False, False),
        (("attn", "wq"), "self_attn.q_proj.weight", _heads_out(n, h, d), False, False),
        (("attn", "wk"), "self_attn.k_proj.weight", _heads_out(kv, h, d), False, False),
        (("attn", "wv"), "self_attn.v_proj.weight", _heads_out(kv, h, d), False, False),
        (("attn", "wo"), "self_attn.o_proj.weight", _heads_in(n, h, d), False, False),
    ]
    if cfg.use_bias:
        out += [
            (("attn", "bq"), "self_attn.q_proj.bias", _reshape((n * h,), (n, h)), False, False),
            (("attn", "bk"), "self_attn.k_proj.bias", _reshape((kv * h,), (kv, h)), False, False),
            (("attn", "bv"), "self_attn.v_proj.bias", _reshape((kv * h,), (kv, h)), False, False),
            (("attn", "bo"), "self_attn.o_proj.bias", _reshape((d,), (d,)), False, False),
        ]

    def mlp(prefix: Path, hf_prefix: str, f: int) -> list:
        entries = [
            ((*prefix, "gate"), f"{hf_prefix}.gate_proj.weight", _linear(f, d), False, False),
            ((*prefix, "up"), f"{hf_prefix}.up_proj.weight", _linear(f, d), False, False),
            ((*prefix, "down"), f"{hf_prefix}.down_proj.weight", _linear(d, f), False, False),
        ]
        if cfg.use_bias:
            entries += [
                ((*prefix, "gate_bias"), f"{hf_prefix}.gate_proj.bias", _reshape((f,), (f,)), False, False),
                ((*prefix, "up_bias"), f"{hf_prefix}.up_proj.bias", _reshape((f,), (f,)), False, False),
                ((*prefix, "down_bias"), f"{hf_prefix}.down_proj.bias", _reshape((d,), (d,)), False, False),
            ]
        return entries

    if kind == "dense":
        out += mlp(("ffn",), "mlp", cfg.intermediate_size)
    else:
        e, f = cfg.moe_num_experts, cfg.moe_intermediate_size
        out += [
            (("ffn", "router"), "mlp.gate.weight", _linear(e, d), False, True),
            (
                ("ffn", "correction_bias"),
                "mlp.moe_statics.e_score_correction_bias",
                _reshape((1, e), (e,)),
                False,
                True,
            ),
            (("ffn", "w_gate"), "mlp.experts.{e}.gate_proj.weight", _linear(f, d), True, False),
            (("ffn", "w_up"), "mlp.experts.{e}.up_proj.weight", _linear(f, d), True, False),
            (("ffn", "w_down"), "mlp.experts.{e}.down_proj.weight", _linear(d, f), True, False),
        ]
        if cfg.moe_num_shared_experts:
            out += mlp(("ffn", "shared"), "mlp.shared_experts", cfg.shared_expert_size)
    return out


def tensor_maps(cfg: ErnieConfig) -> list[TensorMap]:
    """Every parameter of `ErnieForCausalLM(cfg)` with its HF sources, in a stable order."""
    v, d = cfg.vocab_size, cfg.hidden_size
    maps = [
        TensorMap(
            ("embed",),
            np.array("model.embed_tokens.weight", dtype=object),
            (v, d),
            (v, d),
            lambda w: w,
            lambda w: w,
        ),
    ]
    for g, ((pattern, _), indices) in enumerate(zip(cfg.layer_groups, cfg.group_layer_indices(), strict=True)):
        for p, kind in enumerate(pattern):
            layers = indices[p]
            for local, suffix, (hf_shape, local_shape, to_local, to_hf), per_expert, fp32 in _layer_entries(cfg, kind):
                if per_expert:
                    keys = np.array(
                        [
                            [f"model.layers.{i}.{suffix.format(e=e)}" for e in range(cfg.moe_num_experts)]
                            for i in layers
                        ],
                        dtype=object,
                    )
                else:
                    keys = np.array([f"model.layers.{i}.{suffix}" for i in layers], dtype=object)
                maps.append(
                    TensorMap(
                        ("groups", g, "layers", p, *local),
                        keys,
                        hf_shape,
                        local_shape,
                        to_local,
                        to_hf,
                        keep_fp32=fp32,
                    )
                )
    maps.append(
        TensorMap(
            ("final_norm", "weight"),
            np.array("model.norm.weight", dtype=object),
            (d,),
            (d,),
            lambda w: w,
            lambda w: w,
        )
    )
    maps += _mtp_maps(cfg)
    if not cfg.tie_word_embeddings:
        hf_shape, local_shape, to_local, to_hf = _linear(v, d)
        maps.append(
            TensorMap(("lm_head",), np.array("lm_head.weight", dtype=object), hf_shape, local_shape, to_local, to_hf)
        )
    if cfg.lm_head_has_bias:
        maps.append(
            TensorMap(
                ("lm_head_bias",),
                np.array("lm_head.bias", dtype=object),
                (v,),
                (v,),
                lambda w: w,
                lambda w: w,
            )
        )
    return maps


def _mtp_maps(cfg: ErnieConfig) -> list[TensorMap]:
    """The multi-token-prediction depths: `model.mtp_{emb_norm,hidden_norm,linear_proj}.{d}` and the decoder layer
    `model.mtp_block.{d}.*` (Paddle's names, which vLLM and SGLang read too)."""
    d = cfg.hidden_size
    maps = []
    for depth in range(cfg.num_nextn_predict_layers):
        prefix = ("mtp", depth)
        entries = [
            (("emb_norm", "weight"), f"model.mtp_emb_norm.{depth}.weight", _reshape((d,), (d,)), False),
            (("hidden_norm", "weight"), f"model.mtp_hidden_norm.{depth}.weight", _reshape((d,), (d,)), False),
            (("proj",), f"model.mtp_linear_proj.{depth}.weight", _linear(d, 2 * d), True),  # torch [D, 2D]
        ]
        if cfg.use_bias:
            entries.append((("proj_bias",), f"model.mtp_linear_proj.{depth}.bias", _reshape((d,), (d,)), False))
        for local, suffix, transform, _, _ in _layer_entries(cfg, cfg.layer_kind(depth)):
            entries.append((("block", *local), f"model.mtp_block.{depth}.{suffix}", transform, False))
        for local, key, (hf_shape, local_shape, to_local, to_hf), transposed_ok in entries:
            maps.append(
                TensorMap(
                    (*prefix, *local),
                    np.array(key, dtype=object),
                    hf_shape,
                    local_shape,
                    to_local,
                    to_hf,
                    transposed_ok=transposed_ok,
                )
            )
    return maps


def is_ignored_hf_key(key: str, cfg: ErnieConfig) -> bool:
    """Tensors present in released checkpoints that this model does not use: MTP depths past the config's
    `num_nextn_predict_layers` (all of them when it is 0), a tied head's copy."""
    return "mtp" in key or (cfg.tie_word_embeddings and key == "lm_head.weight")
