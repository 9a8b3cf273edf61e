"""What `import ernie_jax` sets up before JAX starts: XLA:CPU's code generator choice, glibc's reuse of freed memory
on CPU hosts, and the user's word over both."""

import os
import subprocess
import sys

import pytest

from ernie_jax.runtime_env import YNN_FUSION_FLAG, cpu_codegen_flags, user_chose_malloc_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Compiles a fused matmul + SiLU + reduction (the shape of every MLP) and prints whether XLA:CPU gave any part of
# it to a YNNPACK fusion.
PROGRAM = """
import ernie_jax, jax, jax.numpy as jnp
f = jax.jit(lambda a, b: jax.nn.silu(a @ b).sum(axis=0))
print("ynn_fusion" in f.lower(jnp.ones((64, 64)), jnp.ones((64, 64))).compile().as_text())
"""


def compiled_with_ynn(xla_flags: str | None) -> bool:
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT
    if xla_flags is not None:
        env["XLA_FLAGS"] = xla_flags
    out = subprocess.run([sys.executable, "-c", PROGRAM], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1] == "True"


@pytest.mark.parametrize("user_flags", [None, "--xla_backend_optimization_level=0"])
def test_import_turns_off_ynnpack_fusions_on_cpu(user_flags):
    assert not compiled_with_ynn(user_flags)


def test_a_user_choice_of_the_flag_is_kept():
    assert compiled_with_ynn(f"{YNN_FUSION_FLAG}=dot,eltwise,reduce")


def test_flags_are_left_alone_for_a_jaxlib_that_may_lack_the_flag():
    # XLA aborts on an unknown flag, so only the jaxlib series known to have it gets it.
    assert cpu_codegen_flags("--xla_dump_to=/tmp/x", "0.11.0") == "--xla_dump_to=/tmp/x"
    assert cpu_codegen_flags("--xla_dump_to=/tmp/x", "0.10.2") == f"--xla_dump_to=/tmp/x {YNN_FUSION_FLAG}="


# A call whose scratch is one block of ROWS x 16 KiB (the matmul's input `exp(x)` is materialised), 48 or 96 MiB:
# above glibc's largest mmap threshold (32 MiB), and the second above its largest thread heap (64 MiB). Prints the
# block's size and the minor page faults per call after a warm-up: the fewest of three rounds of 5 calls. On a busy
# host a round now and then picks up faults that are not the scratch's (one full suite run saw 20% of the pages'
# worth, where the test alone sees almost none), while a scratch mapped anew faults in all of it in every round.
FAULTS_PROGRAM = """
import resource, ernie_jax, jax, jax.numpy as jnp
x = jnp.ones((ROWS, 4096), jnp.float32)
step = jax.jit(lambda x: (jnp.exp(x) @ jnp.ones((4096, 1)))[::7].sum()).lower(x).compile()
step(x).block_until_ready()
rounds = []
for _ in range(3):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(5):
        step(x).block_until_ready()
    rounds.append((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 5)
print(step.memory_analysis().temp_size_in_bytes, min(rounds))
"""


def scratch_pages_and_faults(environ: dict[str, str], rows: int) -> tuple[int, float]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env |= {"PYTHONPATH": ROOT, **environ}
    program = FAULTS_PROGRAM.replace("ROWS", str(rows))
    out = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    temp_bytes, faults = out.stdout.split()
    return int(temp_bytes) // 4096, float(faults)


def transparent_huge_pages_always() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[always]" in f.read()
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's allocator: Linux only")
@pytest.mark.parametrize("rows", [3072, 6144])
def test_a_cpu_step_reuses_its_scratch_memory_instead_of_faulting_it_in_every_call(rows):
    pages, faults = scratch_pages_and_faults({}, rows)
    assert pages > 32 << 8  # above the largest mmap threshold glibc allows, so glibc's default would map it anew
    assert faults < 0.05 * pages, (pages, faults)
    if transparent_huge_pages_always():
        pytest.skip("with transparent huge pages always on, a fresh mapping faults in 2 MiB pages: no contrast")
    # The user's own allocator settings stand; with glibc's behaviour the scratch is mapped anew every call.
    pages, faults = scratch_pages_and_faults({"GLIBC_TUNABLES": "glibc.malloc.perturb=0"}, rows)
    assert faults > 0.5 * pages, (pages, faults)


def test_any_allocator_setting_of_the_user_turns_the_reuse_off():
    assert not user_chose_malloc_settings({"PATH": "/bin", "GLIBC_TUNABLES": "glibc.rtld.nns=2"})
    assert user_chose_malloc_settings({"GLIBC_TUNABLES": "glibc.rtld.nns=2:glibc.malloc.hugetlb=1"})
    assert user_chose_malloc_settings({"MALLOC_ARENA_MAX": "2"})
