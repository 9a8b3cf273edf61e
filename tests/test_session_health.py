"""The test session itself: compiled programs do not pile up across test modules (release_compiled_programs in
tests/conftest.py; a full run once crashed XLA:CPU at Linux's per-process limit on memory mappings), and one
persistent compilation cache serves the whole session (2,144 -> 1,533 s in a clean clone) and is removed at its
end."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

COMPILES = """
import os

import jax
import jax.numpy as jnp
from flax import nnx

from ernie_jax.model import ErnieForCausalLM
from tests.helpers import TINY_MOE


GRAPHDEF, STATE = nnx.split(ErnieForCausalLM(TINY_MOE, rngs=nnx.Rngs(0)))
# A jitted function that outlives its test, as the library's module-level jitted functions do.
FORWARD = jax.jit(lambda state, ids: nnx.merge(GRAPHDEF, state)(ids))


def test_compile_several_programs():
    state, forward = STATE, FORWARD
    for length in range(4, 10):  # one program per length, kept alive by the function's jit cache
        forward(state, jnp.zeros((2, length), jnp.int32)).block_until_ready()
    with open("/proc/self/maps") as maps, open(os.environ["COUNTS"], "a") as out:
        out.write(f"{sum(1 for _ in maps)}\\n")
"""

COUNTS = """
import os


def test_count_mappings():
    with open("/proc/self/maps") as maps, open(os.environ["COUNTS"], "a") as out:
        out.write(f"{sum(1 for _ in maps)}\\n")
"""


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc to count memory mappings")
def test_compiled_programs_are_released_between_test_modules(tmp_path):
    (tmp_path / "test_a_compiles.py").write_text(COMPILES)
    (tmp_path / "test_b_counts.py").write_text(COUNTS)
    counts = tmp_path / "counts.txt"
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**os.environ, "COUNTS": str(counts)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    after_compiles, next_module = map(int, counts.read_text().split())
    print(f"[session] mappings after 6 compiles {after_compiles}, in the next module {next_module}")
    assert next_module < after_compiles - 150, "the compiled programs outlived their test module"


def test_one_compilation_cache_serves_this_process_and_the_trainer_subprocesses():
    from tests.test_fault_injection import environment

    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]
    assert jax.config.jax_compilation_cache_dir == cache
    assert environment()["JAX_COMPILATION_CACHE_DIR"] == cache  # what `python -m ernie_jax.train` tests run with

    def session_cache_probe(x):
        return x * 3.0 + 1.0

    before = set(os.listdir(cache))
    jax.jit(session_cache_probe)(jnp.arange(11.0)).block_until_ready()
    assert any("session_cache_probe" in name for name in set(os.listdir(cache)) - before), "nothing written"


SEES_ITS_CACHE = """
import os


def test_record_the_cache():
    with open(os.environ["SEEN"], "w") as out:
        out.write(os.environ["JAX_COMPILATION_CACHE_DIR"])
"""


def test_a_session_removes_the_compilation_cache_it_made(tmp_path):
    (tmp_path / "test_sees.py").write_text(SEES_ITS_CACHE)
    seen = tmp_path / "seen.txt"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "tests.conftest", str(tmp_path)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env={**env, "SEEN": str(seen)},
    )
    assert run.returncode == 0, run.stdout + run.stderr
    made = seen.read_text()
    assert os.path.basename(made).startswith("ernie-jax-test-compile-cache-") and not os.path.exists(made)
