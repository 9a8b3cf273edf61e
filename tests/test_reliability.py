"""Nothing lost, nothing silent: the trainer's behaviour on dense models, bad inputs, bad records and bad steps.

Each test reproduces a defect a user met (the trainer crashed, trained on NaN, or said nothing) and fails without
its fix. End-to-end process-level faults (signals, kill -9, damaged files) are in test_fault_injection.py.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ernie_jax.data import BadRecordError, DataConfig, make_iterator
from ernie_jax.training import loop as train_mod
from ernie_jax.training.checkpointing import TrainCheckpointer
from ernie_jax.training.config import apply_overrides, load_preset
from tests.helpers import SMALL_TRAIN_OVERRIDES

SMALL = [*SMALL_TRAIN_OVERRIDES, "checkpoint.async_save=false", "optim.warmup_steps=2"]
REAL_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ERNIE-4.5-0.3B-Base")


def small_cfg(run_dir, *extra):
    return apply_overrides(load_preset("tiny"), [*SMALL, f"run_dir={run_dir}", *extra])


def metrics_rows(run_dir) -> list[dict]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def restored_params(run_dir, cfg, step):
    """The params a checkpoint holds, restored through the trainer's own template."""
    import sharding
    from ernie_jax.training.optim import make_optimizer
    from ernie_jax.training.state import build_model, split_model

    model = build_model(cfg, sharding.make_mesh(**cfg.mesh.sizes))
    _, params, biases = split_model(model)
    opt_state = make_optimizer(cfg.optim, cfg.steps, params).init(params)
    ckpt = TrainCheckpointer(os.path.join(run_dir, "checkpoints"), keep=5, async_save=False)
    try:
        return ckpt.restore(step, params=params, biases=biases, opt_state=opt_state, model=cfg.model)["params"]
    finally:
        ckpt.close()


# ----------------------------------------------------------------------------------------------------------------------
# Dense models checkpoint and resume (Orbax refused the empty router-bias tree)
def test_dense_model_checkpoints_and_resumes_exactly(tmp_path):
    # With 2 warmup steps, a 3-step and a 6-step schedule agree on steps 1-3: the 3-step run is a run cut at 3.
    dense = ["model.moe_num_experts=0", "checkpoint.every=3"]
    train_mod.train(small_cfg(tmp_path / "full", *dense, "steps=6"), progress=False)
    train_mod.train(small_cfg(tmp_path / "cut", *dense, "steps=3"), progress=False)
    resumed = train_mod.train(small_cfg(tmp_path / "cut", *dense, "steps=6"), progress=False)
    assert resumed["start_step"] == 3
    full = {r["step"]: r["loss"] for r in metrics_rows(tmp_path / "full")}
    cut = {r["step"]: r["loss"] for r in metrics_rows(tmp_path / "cut")}
    assert [full[s] for s in (4, 5, 6)] == [cut[s] for s in (4, 5, 6)]


# ----------------------------------------------------------------------------------------------------------------------
# The tokenizer must fit the embedding table, checked before step 1
@pytest.mark.skipif(not os.path.isdir(REAL_TOKENIZER), reason="the real ERNIE tokenizer files are not in ../shared")
def test_tokenizer_larger_than_the_vocabulary_is_refused_before_step_one(tmp_path):
    cfg = small_cfg(tmp_path, f"data.tokenizer={REAL_TOKENIZER}", "steps=2")
    with pytest.raises(train_mod.RunStopped, match=r"model.vocab_size: the model has 264 .* has 101304") as info:
        train_mod.train(cfg, progress=False)
    assert info.value.exit_code == train_mod.EXIT_CONFIG
    assert not (tmp_path / "metrics.jsonl").exists(), "a step ran before the check"


def test_byte_tokenizer_larger_than_the_vocabulary_is_refused(tmp_path):
    with pytest.raises(train_mod.RunStopped, match="model.vocab_size=384"):
        train_mod.train(small_cfg(tmp_path, "model.vocab_size=200", "steps=1"), progress=False)


# ----------------------------------------------------------------------------------------------------------------------
# Non-finite steps: checked every step, never applied, never checkpointed, counted
NAN_RUN = ["optim.lr=1e30", "optim.clip_norm=0", "optim.warmup_steps=0"]


def test_nonfinite_stop_between_log_steps_never_checkpoints_a_poisoned_state(tmp_path):
    # Saves at every step, logs every 100: the guard used to look only at log steps and saved NaN weights.
    cfg = small_cfg(tmp_path, *NAN_RUN, "nonfinite=stop", "log_every=100", "checkpoint.every=1", "steps=6")
    with pytest.raises(train_mod.RunStopped, match="nonfinite=stop") as info:
        train_mod.train(cfg, progress=False)
    assert info.value.exit_code == train_mod.EXIT_NONFINITE
    ckpt = TrainCheckpointer(str(tmp_path / "checkpoints"), keep=5)
    steps = ckpt.manager.all_steps()
    ckpt.close()
    for step in steps:
        params = restored_params(tmp_path, cfg, step)
        assert all(np.isfinite(np.asarray(x)).all() for x in _leaves(params)), f"step {step} holds non-finite params"


def test_nonfinite_skip_keeps_the_state_counts_and_fails_a_run_that_did_not_train(tmp_path):
    cfg = small_cfg(tmp_path, *NAN_RUN, "nonfinite=skip", "log_every=100", "checkpoint.every=100", "steps=6")
    out = train_mod.train(cfg, progress=False)
    assert out["steps_run"] == 6 and out["skipped_steps"] >= 5, out  # step 1 applies a huge update, then NaN
    assert out["training_failed"] and train_mod.exit_code(out) == train_mod.EXIT_NONFINITE
    params = restored_params(tmp_path, cfg, 6)
    assert all(np.isfinite(np.asarray(x)).all() for x in _leaves(params))


def test_a_run_with_a_few_skipped_steps_succeeds(tmp_path):
    out = train_mod.train(small_cfg(tmp_path, "steps=3"), progress=False)
    assert out["skipped_steps"] == 0 and not out["training_failed"] and train_mod.exit_code(out) == 0


def _leaves(tree):
    import jax

    return jax.tree.leaves(tree)


# ----------------------------------------------------------------------------------------------------------------------
# Bad records: named by file and line, a policy, and a checkpoint before stopping
def _jsonl_with_a_bad_line(path, bad_line: int, n: int = 120, bad: str = '{"text": "cut short\n') -> str:
    with open(path, "w") as f:
        for i in range(1, n + 1):
            f.write(bad if i == bad_line else json.dumps({"text": f"document {i} " * 6}) + "\n")
    return str(path)


def test_bad_jsonl_record_stops_with_file_and_line_after_saving(tmp_path):
    src = _jsonl_with_a_bad_line(tmp_path / "d.jsonl", bad_line=100)
    cfg = small_cfg(tmp_path / "run", f"data.sources={src}", "data.shuffle=false", "steps=500", "checkpoint.every=1000")
    with pytest.raises(train_mod.RunStopped, match=r"d\.jsonl:100: not valid JSON") as info:
        train_mod.train(cfg, progress=False)
    assert info.value.exit_code == train_mod.EXIT_BAD_RECORD
    saved = TrainCheckpointer(str(tmp_path / "run" / "checkpoints"), keep=2).latest_step()
    assert saved is not None and saved > 0, "the run's progress was not saved before stopping"
    assert f"step {saved}" in str(info.value)
    # The same run resumes with skip, skips exactly that record and finishes.
    out = train_mod.train(apply_overrides(cfg, ["data.on_bad_record=skip", f"steps={saved + 3}"]), progress=False)
    assert out["start_step"] == saved and out["end_step"] == saved + 3 and out["skipped_records"] == 1


@pytest.mark.parametrize(
    "write, where",
    [
        (lambda p: p.write_bytes(b"good text here\n\nsecond one\nbad \xff byte\n"), ":4: not UTF-8"),
        (lambda p: p.write_text('{"text": "ok"}\n{"text": 7}\n'), ":2: field 'text' holds int"),
        (lambda p: p.write_text('{"text": "ok"}\n["a list"]\n'), ":2: no field 'text'"),
    ],
    ids=["txt-not-utf8", "jsonl-int-field", "jsonl-not-an-object"],
)
def test_bad_records_are_named_by_file_and_line_or_skipped(tmp_path, write, where):
    path = tmp_path / ("d.txt" if "UTF" in where else "d.jsonl")
    write(path)
    cfg = DataConfig(sources=(str(path),), seq_len=8, global_batch_size=1, shuffle=False, num_epochs=1)
    with pytest.raises(BadRecordError, match=str(path).replace(".", r"\.") + where):
        list(make_iterator(cfg))
    rows = list(make_iterator(cfg.replace(on_bad_record="skip")))
    assert rows, "skip dropped the good records too"


def test_a_non_string_parquet_column_is_refused_at_startup(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": [1, 2, 3]}), tmp_path / "d.parquet")
    with pytest.raises(ValueError, match="column 'text' holds int64, not text"):
        make_iterator(DataConfig(sources=(str(tmp_path / "d.parquet"),), seq_len=8, global_batch_size=1))


def test_every_record_bad_with_skip_stops_instead_of_spinning(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("not json\n" * 5)
    cfg = DataConfig(sources=(str(path),), seq_len=8, global_batch_size=1, on_bad_record="skip")
    with pytest.raises(BadRecordError, match="every one of the 5 records"):
        next(make_iterator(cfg))


# ----------------------------------------------------------------------------------------------------------------------
# Config errors: one line, the key as typed, allowed values in --help
@pytest.mark.parametrize(
    "override, says",
    [
        ("model.moe_k=99", "model.moe_k: "),
        ("data.seq_len=0", "data.seq_len must be"),
        ("nonfinite=maybe", "nonfinite: 'maybe' is not one of skip, stop"),
        ("optim.decay=cosin", "optim.decay: 'cosin' is not one of cosine, linear, constant"),
        ("mesh.moe_transport=a2a", "mesh.moe_transport: 'a2a' is not one of allgather, ragged_a2a"),
        ("data.on_bad_record=ignore", "data.on_bad_record: 'ignore' is not one of stop, skip"),
    ],
)
def test_config_errors_are_one_line_naming_the_key_as_typed(capsys, override, says):
    assert train_mod.main([override]) == train_mod.EXIT_CONFIG
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and says in err, err
    assert "\n" not in err and "ErnieConfig" not in err and "DataConfig" not in err and "Traceback" not in err


def test_help_lists_allowed_values(capsys):
    with pytest.raises(SystemExit):
        train_mod.parse_args(["--help"])
    out = capsys.readouterr().out
    assert "nonfinite (skip | stop)" in out
    assert "optim.decay (cosine | linear | constant)" in out
    assert "remat (none | full | dots | dots_all | attention)" in out
    assert "export_dtype (auto | float32 | bfloat16 | float16)" in out


# ----------------------------------------------------------------------------------------------------------------------
# Metrics after a resume, the checkpoint fallback, and export dtypes
def test_metrics_rows_are_not_duplicated_after_a_resume(tmp_path):
    train_mod.train(small_cfg(tmp_path, "steps=4", "checkpoint.every=2"), progress=False)
    # As if killed after step 4 was logged but before its checkpoint: drop the newest checkpoint.
    import shutil

    shutil.rmtree(tmp_path / "checkpoints" / "4")
    out = train_mod.train(small_cfg(tmp_path, "steps=5", "checkpoint.every=2"), progress=False)
    assert out["start_step"] == 2
    steps = [r["step"] for r in metrics_rows(tmp_path)]
    assert steps == [1, 2, 3, 4, 5], steps


def test_a_damaged_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, project_logs):
    cfg = small_cfg(tmp_path, "steps=4", "checkpoint.every=2", "checkpoint.keep=5")
    train_mod.train(cfg, progress=False)
    for p in (tmp_path / "checkpoints" / "4" / "params").rglob("*"):
        if p.is_file() and p.stat().st_size > 0:
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    out = train_mod.train(apply_overrides(cfg, ["steps=5"]), progress=False)
    assert out["start_step"] == 2 and out["end_step"] == 5
    assert str(tmp_path / "checkpoints" / "4") in project_logs.text and "damaged-4" in project_logs.text
    assert (tmp_path / "checkpoints" / "damaged-4").is_dir()


def test_export_dtype_follows_the_source_checkpoint(tmp_path):
    from safetensors import safe_open

    from tests.helpers import hf_model

    cfg = small_cfg(tmp_path / "run", "steps=1")
    hf = hf_model(cfg.model, seed=3)
    hf.save_pretrained(tmp_path / "hf_in")  # float32 weights: "auto" must keep them float32
    train_mod.train(
        small_cfg(tmp_path / "run", "steps=1", f"init_from_hf={tmp_path / 'hf_in'}", f"export_hf={tmp_path / 'out'}"),
        progress=False,
    )
    with safe_open(tmp_path / "out" / "model.safetensors", "np") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == np.float32
    train_mod.train(
        small_cfg(tmp_path / "run2", "steps=1", f"export_hf={tmp_path / 'out2'}", "export_dtype=float16"),
        progress=False,
    )
    with safe_open(tmp_path / "out2" / "model.safetensors", "np") as f:
        assert f.get_tensor("model.embed_tokens.weight").dtype == np.float16


# ----------------------------------------------------------------------------------------------------------------------
# from_pretrained: every failure is a CheckpointError naming the path
def test_from_pretrained_failures_name_the_path(tmp_path):
    import ernie_jax
    from tests.helpers import TINY_DENSE, hf_model

    with pytest.raises(ernie_jax.CheckpointError, match=str(tmp_path / "missing")):
        ernie_jax.from_pretrained(tmp_path / "missing")
    good = tmp_path / "good"
    hf_model(TINY_DENSE).save_pretrained(good)
    with pytest.raises(ernie_jax.CheckpointError, match="is a file; pass the checkpoint directory"):
        ernie_jax.from_pretrained(good / "model.safetensors")
    truncated = tmp_path / "truncated"
    hf_model(TINY_DENSE).save_pretrained(truncated)
    weights = truncated / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ernie_jax.CheckpointError, match=str(truncated)):
        ernie_jax.from_pretrained(truncated)
    no_config = tmp_path / "no_config"
    hf_model(TINY_DENSE).save_pretrained(no_config)
    os.remove(no_config / "config.json")
    with pytest.raises(ernie_jax.CheckpointError, match=str(no_config)):
        ernie_jax.from_pretrained(no_config)


# ----------------------------------------------------------------------------------------------------------------------
# The first thing a newcomer sees: the embedded default learns words
@pytest.mark.slow
@pytest.mark.first  # about 3 minutes alone, 8 beside the other worker
def test_the_embedded_default_ends_below_1_7_nats_with_a_sample_of_words(tmp_path):
    import subprocess
    import sys

    from tests.test_fault_injection import ROOT, environment

    # Exactly the README's first command, as a user runs it (one CPU device, no test settings).
    done = subprocess.run(
        [sys.executable, "-m", "ernie_jax.train", f"run_dir={tmp_path}"],
        cwd=ROOT,
        env={k: v for k, v in environment().items() if k != "XLA_FLAGS"},  # optimised code, as a user runs it
        capture_output=True,
        text=True,
        timeout=1200,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    last_five = [r["ce"] for r in metrics_rows(tmp_path)][-5:]
    assert float(np.mean(last_five)) <= 1.7, last_five
    sample = next(line for line in done.stdout.splitlines() if line.startswith("sample: "))
    words = sample.split()[1:]
    assert len(words) >= 5 and len(set(words)) >= 4, sample  # not 'The and the and the ...'
