"""Test setup: 8 emulated CPU devices (before JAX initialises its backend) and shared fixtures."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# libtpu takes a per-host lock; the TPU AOT tests only compile, so several processes may load it at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
# Most of a test's time is XLA:CPU compiling small programs, and its backend optimisation level 0 compiles them
# about 30% faster (two mesh and checkpoint tests: 73 s -> 52 s) at slower run time, which tests barely have.
# Subprocess trainers inherit it, except the embedded-default run, which is timed by its steps and runs as a user
# runs it; TPU compiles through libtpu give the same report with it.
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=0").strip()

# One persistent compilation cache for the whole test session: both xdist workers (started after this file is
# imported, they inherit the environment), every test module and every trainer subprocess. The same small programs
# compile again and again across a session (each `train()` call jits a fresh step; resumes recompile the run's
# programs; modules clear the in-memory jit caches); with the cache each compiles once. Results are unaffected: JAX
# keys the cache by the program, its compile options, XLA_FLAGS and the JAX version. The session's own directory
# starts empty, so first compiles are still tested, and goes when the session ends.
import shutil  # noqa: E402
import tempfile  # noqa: E402

SESSION_COMPILE_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    SESSION_COMPILE_CACHE = tempfile.mkdtemp(prefix="ernie-jax-test-compile-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = SESSION_COMPILE_CACHE
# Every program, however quick to compile (JAX's default keeps only those over a second).
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import jax  # noqa: E402

jax.config.update("jax_num_cpu_devices", 8)


import gc  # noqa: E402
import logging  # noqa: E402

import pytest  # noqa: E402

# XLA:CPU maps each compiled kernel's code and data into memory of its own, and frees it only when the executable
# goes. A whole test session compiles thousands of programs: kept alive by jit caches, their mappings approached
# Linux's per-process limit (vm.max_map_count, 65530 by default), where the next compile segfaulted in a full
# run. So each test module leaves with the caches cleared, and a session that still nears the limit stops with this
# explanation instead of a crash.
MAP_COUNT_LIMIT = "/proc/sys/vm/max_map_count"


def _map_counts() -> tuple[int, int] | None:
    """(this process's memory mappings, the kernel's limit), or None where /proc does not say (not Linux)."""
    try:
        with open("/proc/self/maps") as maps, open(MAP_COUNT_LIMIT) as limit:
            return sum(1 for _ in maps), int(limit.read())
    except OSError:
        return None


@pytest.fixture(autouse=True, scope="module")
def release_compiled_programs():
    """After each test module: drop jit caches so XLA can free the executables (and their memory mappings)."""
    yield
    jax.clear_caches()
    gc.collect()
    counts = _map_counts()
    if counts and counts[0] > 0.8 * counts[1]:
        pytest.exit(
            f"this test process holds {counts[0]} memory mappings of the {counts[1]} Linux allows "
            f"({MAP_COUNT_LIMIT}); more compiles would crash XLA. Something keeps compiled programs alive "
            "across test modules: find it, or raise the limit (sysctl -w vm.max_map_count=262144).",
            returncode=3,
        )


@pytest.fixture
def project_logs(caplog):
    """caplog that also sees the project's loggers, which stop propagating once an entry point set up logging."""
    from ernie_jax.console import PROJECT_LOGGERS

    loggers = [logging.getLogger(name) for name in PROJECT_LOGGERS]
    before = [logger.propagate for logger in loggers]
    for logger in loggers:
        logger.propagate = True
    caplog.set_level(logging.INFO)
    yield caplog
    for logger, propagate in zip(loggers, before, strict=True):
        logger.propagate = propagate


def pytest_collection_modifyitems(config, items):
    """Tests marked `first` run first: started last, one would keep a worker busy alone at the end of the run."""
    items.sort(key=lambda item: item.get_closest_marker("first") is None)  # stable: otherwise collection order


def pytest_unconfigure(config):
    """The process that made the session's compilation cache removes it (under xdist: the controller, last)."""
    if SESSION_COMPILE_CACHE is not None:
        shutil.rmtree(SESSION_COMPILE_CACHE, ignore_errors=True)
