"""LoRA: init equals the base model, only adapters train, merged equals unmerged, the mesh equals one device, resume
is exact, and the exports (merged HF model, PEFT adapter) give transformers the same logits as ours."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sharding
from ernie_jax.config import ConfigError
from ernie_jax.hf.checkpoint import save_pretrained
from ernie_jax.hf.peft_adapter import ADAPTER_WEIGHTS, save_peft_adapter
from ernie_jax.lora import ALL_TARGETS, LoRAConfig, LoRAParam, adapters, add_adapters, merge_adapters
from ernie_jax.model import ErnieForCausalLM
from ernie_jax.training import loop as train_mod
from ernie_jax.training.config import apply_overrides, load_preset
from ernie_jax.training.optim import make_optimizer
from ernie_jax.training.state import split_model
from ernie_jax.training.step import make_train_step, trainable_params
from tests.helpers import SMALL_TRAIN_OVERRIDES, TINY_DENSE, TINY_MOE, TINY_MOE_INTERVAL, hf_logits, random_ids


def lora_model(cfg, lora: LoRAConfig, *, seed: int = 0, perturb: float = 0.0):
    """A random model with adapters; `perturb` > 0 gives B (and A) random values so the adapters matter."""
    model = ErnieForCausalLM(cfg, rngs=nnx.Rngs(seed))
    base = nnx.clone(model)
    add_adapters(model, lora, seed=seed + 1)
    if perturb:
        state = nnx.state(model, LoRAParam)
        leaves, treedef = jax.tree.flatten(state)
        keys = jax.random.split(jax.random.key(seed + 2), len(leaves))
        leaves = [x + perturb * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
        nnx.update(model, jax.tree.unflatten(treedef, leaves))
    return base, model


def test_lora_config_defaults_and_errors():
    cfg = LoRAConfig(rank=8)
    assert cfg.resolved_alpha == 16 and cfg.scale == 2.0  # ERNIEKit: alpha = 2 * rank
    assert LoRAConfig(rank=16, alpha=8, rslora=True).scale == 2.0  # alpha / sqrt(rank)
    with pytest.raises(ConfigError, match="lora.targets"):
        LoRAConfig(rank=8, targets=("q_proj", "qkv"))
    with pytest.raises(ConfigError, match="lora.rank"):
        LoRAConfig(rank=-1)
    run = apply_overrides(load_preset("tiny"), ["lora.rank=4", "lora.alpha=2", "lora.targets=q_proj,v_proj"])
    assert run.lora == LoRAConfig(rank=4, alpha=2.0, targets=("q_proj", "v_proj"))
    with pytest.raises(ConfigError, match="export_peft"):
        apply_overrides(load_preset("tiny"), ["export_peft=/tmp/x"])


@pytest.mark.parametrize("cfg", [TINY_DENSE, TINY_MOE, TINY_MOE_INTERVAL], ids=["dense", "moe", "moe_interval"])
def test_lora_at_init_equals_base_exactly(cfg):
    base, model = lora_model(cfg, LoRAConfig(rank=4))
    found = {(type(m).__name__, name) for m, name, _ in adapters(model)}
    expected = {("Attention", w) for w in ("wq", "wk", "wv", "wo")}
    expected |= {("MLP", w) for w in ("gate", "up", "down")}  # dense layers and shared experts
    if cfg.is_moe:
        expected |= {("MoEBlock", w) for w in ("w_gate", "w_up", "w_down")}
    assert found == expected
    ids = jnp.asarray(random_ids(2, 12, cfg.vocab_size))
    assert np.array_equal(np.asarray(model(ids)), np.asarray(base(ids)))
    for _, _, adapter in adapters(model):
        assert not np.any(np.asarray(adapter.b[...])), "B must start at zero"


@pytest.mark.parametrize("cfg", [TINY_DENSE, TINY_MOE, TINY_MOE_INTERVAL], ids=["dense", "moe", "moe_interval"])
def test_merged_forward_equals_unmerged(cfg):
    _, model = lora_model(cfg, LoRAConfig(rank=4, alpha=16, rslora=True), perturb=0.05)
    ids = jnp.asarray(random_ids(2, 12, cfg.vocab_size))
    unmerged = np.asarray(model(ids))
    merged_model = merge_adapters(model)
    assert not nnx.state(merged_model, LoRAParam)  # plain base architecture
    diff = float(np.max(np.abs(np.asarray(merged_model(ids)) - unmerged)))
    print(f"[lora] {cfg.model_type} merged vs unmerged fp32 max|dlogit|={diff:.2e}")
    assert diff <= 1e-5


def _step_pieces(*extra):
    cfg = apply_overrides(load_preset("tiny"), [*SMALL_TRAIN_OVERRIDES, "lora.rank=4", "optim.lr=1e-2", *extra])
    model = ErnieForCausalLM(cfg.model, rngs=nnx.Rngs(0))
    add_adapters(model, cfg.lora, seed=1)
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
    return cfg, graphdef, params, biases, trainable, optimizer, batch


def test_only_adapters_get_gradients_and_optimizer_state():
    cfg, graphdef, params, biases, trainable, optimizer, batch = _step_pieces()
    adapter_shapes = sorted(x.shape for x in jax.tree.leaves(nnx.filter_state(params, LoRAParam)))
    assert sorted(x.shape for x in jax.tree.leaves(trainable)) == adapter_shapes
    opt_state = optimizer.init(trainable)
    moments = sorted(x.shape for x in jax.tree.leaves(opt_state) if x.ndim)
    assert moments == sorted(adapter_shapes * 2), "optimizer state must hold Adam moments of the adapters only"
    step = jax.jit(make_train_step(graphdef, cfg, optimizer))
    losses, state = [], (params, biases, opt_state)
    for i in range(4):
        *state, metrics = step(*state, batch, jnp.int32(i))
        losses.append(float(metrics["loss"]))
    new_params, new_biases, _ = state
    assert losses[-1] < losses[0], losses
    base_before = nnx.filter_state(params, nnx.Not(LoRAParam))
    base_after = nnx.filter_state(new_params, nnx.Not(LoRAParam))
    for (path, a), (_, b) in zip(nnx.to_flat_state(base_before), nnx.to_flat_state(base_after), strict=True):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), f"base weight {path} changed"
    for a, b in zip(jax.tree.leaves(biases), jax.tree.leaves(new_biases), strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b)), "router biases must stay frozen"
    before, after = nnx.filter_state(params, LoRAParam), nnx.filter_state(new_params, LoRAParam)
    for (path, a), (_, b) in zip(nnx.to_flat_state(before), nnx.to_flat_state(after), strict=True):
        if path[-1] == "b":
            assert np.any(np.asarray(a.get_value()) != np.asarray(b.get_value())), f"adapter {path} did not train"


NON_EXPERT_TARGETS = "lora.targets=" + ",".join(t for t in ALL_TARGETS if t != "experts")


def test_adapter_dropout_drops_inputs_unbiased_and_only_with_a_key():
    _, model = lora_model(TINY_DENSE, LoRAConfig(rank=4, dropout=0.25, targets=("q_proj",)), perturb=0.5)
    (_, _, adapter), *_ = adapters(model)
    layer = jax.tree.map(lambda v: v[0], nnx.state(adapter))  # the first layer's adapter (stacked over layers)
    one = nnx.merge(nnx.graphdef(adapter), layer)
    x = jax.random.normal(jax.random.key(0), (3, TINY_DENSE.hidden_size))
    exact = np.asarray(one(x))
    assert np.array_equal(np.asarray(one(x, None)), exact)  # no key: evaluation and generation never drop
    keys = jax.random.split(jax.random.key(1), 4000)
    dropped = np.asarray(jax.vmap(lambda k: one(x, k))(keys))  # [K, 3, N, H]
    assert not np.allclose(dropped[0], exact) and not np.allclose(dropped[0], dropped[1])
    # The adapter is linear in its input, so inverted dropout (kept inputs scaled by 1/(1-p)) is unbiased.
    np.testing.assert_allclose(dropped.mean(axis=0), exact, atol=0.06 * np.abs(exact).max())
    kept = np.asarray(jax.vmap(lambda k: jax.random.bernoulli(k, 0.75, x.shape))(keys)).mean()
    assert abs(kept - 0.75) < 0.01


def test_adapter_dropout_in_the_train_step_follows_the_step_number():
    """The step draws its dropout masks from (seed, step): the same step twice is bitwise equal, another step or no
    dropout trains the adapters differently."""
    updates = {}
    for name, extra in {"p0": ("lora.dropout=0",), "p5": ("lora.dropout=0.5",)}.items():
        cfg, graphdef, params, biases, trainable, optimizer, batch = _step_pieces(
            NON_EXPERT_TARGETS, "optim.warmup_steps=0", *extra
        )
        step = jax.jit(make_train_step(graphdef, cfg, optimizer))
        for i in (0, 0, 1):
            new_params, *_ = step(params, biases, optimizer.init(trainable), batch, jnp.int32(i))
            updates.setdefault(name, []).append(jax.tree.leaves(nnx.filter_state(new_params, LoRAParam)))
    same = lambda a, b: all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(a, b, strict=True))
    p0, p5 = updates["p0"], updates["p5"]
    assert same(p0[0], p0[2]), "without dropout the step number must not matter"
    assert same(p5[0], p5[1]), "the same step must draw the same masks"
    assert not same(p5[0], p5[2]), "another step must draw other masks"
    assert not same(p5[0], p0[0]), "dropout had no effect"


def test_adapter_dropout_on_routed_experts_is_refused():
    model = ErnieForCausalLM(TINY_MOE, rngs=nnx.Rngs(0))
    with pytest.raises(ConfigError, match="lora.dropout.*lora.targets=q_proj"):
        add_adapters(model, LoRAConfig(rank=4, dropout=0.1))
    add_adapters(model, LoRAConfig(rank=4, dropout=0.1, targets=("q_proj", "gate_proj")))  # shared experts: fine


def test_lora_on_the_mesh_equals_one_device():
    """Logits and adapter gradients of a perturbed LoRA MoE on {data 2 x expert 4} equal one device's."""
    _, model = lora_model(TINY_MOE, LoRAConfig(rank=4), perturb=0.05)
    graphdef, adapters_state, rest = nnx.split(model, LoRAParam, ...)
    ids = jnp.asarray(random_ids(8, 8, TINY_MOE.vocab_size))

    def loss(adapters_state, rest, ids):
        logits = nnx.merge(graphdef, adapters_state, rest)(ids)
        return jnp.mean(jnp.square(logits)), logits

    grad_fn = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (_, ref_logits), ref_grads = grad_fn(adapters_state, rest, ids)
    mesh = sharding.make_mesh(data=2, expert=4)
    placed = [sharding.shard_state(s, mesh) for s in (adapters_state, rest)]
    batch = jax.sharding.NamedSharding(mesh, sharding.logical_to_spec(("batch", None), mesh))
    with sharding.use_mesh(mesh):
        (_, logits), grads = grad_fn(*placed, jax.device_put(ids, batch))
    worst_logit = float(np.max(np.abs(np.asarray(logits) - np.asarray(ref_logits))))
    worst_grad = max(
        float(np.max(np.abs(np.asarray(g) - np.asarray(r))))
        for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads), strict=True)
    )
    print(f"[lora] mesh data2_expert4 vs one device: max|dlogit|={worst_logit:.2e} max|dgrad|={worst_grad:.2e}")
    assert worst_logit <= 1e-5 and worst_grad <= 1e-5


def _trainer_cfg(run_dir, *extra):
    return apply_overrides(
        load_preset("tiny"),
        [
            *SMALL_TRAIN_OVERRIDES,
            "checkpoint.async_save=false",
            "optim.warmup_steps=1",
            "optim.lr=1e-2",
            "lora.rank=4",
            f"run_dir={run_dir}",
            *extra,
        ],
    )


def _losses(run_dir) -> dict[int, float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


@pytest.mark.slow  # three trainer runs: about 45 s on 2 cores
def test_lora_resume_is_exact(tmp_path):
    """With adapter dropout too: the resumed run draws the same masks as the uninterrupted one."""
    drop = ("lora.dropout=0.1", NON_EXPERT_TARGETS)
    train_mod.train(_trainer_cfg(tmp_path / "full", "steps=4", "checkpoint.every=2", *drop), progress=False)
    train_mod.train(_trainer_cfg(tmp_path / "cut", "steps=2", "checkpoint.every=2", *drop), progress=False)
    resumed = train_mod.train(_trainer_cfg(tmp_path / "cut", "steps=4", "checkpoint.every=2", *drop), progress=False)
    assert resumed["start_step"] == 2
    full, cut = _losses(tmp_path / "full"), _losses(tmp_path / "cut")
    assert [full[s] for s in (3, 4)] == [cut[s] for s in (3, 4)], (full, cut)  # bitwise on CPU
    assert full[4] < full[1], "LoRA training did not lower the loss"


def _torch_ids(cfg):
    return random_ids(2, 10, cfg.vocab_size, seed=5)


@pytest.mark.parametrize(
    "cfg, targets, rslora",
    [
        (TINY_DENSE, ALL_TARGETS, False),
        (TINY_MOE, ALL_TARGETS, False),
        (TINY_MOE_INTERVAL, ALL_TARGETS, True),
        (TINY_MOE, ("q_proj", "gate_proj", "experts"), False),  # experts: gate only, one PEFT wrapper
    ],
    ids=["dense", "moe", "moe_interval_rslora", "moe_gate_only"],
)
def test_merged_export_and_peft_adapter_match_transformers(tmp_path, cfg, targets, rslora):
    """Our unmerged LoRA logits = transformers on the merged export = transformers + PEFT on the base checkpoint,
    routed-expert adapters included (PEFT's wrapper of the fused expert tensors)."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    ids = _torch_ids(cfg)
    lora = LoRAConfig(rank=4, alpha=6, targets=targets, rslora=rslora)
    base, model = lora_model(cfg, lora, perturb=0.05)
    ours = np.asarray(model(jnp.asarray(ids)))
    save_pretrained(base, tmp_path / "base", dtype=jnp.float32, progress=False)
    save_pretrained(merge_adapters(model), tmp_path / "merged", dtype=jnp.float32, progress=False)
    save_peft_adapter(model, tmp_path / "adapter", lora)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(
        AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32), tmp_path / "adapter"
    ).eval()
    merged_logits, peft_logits = hf_logits(merged, ids), hf_logits(peft_model, ids)
    merged_vs_ours = float(np.max(np.abs(merged_logits - ours)))
    peft_vs_merged = float(np.max(np.abs(peft_logits - merged_logits)))
    peft_vs_base = float(np.max(np.abs(peft_logits - np.asarray(base(jnp.asarray(ids))))))
    what = f"{cfg.model_type} {len(targets)} targets{' rslora' if rslora else ''}"
    print(f"[lora] {what}: merged export vs ours {merged_vs_ours:.2e}, PEFT vs merged {peft_vs_merged:.2e}")
    assert merged_vs_ours <= 1e-5 and peft_vs_merged <= 1e-5
    assert peft_vs_base > 1e-2, "the PEFT adapter did not change the model"


def test_peft_adapter_names_and_layout(tmp_path):
    """Attention as target modules; an MoE model's dense and shared MLPs as target parameters (PEFT 0.21 would move
    module targets named *_proj onto the fused experts); routed experts as the fused tensors, gate_up at rank 2r."""
    from safetensors.numpy import load_file

    cfg = TINY_MOE  # D 32, experts 8 x F 16, shared 2 x 16
    _, model = lora_model(cfg, LoRAConfig(rank=4), perturb=0.05)
    save_peft_adapter(model, tmp_path / "adapter", LoRAConfig(rank=4))
    names = load_file(tmp_path / "adapter" / ADAPTER_WEIGHTS)
    assert names["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"].shape == (4, 32)
    assert names["base_model.model.model.layers.1.mlp.shared_experts.down_proj.lora_B.weight"].shape == (32, 4)
    assert names["base_model.model.model.layers.1.mlp.experts.base_layer.lora_A.weight"].shape == (8 * 8, 32)
    assert names["base_model.model.model.layers.1.mlp.experts.base_layer.lora_B.weight"].shape == (2 * 16, 8 * 8)
    assert names["base_model.model.model.layers.2.mlp.experts.lora_A.weight"].shape == (8 * 4, 16)
    with open(tmp_path / "adapter" / "adapter_config.json") as f:
        config = json.load(f)
    assert all("self_attn" in m for m in config["target_modules"])
    assert "model.layers.0.mlp.gate_proj.weight" in config["target_parameters"]
    assert "model.layers.2.mlp.experts.gate_up_proj" in config["target_parameters"]
    assert config["rank_pattern"] == {r".*\.gate_up_proj": 8} and config["alpha_pattern"] == {r".*\.gate_up_proj": 16}


def test_lora_sft_command_exports_merged_and_peft(tmp_path):
    """The trainer with --init-from-hf, lora.rank, export_hf and export_peft on the tiny MoE: PEFT on the base
    equals the merged export, every adapter (routed experts included) trained."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from tests.helpers import hf_model

    cfg = _trainer_cfg(tmp_path / "run", "steps=3")
    hf_model(cfg.model, seed=3).save_pretrained(tmp_path / "base")
    out = train_mod.train(
        _trainer_cfg(
            tmp_path / "run",
            "steps=3",
            f"init_from_hf={tmp_path / 'base'}",
            f"export_hf={tmp_path / 'merged'}",
            f"export_peft={tmp_path / 'adapter'}",
        ),
        progress=False,
    )
    assert out["end_step"] == 3
    ids = _torch_ids(cfg.model)
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32).eval()
    base_logits = hf_logits(base, ids)
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32).eval()
    peft_model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    merged_logits, peft_logits = hf_logits(merged, ids), hf_logits(peft_model, ids)
    diff = float(np.max(np.abs(peft_logits - merged_logits)))
    print(f"[lora] trainer export: PEFT vs merged {diff:.2e}")
    assert diff <= 1e-5
    assert float(np.max(np.abs(merged_logits - base_logits))) > 1e-3, "the export did not carry the training"
