"""What `import ernie_jax` sets up before JAX starts: XLA:CPU's code generator choice, and the user's word over it."""

import os
import subprocess
import sys

import pytest

from ernie_jax.runtime_env import YNN_FUSION_FLAG, cpu_codegen_flags

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
