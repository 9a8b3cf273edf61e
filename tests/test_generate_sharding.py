"""KV-cache generation on the 8-device CPU mesh (tests/conftest.py) equals one device: batch and cache sharded by
the rules table, MoE layers expert-parallel with the allgather transport."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ernie_jax
import sharding
from ernie_jax.generate import greedy
from ernie_jax.generation import DecodeSpec, Sampling, decode_batch
from tests.helpers import TINY_MOE, assert_close, hf_model, save_hf

MESHES = {"data2_expert4": dict(data=2, expert=4), "fsdp2_expert2_tensor2": dict(fsdp=2, expert=2, tensor=2)}
NEW_TOKENS = 12


def make_prompts(count, seed=5):
    rs = np.random.RandomState(seed)
    return [rs.randint(3, 128, n).tolist() for n in rs.randint(1, 14, count)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = save_hf(hf_model(TINY_MOE), tmp_path_factory.mktemp("moe"))
    return path, ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False)


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_generation_on_a_mesh_equals_one_device(checkpoint, mesh_name):
    path, single = checkpoint
    mesh = sharding.make_mesh(**MESHES[mesh_name])
    sharded = ernie_jax.from_pretrained(path, dtype=jnp.float32, mesh=mesh, progress=False)
    spec = DecodeSpec(Sampling(), max_new_tokens=NEW_TOKENS, eos_ids=(), pad_id=0, record_logits=True)
    sample = dict(max_new_tokens=NEW_TOKENS, temperature=1.0, top_p=0.9, eos_token_id=None, seed=11)
    with sharding.use_mesh(mesh):
        cache = jax.jit(lambda: sharded.init_cache(8, 32))()
    keys = cache.layers[0][0].keys  # [R, B, S, K, H]
    assert keys.sharding.spec[1] is not None, f"cache batch not sharded: {keys.sharding.spec}"
    for count in (8, 3):  # 3 rows: padded with idle rows to the 8 batch shards
        prompts = make_prompts(count)
        expected = decode_batch(single, prompts, spec)
        expected_samples = ernie_jax.generate(single, prompts, **sample)
        with sharding.use_mesh(mesh):
            got = decode_batch(sharded, prompts, spec)
            samples = ernie_jax.generate(sharded, prompts, **sample)
        np.testing.assert_array_equal(got.tokens, expected.tokens)
        diff = assert_close(got.logits, expected.logits, np.float32, mesh_name)
        assert samples == expected_samples
        greedy_rows = ernie_jax.generate(sharded, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0, mesh=mesh)
        assert greedy_rows == ernie_jax.generate(single, prompts, max_new_tokens=NEW_TOKENS, temperature=0.0)
        print(f"[generate] mesh {mesh_name}, {count} prompts: tokens equal, max|dlogit| vs one device {diff:.1e}")


def test_trainer_sample_on_a_mesh(checkpoint):
    """The trainer's `greedy` (batch 1) under the training mesh: the batch is padded to the mesh's batch shards."""
    path, single = checkpoint
    mesh = sharding.make_mesh(data=-1)
    sharded = ernie_jax.from_pretrained(path, dtype=jnp.float32, mesh=mesh, progress=False)
    prompt = make_prompts(1)[0]
    expected = greedy(single, prompt, NEW_TOKENS, eos_id=2)
    with sharding.use_mesh(mesh):
        assert greedy(sharded, prompt, NEW_TOKENS, eos_id=2) == expected
