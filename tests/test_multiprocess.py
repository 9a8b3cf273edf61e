"""Two local CPU processes (4 devices each) train exactly like one process with 8 devices."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.helpers import SMALL_TRAIN_OVERRIDES

ARGS = [
    *SMALL_TRAIN_OVERRIDES,
    "steps=3",
    "checkpoint.every=3",
    "data.process_sharding=rows",
    "mesh.data=2",
    "mesh.expert=4",
]


def _env(devices: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST")}
    env.update(JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", PYTHONUNBUFFERED="1")
    return env


def _losses(run_dir) -> list[float]:
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    cmd = [sys.executable, "-m", "ernie_jax.train"]
    single = subprocess.run(
        [*cmd, *ARGS, f"run_dir={tmp_path / 'one'}"], env=_env(8), capture_output=True, text=True, timeout=600
    )
    assert single.returncode == 0, single.stderr[-3000:]
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = [
        subprocess.Popen(
            [
                *cmd,
                *ARGS,
                f"run_dir={tmp_path / 'two'}",
                f"--coordinator-address=127.0.0.1:{port}",
                "--num-processes=2",
                f"--process-id={i}",
            ],
            env=_env(4),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (_, err) in zip(procs, outs, strict=True):
        assert p.returncode == 0, err[-3000:]
    one, two = _losses(tmp_path / "one"), _losses(tmp_path / "two")
    assert len(one) == len(two) == 3
    np.testing.assert_allclose(two, one, rtol=1e-5)
    assert os.path.isdir(tmp_path / "two" / "checkpoints" / "3")
