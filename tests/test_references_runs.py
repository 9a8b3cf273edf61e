"""Independent references for whole runs: checkpoint restore, --init-from-hf and export, data over processes, and
resume onto another mesh, each against what a correct run must give (the checkpoint's own logits, an uninterrupted
run, disjoint shards). Not marked slow: the mutation check relies on them (see tests/test_references.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ernie_jax.training.config import apply_overrides, load_preset
from ernie_jax.training.optim import make_optimizer
from ernie_jax.training.state import split_model
from tests.test_references import tiny_model, train_cfg

# ------------------------------------------------------------------------------------ checkpoints, --init-from-hf


def test_checkpoint_restore_returns_the_saved_optimizer_state(tmp_path):
    """Restore into a fresh template must give back what was saved: parameters, router biases and the Adam
    moments and step count (a resume with freshly initialised moments would silently restart Adam)."""
    from ernie_jax.training.checkpointing import TrainCheckpointer

    model = tiny_model()
    _, params, biases = split_model(model)
    optimizer = make_optimizer(train_cfg().optim, 10, params)
    fresh = optimizer.init(params)
    grads = jax.tree.map(lambda p: jnp.full_like(p, 0.5), params)
    _, trained = optimizer.update(grads, fresh, params)  # moments and count now differ from a fresh init
    biases = jax.tree.map(lambda b: b + 0.25, biases)
    ckpt = TrainCheckpointer(str(tmp_path), keep=1, async_save=False)
    ckpt.save(4, params=params, biases=biases, opt_state=trained, data_state={}, model=model.config, seed=0)
    ckpt.wait()
    template_params = jax.tree.map(jnp.zeros_like, params)
    template_biases = jax.tree.map(jnp.zeros_like, biases)
    restored = ckpt.restore_latest(params=template_params, biases=template_biases, opt_state=fresh, model=model.config)
    ckpt.close()
    assert restored["step"] == 4
    for got, saved in ((restored["params"], params), (restored["biases"], biases), (restored["opt_state"], trained)):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, saved)


def test_init_from_hf_with_no_update_exports_the_checkpoint_logits(tmp_path):
    """Train one step from a transformers checkpoint with a learning rate so small that no fp32 weight moves and
    the bias update off, export, and the export's logits must be the original checkpoint's (transformers')."""
    from ernie_jax import from_pretrained
    from ernie_jax.training import loop as train_mod
    from tests.helpers import SMALL_TRAIN_OVERRIDES, hf_logits, hf_model, random_ids

    overrides = [*SMALL_TRAIN_OVERRIDES, "checkpoint.async_save=false", f"run_dir={tmp_path / 'run'}"]
    cfg = apply_overrides(load_preset("tiny"), overrides)
    hf = hf_model(cfg.model, seed=5)
    hf.save_pretrained(tmp_path / "hf_in")
    train_mod.train(
        apply_overrides(
            cfg,
            [
                "steps=1",
                "optim.lr=1e-30",
                "moe_loss.bias_update_rate=0",
                f"init_from_hf={tmp_path / 'hf_in'}",
                f"export_hf={tmp_path / 'hf_out'}",
            ],
        ),
        progress=False,
    )
    ids = random_ids(2, 12, cfg.model.vocab_size, seed=5)
    exported = from_pretrained(tmp_path / "hf_out", dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(exported(jnp.asarray(ids))), hf_logits(hf, ids), atol=1e-4, rtol=1e-5)


# --------------------------------------------------------------------------------------- data over processes


@pytest.mark.parametrize("mode", ["documents", "rows"])
def test_processes_read_disjoint_parts_of_one_stream(tmp_path, mode):
    """Two processes together see each document exactly once ("documents": each reads its own half of the
    documents) or exactly the one-process global batch, split by rows ("rows")."""
    import json
    import re

    from ernie_jax.data import DataConfig, make_iterator
    from ernie_jax.data.tokenizers import ByteTokenizer

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"#{i}# " + "ab " * (i % 5 + 2)}) + "\n" for i in range(20)))
    cfg = DataConfig(
        sources=(str(path),), seq_len=16, global_batch_size=4, num_epochs=1, shuffle=False, process_sharding=mode
    )
    parts = [list(make_iterator(cfg, process_index=p, process_count=2)) for p in range(2)]
    if mode == "rows":
        whole = list(make_iterator(cfg))
        assert len(whole) == len(parts[0]) == len(parts[1]) > 1
        for batch, first, second in zip(whole, *parts, strict=True):
            for key, rows in batch.items():
                np.testing.assert_array_equal(np.concatenate([first[key], second[key]]), rows, err_msg=key)
        return
    tokenizer = ByteTokenizer()
    seen = []
    for batches in parts:
        text = "".join(
            tokenizer.decode(row[seg > 0].tolist())
            for b in batches
            for row, seg in zip(b["input_ids"], b["segment_ids"], strict=True)
        )
        seen.append(sorted(int(i) for i in re.findall(r"#(\d+)#", text)))
    assert set(seen[0]).isdisjoint(seen[1]) and sorted(seen[0] + seen[1]) == list(range(20)), seen


# ------------------------------------------------------------------------------------------ resume onto a new mesh


def test_resume_onto_another_mesh_continues_the_uninterrupted_run(tmp_path):
    """Stopped after 2 steps on an 8-way data-parallel mesh and resumed on fsdp 2 x expert 4, the run's losses at
    steps 3 and 4 equal an uninterrupted run's (to reduction-order rounding): parameters, Adam moments, router
    biases and the data position all carried over."""
    import json

    from ernie_jax.training import loop as train_mod
    from tests.helpers import SMALL_TRAIN_OVERRIDES

    def run(run_dir, *extra):
        cfg = apply_overrides(
            load_preset("tiny"),
            [
                *SMALL_TRAIN_OVERRIDES,
                "checkpoint.async_save=false",
                "optim.warmup_steps=1",
                f"run_dir={run_dir}",
                *extra,
            ],
        )
        train_mod.train(cfg, progress=False)
        with open(run_dir / "metrics.jsonl") as f:
            return {r["step"]: r["loss"] for r in map(json.loads, f)}

    whole = run(tmp_path / "whole", "steps=4", "mesh.data=-1")
    run(tmp_path / "cut", "steps=2", "checkpoint.every=2", "mesh.data=-1")
    resumed = run(tmp_path / "cut", "steps=4", "mesh.data=1", "mesh.fsdp=2", "mesh.expert=4")
    np.testing.assert_allclose([resumed[3], resumed[4]], [whole[3], whole[4]], rtol=2e-5)


def test_export_equals_the_trained_checkpoint(tmp_path):
    """After real training (parameters and router biases moved), the fp32 Hugging Face export holds exactly the
    final checkpoint's parameters and router biases."""
    from ernie_jax import from_pretrained
    from ernie_jax.training import loop as train_mod
    from ernie_jax.training.checkpointing import TrainCheckpointer
    from tests.helpers import SMALL_TRAIN_OVERRIDES

    cfg = apply_overrides(
        load_preset("tiny"),
        [
            *SMALL_TRAIN_OVERRIDES,
            "checkpoint.async_save=false",
            "optim.warmup_steps=1",
            "steps=2",
            "moe_loss.bias_update_rate=0.05",  # router biases move visibly
            "export_dtype=float32",
            f"run_dir={tmp_path / 'run'}",
            f"export_hf={tmp_path / 'hf_out'}",
        ],
    )
    train_mod.train(cfg, progress=False)
    exported = from_pretrained(tmp_path / "hf_out", dtype=jnp.float32)
    _, params, biases = split_model(exported)
    opt_template = make_optimizer(cfg.optim, cfg.steps, params).init(params)
    ckpt = TrainCheckpointer(str(tmp_path / "run" / "checkpoints"), keep=2, async_save=False)
    # The run's own config: the export writes moe_layer_end_index resolved (1, not -1), the same architecture.
    restored = ckpt.restore_latest(params=params, biases=biases, opt_state=opt_template, model=cfg.model)
    ckpt.close()
    assert restored["step"] == 2
    moved = jax.tree.leaves(jax.tree.map(lambda b: float(jnp.max(jnp.abs(b))), restored["biases"]))
    assert max(moved) > 0.05, "the router biases must have moved for this check to mean anything"
    for got, saved in ((params, restored["params"]), (biases, restored["biases"])):
        jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), got, saved)
