"""The map between ERNIE 4.5 VL checkpoint tensors and this package's parameters.

On disk is the layout transformers' `save_pretrained` writes for `ernie4_5_vl_moe` (its conversion mapping turns its
fused modules back into Baidu's released names):
  - decoder under `model.layers.{i}.` with torch [out, in] linears; one router per pool, stored [D, E]
    (`mlp.gate.weight` text, `mlp.gate.weight_1` vision); both correction biases in one [2, E] tensor
    (`mlp.moe_statics.e_score_correction_bias`, row 0 text, row 1 vision); routed experts one tensor per expert,
    text experts numbered 0..E-1 and vision experts E..2E-1;
  - the vision tower under `model.vision_model.` (fused qkv), the resampler under `model.resampler_model.` with
    its two MLPs as torch Sequential indices (0 fc1, 2 fc2, 3 LayerNorm).
Here linears are [in, out], attention keeps a head axis, experts are stacked [E, ...], and the layers of a scanned
group (or the vision blocks) are stacked [R, ...].
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np

from ernie_jax.hf.names import Path, TensorMap
from ernie_jax.vl.config import VLConfig

Transform = tuple[tuple[int, ...], tuple[int, ...], Callable, Callable]  # hf shape, local shape, to_local, to_hf


def _same(shape: tuple[int, ...]) -> Transform:
    return shape, shape, (lambda w: w), (lambda w: w)


def _linear(d_out: int, d_in: int) -> Transform:
    """torch Linear [out, in] <-> ours [in, out]."""
    return (d_out, d_in), (d_in, d_out), (lambda w: w.T), (lambda w: w.T)


def _heads_out(heads: int, head_dim: int, d: int) -> Transform:
    """q/k/v_proj [N*H, D] <-> ours [D, N, H]."""
    return (
        (heads * head_dim, d),
        (d, heads, head_dim),
        lambda w: w.T.reshape(d, heads, head_dim),
        lambda w: w.reshape(d, heads * head_dim).T,
    )


def _heads_in(heads: int, head_dim: int, d: int) -> Transform:
    """o_proj [D, N*H] <-> ours [N, H, D]."""
    return (
        (d, heads * head_dim),
        (heads, head_dim, d),
        lambda w: w.T.reshape(heads, head_dim, d),
        lambda w: w.reshape(heads * head_dim, d).T,
    )


def _fused_qkv(heads: int, head_dim: int, d: int) -> Transform:
    """Vision qkv [3*N*H, D] (q, k, v blocks of N heads) <-> ours [D, 3, N, H]."""
    return (
        (3 * heads * head_dim, d),
        (d, 3, heads, head_dim),
        lambda w: w.reshape(3, heads, head_dim, d).transpose(3, 0, 1, 2),
        lambda w: w.transpose(1, 2, 3, 0).reshape(3 * heads * head_dim, d),
    )


def _reshape(hf_shape: tuple[int, ...], local_shape: tuple[int, ...]) -> Transform:
    return hf_shape, local_shape, (lambda w: w.reshape(local_shape)), (lambda w: w.reshape(hf_shape))


def _row(part: int, rows: int, width: int) -> Transform:
    return (rows, width), (width,), (lambda w: w[part]), (lambda w: w)


@dataclasses.dataclass(frozen=True)
class _Entry:
    local: Path
    hf: str  # HF name after the layer prefix; "{e}" is the expert index
    transform: Transform
    experts: int | None = None  # first HF expert index of a per-expert tensor (stacked [E] here)
    part: int | None = None
    fp32: bool = False


def _text_layer(cfg: VLConfig, kind: str) -> list[_Entry]:
    t = cfg.text
    d, n, kv, h = t.hidden_size, t.num_attention_heads, t.num_key_value_heads, t.resolved_head_dim
    out = [
        _Entry(("input_norm", "weight"), "input_layernorm.weight", _same((d,))),
        _Entry(("post_attn_norm", "weight"), "post_attention_layernorm.weight", _same((d,))),
        _Entry(("attn", "wq"), "self_attn.q_proj.weight", _heads_out(n, h, d)),
        _Entry(("attn", "wk"), "self_attn.k_proj.weight", _heads_out(kv, h, d)),
        _Entry(("attn", "wv"), "self_attn.v_proj.weight", _heads_out(kv, h, d)),
        _Entry(("attn", "wo"), "self_attn.o_proj.weight", _heads_in(n, h, d)),
    ]
    if t.use_bias:
        out += [
            _Entry(("attn", "bq"), "self_attn.q_proj.bias", _reshape((n * h,), (n, h))),
            _Entry(("attn", "bk"), "self_attn.k_proj.bias", _reshape((kv * h,), (kv, h))),
            _Entry(("attn", "bv"), "self_attn.v_proj.bias", _reshape((kv * h,), (kv, h))),
            _Entry(("attn", "bo"), "self_attn.o_proj.bias", _same((d,))),
        ]

    def mlp(prefix: Path, hf_prefix: str, f: int) -> list[_Entry]:
        entries = [
            _Entry((*prefix, "gate"), f"{hf_prefix}.gate_proj.weight", _linear(f, d)),
            _Entry((*prefix, "up"), f"{hf_prefix}.up_proj.weight", _linear(f, d)),
            _Entry((*prefix, "down"), f"{hf_prefix}.down_proj.weight", _linear(d, f)),
        ]
        if t.use_bias:
            entries += [
                _Entry((*prefix, "gate_bias"), f"{hf_prefix}.gate_proj.bias", _same((f,))),
                _Entry((*prefix, "up_bias"), f"{hf_prefix}.up_proj.bias", _same((f,))),
                _Entry((*prefix, "down_bias"), f"{hf_prefix}.down_proj.bias", _same((d,))),
            ]
        return entries

    if kind == "dense":
        return out + mlp(("ffn",), "mlp", t.intermediate_size)
    e = t.moe_num_experts
    pools = (("text", "mlp.gate.weight"), ("vision", "mlp.gate.weight_1"))
    for part, ((pool, router), width) in enumerate(zip(pools, t.moe_intermediate_size, strict=True)):
        first = part * e  # vision experts are numbered after the text experts
        out += [
            _Entry(("ffn", pool, "router"), router, _same((d, e)), fp32=True),
            _Entry(
                ("ffn", pool, "correction_bias"),
                "mlp.moe_statics.e_score_correction_bias",
                _row(part, 2, e),
                part=part,
                fp32=True,
            ),  # fmt: skip
            _Entry(("ffn", pool, "w_gate"), "mlp.experts.{e}.gate_proj.weight", _linear(width, d), experts=first),
            _Entry(("ffn", pool, "w_up"), "mlp.experts.{e}.up_proj.weight", _linear(width, d), experts=first),
            _Entry(("ffn", pool, "w_down"), "mlp.experts.{e}.down_proj.weight", _linear(d, width), experts=first),
        ]
    if t.moe_num_shared_experts:
        out += mlp(("ffn", "shared"), "mlp.shared_experts", t.shared_expert_size)
    return out


def _vision_block(cfg: VLConfig) -> list[_Entry]:
    v = cfg.vision
    d, n, h, f = v.hidden_size, v.num_heads, v.head_dim, v.intermediate_size
    return [
        _Entry(("norm1", "weight"), "norm1.weight", _same((d,))),
        _Entry(("norm1", "bias"), "norm1.bias", _same((d,))),
        _Entry(("norm2", "weight"), "norm2.weight", _same((d,))),
        _Entry(("norm2", "bias"), "norm2.bias", _same((d,))),
        _Entry(("wqkv",), "attn.qkv.weight", _fused_qkv(n, h, d)),
        _Entry(("bqkv",), "attn.qkv.bias", _reshape((3 * n * h,), (3, n, h))),
        _Entry(("wo",), "attn.proj.weight", _heads_in(n, h, d)),
        _Entry(("bo",), "attn.proj.bias", _same((d,))),
        _Entry(("fc1", "weight"), "mlp.fc1.weight", _linear(f, d)),
        _Entry(("fc1", "bias"), "mlp.fc1.bias", _same((f,))),
        _Entry(("fc2", "weight"), "mlp.fc2.weight", _linear(d, f)),
        _Entry(("fc2", "bias"), "mlp.fc2.bias", _same((d,))),
    ]


def _single(path: Path, key: str, transform: Transform) -> TensorMap:
    hf_shape, local_shape, to_local, to_hf = transform
    return TensorMap(path, np.array(key, dtype=object), hf_shape, local_shape, to_local, to_hf)


def _stacked(path: Path, entry: _Entry, keys: np.ndarray) -> TensorMap:
    hf_shape, local_shape, to_local, to_hf = entry.transform
    return TensorMap(path, keys, hf_shape, local_shape, to_local, to_hf, part=entry.part, keep_fp32=entry.fp32)


def tensor_maps(cfg: VLConfig) -> list[TensorMap]:
    """Every parameter of `ErnieVLForConditionalGeneration(cfg)` with its HF sources, in a stable order."""
    t, v = cfg.text, cfg.vision
    d, m = t.hidden_size, v.merged_dim
    maps = [_single(("embed",), "model.embed_tokens.weight", _same((t.vocab_size, d)))]
    layer = 0
    for g, (kind, repeats) in enumerate(t.layer_groups):
        layers = range(layer, layer + repeats)
        layer += repeats
        for entry in _text_layer(cfg, kind):
            if entry.experts is None:
                keys = [f"model.layers.{i}.{entry.hf}" for i in layers]
            else:
                experts = range(entry.experts, entry.experts + t.moe_num_experts)
                keys = [[f"model.layers.{i}.{entry.hf.format(e=e)}" for e in experts] for i in layers]
            maps.append(_stacked(("groups", g, "layer", *entry.local), entry, np.array(keys, dtype=object)))
    maps.append(_single(("final_norm", "weight"), "model.norm.weight", _same((d,))))
    if not cfg.tie_word_embeddings:
        maps.append(_single(("lm_head",), "lm_head.weight", _linear(t.vocab_size, d)))
    vision = "model.vision_model"
    patch_embed = _linear(v.hidden_size, v.patch_dim)
    maps.append(_single(("vision", "patch_embed"), f"{vision}.patch_embed.proj.weight", patch_embed))
    for entry in _vision_block(cfg):
        keys = np.array([f"{vision}.blocks.{j}.{entry.hf}" for j in range(v.depth)], dtype=object)
        maps.append(_stacked(("vision", "blocks", *entry.local), entry, keys))
    maps.append(_single(("vision", "final_norm", "weight"), f"{vision}.ln.weight", _same((v.hidden_size,))))
    maps.append(_single(("vision", "final_norm", "bias"), f"{vision}.ln.bias", _same((v.hidden_size,))))
    resampler = "model.resampler_model"
    for ours, theirs, d_in in (("spatial", "spatial_linear", m), ("temporal", "temporal_linear", 2 * m)):
        maps += [
            _single(("resampler", ours, "fc1", "weight"), f"{resampler}.{theirs}.0.weight", _linear(m, d_in)),
            _single(("resampler", ours, "fc1", "bias"), f"{resampler}.{theirs}.0.bias", _same((m,))),
            _single(("resampler", ours, "fc2", "weight"), f"{resampler}.{theirs}.2.weight", _linear(m, m)),
            _single(("resampler", ours, "fc2", "bias"), f"{resampler}.{theirs}.2.bias", _same((m,))),
            _single(("resampler", ours, "norm", "weight"), f"{resampler}.{theirs}.3.weight", _same((m,))),
            _single(("resampler", ours, "norm", "bias"), f"{resampler}.{theirs}.3.bias", _same((m,))),
        ]
    maps += [
        _single(("resampler", "proj", "weight"), f"{resampler}.mlp.weight", _linear(d, m)),
        _single(("resampler", "proj", "bias"), f"{resampler}.mlp.bias", _same((d,))),
        _single(("resampler", "after_norm", "weight"), f"{resampler}.after_norm.weight", _same((d,))),
    ]
    return maps


def is_ignored_hf_key(key: str, cfg: VLConfig) -> bool:
    """Tensors a checkpoint may carry that this model does not read: a tied head's copy, MTP blocks."""
    return "mtp" in key or (cfg.tie_word_embeddings and key == "lm_head.weight")
