"""Weight-only quantization (ernie_jax/quant.py): int8 and NF4 against numpy written from their definitions, the
quantized forward against fp32 on transformers-written checkpoints, generation, memory, and QLoRA (frozen quantized
base, trainable adapters): init, gradients, resume, export, and against a bf16 LoRA base."""

from __future__ import annotations

import statistics

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax
import sharding
from ernie_jax import quant
from ernie_jax.config import ERNIE_4_5_21B_A3B, ConfigError
from ernie_jax.hf.peft_adapter import ADAPTER_WEIGHTS, save_peft_adapter
from ernie_jax.lora import ALL_TARGETS, LoRAConfig, LoRAParam, add_adapters, convert_base, merge_adapters
from ernie_jax.model import ErnieForCausalLM
from ernie_jax.quant import QuantCodes, QuantizedVariable, QuantizedWeight, QuantScales
from ernie_jax.training.checkpointing import CheckpointMismatchError, TrainCheckpointer
from ernie_jax.training.config import apply_overrides, load_preset
from ernie_jax.training.optim import make_optimizer
from ernie_jax.training.state import build_train_state, split_model
from ernie_jax.training.step import make_train_step, trainable_params
from tests.helpers import SMALL_TRAIN_OVERRIDES, TINY_DENSE, TINY_MOE, hf_model, random_ids, save_hf, write_json

# Stated tolerances against the fp32 model on the random test checkpoints (weights N(0, 0.1), 32-wide rows), as
# (max |Δlogit| / max |logit|, mean |Δlogit| / mean |logit|). Weight-level RMS error on N(0, 1) is 0.7% for int8
# and 9.2% for NF4 (QLoRA's 4 bits); two random layers amplify it about 2.4 times (measured mean: int8 1.3-1.5%,
# NF4 22-24%), hence the loose NF4 bars.
INT8_REL_TOL = (0.03, 0.02)
NF4_REL_TOL = (0.4, 0.3)
# QLoRA against LoRA on a bf16 base (lora.base_dtype=bfloat16), same adapters; bf16's own error is far below int8's.
QLORA_REL_TOL = {"int8": INT8_REL_TOL, "nf4": (0.6, 0.35)}  # measured: int8 2.1e-02 / 1.5e-02, nf4 0.54 / 0.28


def _relative_errors(out, ref) -> tuple[float, float]:
    out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
    diff = np.abs(out - ref)
    return float(diff.max() / np.abs(ref).max()), float(diff.mean() / np.abs(ref).mean())


def _param(w, axes):
    return nnx.Param(jnp.asarray(w), logical_axes=axes, weight_decay=True)


# ------------------------------------------------------------------------------ the math, from the definitions


@pytest.mark.parametrize("in_ndim, out_ndim", [(1, 2), (2, 1)], ids=["wq_like", "wo_like"])
def test_int8_round_trip_per_output_channel(in_ndim, out_ndim):
    rng = np.random.default_rng(0)
    w = rng.normal(size=(2, 6, 8, 5)).astype(np.float32) * rng.uniform(0.1, 3.0, size=(2, 1, 1, 5))  # [R, ...]
    w[1, ..., 3] = 0.0  # an all-zero channel stays exactly zero
    axes = ("layers", "embed", "q_heads", "head_dim")
    q = QuantizedWeight(_param(w, axes), "int8", in_ndim=in_ndim, out_ndim=out_ndim)
    in_axes = tuple(range(4 - out_ndim - in_ndim, 4 - out_ndim))
    # numpy, from the definition: one scale per output channel = max |W| over the contracted axes / 127
    absmax = np.max(np.abs(w), axis=in_axes, keepdims=True)
    scale = np.where(absmax > 0, absmax / 127.0, 1.0).astype(np.float32)
    codes = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
    assert q.codes[...].dtype == jnp.int8 and q.scales[...].dtype == jnp.float32
    got_scale = np.asarray(q.scales[...])
    np.testing.assert_allclose(got_scale, scale, rtol=2e-7)  # XLA may divide by 127 as a multiply
    np.testing.assert_array_equal(np.asarray(q.codes[...]), np.clip(np.round(w / got_scale), -127, 127))
    assert np.mean(np.asarray(q.codes[...]) == codes) > 0.99
    back = np.asarray(q.dequantize(jnp.float32))
    assert np.all(np.abs(back - w) <= scale / 2 * (1 + 1e-6)), "int8 error above half a step of its channel"
    assert np.all(back[1, ..., 3] == 0)
    assert q.shape == w.shape and q.dtype == jnp.float32
    # scales are sharded like the output channels; the contracted axes are size 1 and unsharded
    assert q.scales.get_metadata()["logical_axes"] == tuple(None if i in in_axes else a for i, a in enumerate(axes))
    assert q.codes.get_metadata()["logical_axes"] == axes


def test_nf4_levels_are_the_normal_quantiles_of_qlora():
    """QLoRA's NF4: 8 positive and 7 negative quantiles of N(0, 1) at offset 0.9677, plus 0, scaled to [-1, 1]."""
    offset, ppf = 0.9677083, statistics.NormalDist().inv_cdf
    positive = [ppf(p) for p in np.linspace(offset, 0.5, 9)[:-1]]
    negative = [-ppf(p) for p in np.linspace(offset, 0.5, 8)[:-1]]
    levels = np.sort(np.array([*positive, 0.0, *negative]))
    np.testing.assert_allclose(quant.NF4_LEVELS, levels / np.max(np.abs(levels)), atol=2e-7)


def test_nf4_round_trip_per_block():
    rng = np.random.default_rng(1)
    r, d, f = 2, 128, 6
    w = rng.normal(size=(r, d, f)).astype(np.float32)
    w[0, 64:, 2] = 0.0  # an all-zero block
    q = QuantizedWeight(_param(w, ("layers", "embed", "mlp")), "nf4", in_ndim=1, out_ndim=1)
    # numpy, from the definition: blocks of 64 along the contracted axis share absmax; nearest level; two per byte
    blocks = w.reshape(r, d // 64, 64, f)
    absmax = np.abs(blocks).max(axis=2)
    absmax = np.where(absmax > 0, absmax, 1.0)
    normed = blocks / absmax[:, :, None, :]
    index = np.argmin(np.abs(normed[..., None] - quant.NF4_LEVELS), axis=-1).reshape(r, d, f).astype(np.uint8)
    packed = index[:, 0::2] | (index[:, 1::2] << 4)
    assert q.codes[...].dtype == jnp.uint8 and q.codes[...].shape == (r, d // 2, f)
    np.testing.assert_array_equal(np.asarray(q.scales[...]), absmax.astype(np.float32))
    np.testing.assert_array_equal(np.asarray(q.codes[...]), packed)
    back = np.asarray(q.dequantize(jnp.float32))
    np.testing.assert_allclose(
        back, (quant.NF4_LEVELS[index].reshape(r, d // 64, 64, f) * absmax[:, :, None]).reshape(w.shape), rtol=1e-6
    )
    half_gap = np.max(np.diff(quant.NF4_LEVELS)) / 2
    err = np.abs(back - w).reshape(r, d // 64, 64, f).max(axis=2)
    assert np.all(err <= absmax * half_gap * (1 + 1e-6))
    assert np.all(back[0, 64:, 2] == 0)
    assert q.scales.get_metadata()["logical_axes"] == ("layers", None, "mlp")


# ------------------------------------------------------------------------------ inference on transformers' files

CHECKPOINTS = {"dense": TINY_DENSE, "moe": TINY_MOE}


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    return {name: save_hf(hf_model(cfg), tmp_path_factory.mktemp(name)) for name, cfg in CHECKPOINTS.items()}


@pytest.mark.parametrize("kind", ["int8", "nf4"])
@pytest.mark.parametrize("name", list(CHECKPOINTS))
def test_quantized_forward_against_fp32(checkpoints, name, kind):
    ids = jnp.asarray(random_ids(3, 11, CHECKPOINTS[name].vocab_size, seed=1))
    full = ernie_jax.from_pretrained(checkpoints[name], dtype=jnp.float32, progress=False)
    model = ernie_jax.from_pretrained(checkpoints[name], dtype=jnp.float32, progress=False, quantize=kind)
    weights = quant.matmul_weights(model)
    assert weights and all(isinstance(getattr(m, a), QuantizedWeight) for m, a, _, _ in weights)
    assert not [p for p, v in nnx.iter_graph(model) if isinstance(v, QuantizedVariable) and isinstance(v, nnx.Param)]
    ref, out = np.asarray(full(ids)), np.asarray(model(ids))
    rel = _relative_errors(out, ref)
    print(f"[quant] {name} {kind} vs fp32: max|dlogit|/max|logit| {rel[0]:.2e}, mean|dlogit|/mean|logit| {rel[1]:.2e}")
    assert all(e <= bar for e, bar in zip(rel, INT8_REL_TOL if kind == "int8" else NF4_REL_TOL, strict=True))
    # The matmuls run on exactly the dequantised weights: the same model with them stored as Params agrees.
    dequantised = np.asarray(quant.dequantize(nnx.clone(model))(ids))
    np.testing.assert_allclose(out, dequantised, atol=1e-5, rtol=1e-5)


def test_greedy_generation_of_an_int8_model_is_its_own_argmax_on_one_device_and_the_mesh(checkpoints):
    cfg = CHECKPOINTS["moe"]
    model = ernie_jax.from_pretrained(checkpoints["moe"], dtype=jnp.float32, progress=False, quantize="int8")
    prompts = [list(random_ids(1, n, cfg.vocab_size, seed=n)[0]) for n in (7, 4)]
    new = ernie_jax.generate(model, prompts, max_new_tokens=6, temperature=0.0, eos_token_id=None)
    for prompt, tokens in zip(prompts, new, strict=True):
        assert len(tokens) == 6
        ids = jnp.asarray([prompt + tokens[:-1]])
        argmax = np.asarray(jnp.argmax(model(ids)[0], axis=-1))[len(prompt) - 1 :]
        assert list(argmax) == tokens, "cached greedy decode differs from the full forward's argmax"
    mesh = sharding.make_mesh(data=2, expert=4)
    placed = ernie_jax.from_pretrained(
        checkpoints["moe"], dtype=jnp.float32, mesh=mesh, progress=False, quantize="int8"
    )
    codes = placed.groups[-1].layers[0].ffn.w_gate.codes[...]
    assert codes.dtype == jnp.int8 and codes.sharding.shard_shape(codes.shape)[1] == cfg.moe_num_experts // 4
    stored = nnx.state(placed, QuantizedVariable)
    for var, want in zip(jax.tree.leaves(stored), jax.tree.leaves(sharding.state_shardings(stored, mesh)), strict=True):
        assert var.sharding.is_equivalent_to(want, var.ndim), "codes and scales must sit where the rules put them"
    on_mesh = ernie_jax.generate(placed, prompts, max_new_tokens=6, temperature=0.0, eos_token_id=None, mesh=mesh)
    assert on_mesh == new


def _weight_bytes(model) -> int:
    return quant.nbytes(
        [
            nnx.state(getattr(m, a)) if isinstance(getattr(m, a), QuantizedWeight) else getattr(m, a).get_value()
            for m, a, _, _ in quant.matmul_weights(model)
        ]
    )


def test_memory_against_bf16():
    """Bytes of the state, abstract (nothing allocated): 21B-A3B whole, and the tiny MoE's quantized weights."""
    make = lambda cfg: lambda: ErnieForCausalLM(cfg, rngs=nnx.Rngs(0), dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    bf16 = quant.nbytes(nnx.state(nnx.eval_shape(make(ERNIE_4_5_21B_A3B))))
    ratios = {}
    for kind in ("int8", "nf4"):
        q = quant.nbytes(nnx.state(nnx.eval_shape(lambda k=kind: quant.quantize(make(ERNIE_4_5_21B_A3B)(), k))))
        ratios[kind] = q / bf16
        print(f"[quant] 21B-A3B state: bf16 {bf16 / 1e9:.2f} GB, {kind} {q / 1e9:.2f} GB ({q / bf16:.3f} of bf16)")
    # int8: 1 byte + an fp32 scale per 2560 or 1536 inputs; embeddings, head, router and norms stay bf16/fp32.
    assert 0.49 < ratios["int8"] < 0.52
    assert 0.27 < ratios["nf4"] < 0.30  # half a byte + 4 bytes per 64 values
    before = _weight_bytes(nnx.eval_shape(make(TINY_MOE)))
    after = {k: _weight_bytes(nnx.eval_shape(lambda k=k: quant.quantize(make(TINY_MOE)(), k))) for k in ("int8", "nf4")}
    print(f"[quant] tiny MoE matmul weights: bf16 {before} B, int8 {after['int8']} B, nf4 {after['nf4']} B")
    assert after["int8"] / before <= 0.5 + 2 / 16  # scales: 4 bytes per 16- or 32-wide input
    assert after["nf4"] / before <= 0.25 + 2 / 16


def test_quantize_refuses_what_it_cannot_do(checkpoints, tmp_path):
    write_json(tmp_path / "config.json", {"model_type": "ernie4_5_vl_moe"})  # refused before any tensor is read
    with pytest.raises(ConfigError, match="text models only, not VL"):
        ernie_jax.from_pretrained(tmp_path, quantize="int8")
    model = ernie_jax.from_pretrained(checkpoints["dense"], dtype=jnp.float32, progress=False, quantize="int8")
    with pytest.raises(ValueError, match="already quantized"):
        quant.quantize(model, "nf4")
    with pytest.raises(ValueError, match="text models only"):
        quant.quantize(nnx.Module(), "int8")
    with pytest.raises(ValueError, match="quantize='int4'"):
        ernie_jax.from_pretrained(checkpoints["dense"], quantize="int4")


# ------------------------------------------------------------------------------ QLoRA: frozen quantized base


def _qlora_model(cfg, base_dtype: str, *, perturb: float = 0.0, seed: int = 0, targets=ALL_TARGETS):
    """(base without adapters, model with adapters) sharing one base in `base_dtype`; perturbed adapters matter."""
    lora = LoRAConfig(rank=4, base_dtype=base_dtype, targets=targets)
    model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(seed))
    base = convert_base(nnx.clone(model), lora) if base_dtype in quant.QUANT_KINDS else nnx.clone(model)
    add_adapters(model, lora, seed=seed + 1)
    if perturb:
        state = nnx.state(model, LoRAParam)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
        leaves = [x + perturb * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
        nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return base, convert_base(model, lora)


@pytest.mark.parametrize("kind, cfg", [("int8", TINY_MOE), ("nf4", TINY_DENSE)], ids=["int8_moe", "nf4_dense"])
def test_qlora_at_init_equals_the_quantized_base(kind, cfg):
    base, model = _qlora_model(cfg, kind)
    ids = jnp.asarray(random_ids(2, 12, cfg.vocab_size))
    assert np.array_equal(np.asarray(model(ids)), np.asarray(base(ids)))


def _qlora_run(*extra):
    return apply_overrides(
        load_preset("tiny"), [*SMALL_TRAIN_OVERRIDES, "lora.rank=4", "optim.lr=1e-2", "steps=4", *extra]
    )


def test_qlora_config_and_the_optimizer_never_sees_quantized_weights():
    with pytest.raises(ConfigError, match="lora.base_dtype"):
        _qlora_run("lora.rank=0", "lora.base_dtype=int8")
    with pytest.raises(ConfigError, match="lora.base_dtype"):
        _qlora_run("lora.base_dtype=int4")
    cfg = _qlora_run("lora.base_dtype=int8")
    mesh = sharding.make_mesh(data=-1)
    state = build_train_state(cfg, mesh, abstract=True)
    codes = nnx.filter_state(state.params, QuantCodes)
    assert jax.tree.leaves(codes) and all(x.dtype == jnp.int8 for x in jax.tree.leaves(codes))
    assert jax.tree.leaves(nnx.filter_state(state.params, QuantScales))
    trainable = trainable_params(state.params, cfg)
    assert not jax.tree.leaves(nnx.filter_state(trainable, QuantizedVariable))
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(nnx.filter_state(state.params, LoRAParam)))
    moments = sorted(x.shape for x in jax.tree.leaves(state.opt_state) if x.ndim)
    assert moments == sorted(adapter_shapes * 2), "optimizer state must hold Adam moments of the adapters only"


def test_qlora_only_adapters_get_gradients_and_the_base_stays_quantized():
    # No MTP depths: the hand-made batch below is the plain next-token schema (rows of seq_len).
    cfg = _qlora_run("lora.base_dtype=nf4", "mtp.depth=0", "model.num_nextn_predict_layers=0")
    model = ErnieForCausalLM(cfg.model, rngs=nnx.Rngs(0))
    convert_base(add_adapters(model, cfg.lora, seed=1), cfg.lora)
    graphdef, params, biases = split_model(model)
    trainable = trainable_params(params, cfg)
    optimizer = make_optimizer(cfg.optim, cfg.steps, trainable)
    b, t = cfg.data.global_batch_size, cfg.data.seq_len
    ids = jnp.asarray(random_ids(b, t + 1, cfg.model.vocab_size))
    batch = dict(
        input_ids=ids[:, :-1],
        targets=ids[:, 1:],
        segment_ids=jnp.ones((b, t), jnp.int32),
        positions=jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t)),
        loss_mask=jnp.ones((b, t), jnp.float32),
    )
    step = jax.jit(make_train_step(graphdef, cfg, optimizer))
    state, losses = (params, biases, optimizer.init(trainable)), []
    for i in range(3):
        *state, metrics = step(*state, batch, jnp.int32(i))
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0], losses
    frozen_before, frozen_after = (nnx.filter_state(p, nnx.Not(LoRAParam)) for p in (params, state[0]))
    for (path, a), (_, c) in zip(nnx.to_flat_state(frozen_before), nnx.to_flat_state(frozen_after), strict=True):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(c.get_value())), f"frozen {path} changed"
    assert all(x.dtype == jnp.uint8 for x in jax.tree.leaves(nnx.filter_state(state[0], QuantCodes)))


def test_qlora_checkpoint_restores_exactly_and_refuses_another_base(tmp_path):
    cfg = _qlora_run("lora.base_dtype=int8")
    mesh = sharding.make_mesh(data=-1)
    state = build_train_state(cfg, mesh)
    ckpt = TrainCheckpointer(str(tmp_path / "ckpt"), keep=2, async_save=False)
    kwargs = dict(params=state.params, biases=state.biases, opt_state=state.opt_state)
    ckpt.save(1, **kwargs, data_state={}, model=state.model_config, seed=0)
    ckpt.wait()
    restored = ckpt.restore(1, **kwargs, model=state.model_config)
    saved, back = nnx.to_flat_state(state.params), nnx.to_flat_state(restored["params"])
    for (path, a), (_, c) in zip(saved, back, strict=True):
        a, c = a.get_value(), c.get_value()
        assert a.dtype == c.dtype and np.array_equal(np.asarray(a), np.asarray(c)), path
    other = build_train_state(_qlora_run("lora.base_dtype=nf4"), mesh, abstract=True)
    with pytest.raises(CheckpointMismatchError, match="lora.base_dtype"):
        ckpt.restore(1, params=other.params, biases=other.biases, opt_state=other.opt_state, model=state.model_config)
    ckpt.close()


@pytest.mark.parametrize("kind", ["int8", "nf4"])
def test_qlora_forward_against_lora_on_a_bf16_base(kind):
    ids = jnp.asarray(random_ids(2, 12, TINY_MOE.vocab_size))
    _, bf16 = _qlora_model(TINY_MOE, "bfloat16", perturb=0.05)
    _, qlora = _qlora_model(TINY_MOE, kind, perturb=0.05)
    rel = _relative_errors(qlora(ids), bf16(ids))
    print(f"[quant] QLoRA {kind} vs LoRA on a bf16 base: max {rel[0]:.2e}, mean {rel[1]:.2e} (relative)")
    assert all(e <= bar for e, bar in zip(rel, QLORA_REL_TOL[kind], strict=True))


def test_qlora_exports_merged_dequantised_and_peft(tmp_path):
    targets = ("q_proj", "gate_proj", "experts")  # the other quantized weights have no adapter to fold in
    _, model = _qlora_model(TINY_MOE, "int8", perturb=0.05, targets=targets)
    ids = jnp.asarray(random_ids(2, 12, TINY_MOE.vocab_size))
    merged = merge_adapters(model)
    assert not [v for _, v in nnx.iter_graph(merged) if isinstance(v, QuantizedVariable | LoRAParam)]
    diff = float(np.max(np.abs(np.asarray(merged(ids)) - np.asarray(model(ids)))))
    print(f"[quant] QLoRA merged export vs unmerged: max|dlogit| {diff:.2e}")
    assert diff <= 1e-5
    assert all(getattr(m, a).get_value().dtype == jnp.float32 for m, a, _, _ in quant.matmul_weights(merged))
    save_peft_adapter(model, tmp_path / "adapter", LoRAConfig(rank=4, targets=targets))
    assert (tmp_path / "adapter" / ADAPTER_WEIGHTS).exists()


def test_train_state_bytes_full_lora_qlora():
    """0p3b's train state (params + optimizer state), abstract, for full fine-tuning, LoRA and QLoRA at rank 16."""
    mesh = sharding.make_mesh(data=-1)
    runs = {"full fine-tuning": [], "LoRA": [], "bf16 base": ["lora.base_dtype=bfloat16"]}
    runs |= {f"QLoRA {k}": [f"lora.base_dtype={k}"] for k in ("int8", "nf4")}
    total = {}
    for name, extra in runs.items():
        lora = [] if name == "full fine-tuning" else ["lora.rank=16"]
        state = build_train_state(apply_overrides(load_preset("0p3b"), [*lora, *extra]), mesh, abstract=True)
        params, opt = quant.nbytes(state.params), quant.nbytes(state.opt_state)
        total[name] = params + opt
        print(f"[quant] 0p3b {name}: params {params / 1e6:,.0f} MB + optimizer {opt / 1e6:,.0f} MB")
    assert total["QLoRA nf4"] < total["QLoRA int8"] < total["bf16 base"] < total["LoRA"] < total["full fine-tuning"]
    assert total["QLoRA int8"] < 0.55 * total["LoRA"]


def _losses(run_dir) -> dict[int, float]:
    import json

    with open(run_dir / "metrics.jsonl") as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow  # three trainer runs: about 50 s on 2 cores
def test_qlora_train_resumes_exactly(tmp_path):
    from ernie_jax.training import loop

    run = lambda name, steps: loop.train(
        _qlora_run(
            "lora.base_dtype=nf4",
            "checkpoint.async_save=false",
            "optim.warmup_steps=1",
            "checkpoint.every=2",
            f"steps={steps}",
            f"run_dir={tmp_path / name}",
        ),
        progress=False,
    )
    run("full", 4)
    run("cut", 2)
    assert run("cut", 4)["start_step"] == 2
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [full[s] for s in (3, 4)] == [cut[s] for s in (3, 4)], (full, cut)  # bitwise on CPU
    assert full[4] < full[1], "QLoRA training did not lower the loss"


@pytest.mark.slow  # a trainer run from a transformers checkpoint, then transformers and PEFT: about 40 s on 2 cores
def test_qlora_from_hf_checkpoint_exports_merged_and_peft(tmp_path):
    """--init-from-hf with lora.base_dtype=int8: the loaded base is quantized before training; the merged export
    (dequantised base + adapters) equals PEFT's adapters on the fp32 base within the int8 tolerance."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from ernie_jax.training import loop
    from tests.helpers import hf_logits

    no_mtp = ["mtp.depth=0", "model.num_nextn_predict_layers=0"]
    cfg = _qlora_run(*no_mtp)
    hf_model(cfg.model, seed=3).save_pretrained(tmp_path / "base")
    out = loop.train(
        _qlora_run(
            *no_mtp,
            "lora.base_dtype=int8",
            "steps=3",
            "checkpoint.async_save=false",
            f"run_dir={tmp_path / 'run'}",
            f"init_from_hf={tmp_path / 'base'}",
            f"export_hf={tmp_path / 'merged'}",
            f"export_peft={tmp_path / 'adapter'}",
        ),
        progress=False,
    )
    assert out["end_step"] == 3
    ids = random_ids(2, 10, cfg.model.vocab_size, seed=5)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    base_logits = hf_logits(base, ids)
    merged = hf_logits(AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval(), ids)
    peft = hf_logits(PeftModel.from_pretrained(base, tmp_path / "adapter").eval(), ids)
    rel = _relative_errors(merged, peft)
    print(f"[quant] QLoRA int8 run: merged export vs PEFT on the fp32 base: max {rel[0]:.2e}, mean {rel[1]:.2e}")
    assert all(e <= bar for e, bar in zip(rel, INT8_REL_TOL, strict=True))
    assert float(np.max(np.abs(peft - base_logits))) > 1e-3, "the adapters did not train"
