"""Fault injection, end to end: the trainer as a user runs it (a subprocess), signalled, killed and damaged.

Each scenario checks what the user sees (exit code, one clear line, no libtpu noise) and that nothing is lost
beyond the last checkpoint interval: a run interrupted and resumed ends bit for bit where an uninterrupted run
ends (CPU).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.helpers import SMALL_TRAIN_OVERRIDES

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 60
RUN = [*SMALL_TRAIN_OVERRIDES, "optim.warmup_steps=2", f"steps={STEPS}", "checkpoint.every=10"]
NOISE = ("E0000", "Failed to find host bounds", "Traceback", "InitGoogle")


def command(run_dir, *extra) -> list[str]:
    return [sys.executable, "-m", "ernie_jax.train", *RUN, f"run_dir={run_dir}", *extra]


def environment() -> dict[str, str]:
    """A user's shell: no test-only JAX settings (libtpu noise must be kept away by the package itself), except
    the session's compilation cache (tests/conftest.py). XLA_FLAGS stays: it carries only conftest's faster XLA:CPU
    compile level unless the caller set more."""
    cache = (
        "JAX_COMPILATION_CACHE_DIR",
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
        "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "TPU_")) or k in cache}
    env["PYTHONPATH"] = ROOT  # as after `pip install -e .`, without depending on the caller's working directory
    return env


def run(run_dir, *extra, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run(
        command(run_dir, *extra), cwd=ROOT, env=environment(), capture_output=True, text=True, timeout=timeout
    )


def start(run_dir, *extra) -> subprocess.Popen:
    return subprocess.Popen(
        command(run_dir, *extra), cwd=ROOT, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def logged_steps(run_dir) -> list[int]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line)["step"] for line in f if line.endswith("\n")]


def final_loss(run_dir) -> float:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return next(r["loss"] for r in rows if r["step"] == STEPS)


def finalized_steps(run_dir) -> list[int]:
    folder = os.path.join(run_dir, "checkpoints")
    return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def interrupt_at(run_dir, step: int, sig: int, *extra, after_save: int | None = None) -> subprocess.CompletedProcess:
    """Start a run, send `sig` once it has logged `step` (and finalised the checkpoint `after_save`), and wait."""
    proc = start(run_dir, *extra)
    deadline = time.time() + 240
    while not any(s >= step for s in logged_steps(run_dir)) or (
        after_save is not None and after_save not in finalized_steps(run_dir)
    ):
        if proc.poll() is not None or time.time() > deadline:
            out, err = proc.communicate()
            pytest.fail(f"the run ended or hung before step {step}: rc={proc.returncode}\n{err[-2000:]}")
        time.sleep(0.02)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=240)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def assert_quiet(stderr: str) -> None:
    """No libtpu or traceback noise, and every log line on its own line (not glued onto the progress bar)."""
    for marker in NOISE:
        assert marker not in stderr, f"{marker!r} in stderr:\n{stderr[-3000:]}"
    for piece in stderr.replace("\r", "\n").split("\n"):
        if " WARNING " in piece or " INFO " in piece:
            assert "train:" not in piece and piece.strip()[:2].isdigit(), f"log line not on its own line: {piece!r}"


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("uninterrupted")
    done = run(run_dir)
    assert done.returncode == 0, done.stderr[-3000:]
    assert_quiet(done.stderr)
    assert "INFO tiny:" in done.stderr and "params" in done.stderr, "the trainer's INFO lines are not shown"
    return final_loss(run_dir)


def test_sigterm_saves_exits_143_and_resumes_exactly(tmp_path, uninterrupted):
    export = tmp_path / "export"
    stopped = interrupt_at(tmp_path, 15, signal.SIGTERM, f"export_hf={export}")
    assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-3000:]
    assert "SIGTERM: checkpoint saved at step" in stopped.stderr and "export_hf is written when" in stopped.stderr
    assert not export.exists(), "a run cut short must not export a half-trained model as if it were done"
    assert_quiet(stopped.stderr)
    saved = max(finalized_steps(tmp_path))
    assert 15 <= saved < STEPS and saved % 10, "the SIGTERM save did not happen at the step reached"
    resumed = run(tmp_path, f"export_hf={export}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"Resumed from {tmp_path / 'checkpoints' / str(saved)} at step {saved}" in resumed.stderr
    assert logged_steps(tmp_path) == list(range(1, STEPS + 1)), "metrics rows lost or duplicated"
    assert final_loss(tmp_path) == uninterrupted
    assert (export / "config.json").exists()
    again = run(tmp_path)  # nothing left to do: says so, draws no progress bar
    assert again.returncode == 0 and f"already at step {STEPS}" in again.stdout and "train:" not in again.stderr


def test_kill_9_loses_at_most_one_checkpoint_interval(tmp_path, uninterrupted):
    # Saves are asynchronous: the one in flight when the process dies is lost (Orbax never finalises it), every
    # finalised one survives. Kill after step 25 once the step-20 save is final: the run loses steps 21-25 only.
    killed = interrupt_at(tmp_path, 25, signal.SIGKILL, after_save=20)
    assert killed.returncode == -signal.SIGKILL
    saved = max(finalized_steps(tmp_path))
    assert saved >= 20, f"only step {saved} survived a kill after step 25"
    resumed = run(tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"at step {saved}" in resumed.stderr
    assert logged_steps(tmp_path) == list(range(1, STEPS + 1))
    assert final_loss(tmp_path) == uninterrupted


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_checkpoint_falls_back_to_the_previous_step(tmp_path, uninterrupted, damage):
    first = run(tmp_path, "steps=30", "checkpoint.keep=3")
    # steps=30 has another schedule than steps=60 after warmup; only the checkpoint handling is under test here.
    assert first.returncode == 0, first.stderr[-3000:]
    files = sorted(p for p in (tmp_path / "checkpoints" / "30").rglob("*") if p.is_file() and "params" in p.parts)
    assert files
    for p in files:
        if damage == "truncate":
            p.write_bytes(p.read_bytes()[: p.stat().st_size // 3])
        else:
            p.unlink()
    again = run(tmp_path, "steps=31", "checkpoint.keep=3")
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"{tmp_path / 'checkpoints' / '30'}: " in again.stderr and "damaged-30" in again.stderr
    assert f"Resumed from {tmp_path / 'checkpoints' / '20'} at step 20" in again.stderr
    assert_quiet(again.stderr)


def test_bad_record_stops_with_one_line_and_exit_4(tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"doc {i} " * 8}) + "\n" for i in range(200)) + "{oops\n")
    out = run(tmp_path / "run", f"data.sources={data}", "data.shuffle=false")
    assert out.returncode == 4, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and f"{data}:201: not valid JSON" in errors[0], out.stderr[-3000:]
    assert_quiet(out.stderr)


def test_config_error_is_one_line_and_exit_2(tmp_path):
    out = run(tmp_path, "model.moe_k=0")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [out.stderr.strip()] and out.stderr.startswith("error: model.moe_k")


@pytest.mark.tpu
def test_aot_compiles_for_tpu_from_a_cpu_host_without_libtpu_noise():
    pytest.importorskip("libtpu", reason="the tpu extra (libtpu) is not installed")
    out = subprocess.run(
        [sys.executable, "-m", "ernie_jax.aot", "--config=tiny", "--topology=v5p-8"],
        cwd=ROOT,
        env=environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert "tiny on v5p-8" in out.stdout and "fits" in out.stdout
    assert_quiet(out.stderr)


def test_a_second_command_line_run_takes_its_programs_from_the_compile_cache(tmp_path):
    """compile_cache (on by default, in the home directory): the second run compiles nothing again."""
    home = tmp_path / "home"
    env = {k: v for k, v in environment().items() if k != "JAX_COMPILATION_CACHE_DIR"}  # not the session's cache
    env["HOME"] = str(home)

    def train(name: str) -> None:
        done = subprocess.run(
            [*command(tmp_path / name), "steps=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
        )
        assert done.returncode == 0, done.stderr[-3000:]

    train("first")
    cache = home / ".cache" / "ernie_jax" / "compiled"
    written = {entry.name: entry.stat().st_mtime_ns for entry in cache.iterdir()}
    assert any(name.startswith("jit_step-") for name in written), sorted(written)
    train("second")
    # A program compiled again would be written again (same name, new mtime); a new one would add a name.
    assert {entry.name: entry.stat().st_mtime_ns for entry in cache.iterdir()} == written


def test_a_compile_cache_the_user_gave_jax_stands():
    from ernie_jax.training.loop import use_compile_cache

    assert (
        use_compile_cache("~/elsewhere") == os.environ["JAX_COMPILATION_CACHE_DIR"]
    )  # the session's, tests/conftest.py
