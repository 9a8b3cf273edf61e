"""ERNIE 4.5 VL on 8 emulated CPU devices: both expert pools run expert-parallel (sharding.expert_parallel_moe) and
logits, per-modality router losses and parameter gradients match the single-device model. Node ids contain
'sharding', so `pytest -k sharding` runs them with the text models' sharding tests."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import ernie_jax.vl as vl
import sharding
from tests.helpers import assert_close
from tests.test_vl_parity import hf_vl_model, random_patches, vl_row

MESHES = {
    "data2_expert4": dict(data=2, expert=4),
    "fsdp2_expert2_tensor2": dict(data=1, fsdp=2, expert=2, tensor=2),
}


def _batch():
    """Two rows of 16 tokens (32 tokens: divisible by the 8 batch shards): two images, then a video."""
    rng = np.random.RandomState(3)
    ids0, types0 = vl_row([1, ("image", 6), 1, ("image", 2), 2], rng)
    ids1, types1 = vl_row([3, ("video", 8), 3], rng)
    image_grid, video_grid = np.array([[1, 4, 6], [1, 2, 4]]), np.array([[4, 4, 4]])
    return dict(
        ids=np.array([ids0, ids1]),
        mm_types=np.array([types0, types1]),
        image_grid=image_grid,
        pixel_values=random_patches(image_grid, rng),
        video_grid=video_grid,
        pixel_values_videos=random_patches(video_grid, rng),
    )


BATCH = _batch()


def _loss_fn(graphdef, state, ids, pixel_values, pixel_values_videos, moe_types, cotangent):
    model = nnx.merge(graphdef, state)
    logits, aux = model(
        ids,
        mm_token_type_ids=BATCH["mm_types"],
        moe_mm_token_type_ids=moe_types,
        pixel_values=pixel_values,
        image_grid_thw=BATCH["image_grid"],
        pixel_values_videos=pixel_values_videos,
        video_grid_thw=BATCH["video_grid"],
        return_aux=True,
    )
    losses = vl.modality_router_losses(aux["router_stats"])
    total = jnp.sum(logits * cotangent) + sum(losses.values())
    return total, (logits, losses)


@functools.cache
def _setup(tmp_dir: str):
    hf = hf_vl_model({}, {})
    hf.save_pretrained(tmp_dir)
    model = vl.from_pretrained(tmp_dir, dtype=jnp.float32, progress=False)
    graphdef, state = nnx.split(model)
    moe_types = jnp.asarray(vl.moe_token_types(BATCH["ids"], model.config))
    cot = jax.random.normal(jax.random.key(2), (*BATCH["ids"].shape, model.config.text.vocab_size))
    args = (
        jnp.asarray(BATCH["ids"]),
        jnp.asarray(BATCH["pixel_values"]),
        jnp.asarray(BATCH["pixel_values_videos"]),
        moe_types,
        cot,
    )
    step = jax.jit(jax.value_and_grad(_loss_fn, argnums=1, has_aux=True), static_argnums=0)
    (_, (logits, losses)), grads = step(graphdef, state, *args)
    return graphdef, state, args, logits, losses, grads


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    return _setup(str(tmp_path_factory.mktemp("vl_sharding")))


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_vl_sharding_expert_parallel_matches_single_device(reference, mesh_name):
    graphdef, state, args, ref_logits, ref_losses, ref_grads = reference
    mesh = sharding.make_mesh(**MESHES[mesh_name])
    placed = sharding.shard_state(state, mesh)
    with sharding.use_mesh(mesh):
        step = jax.jit(jax.value_and_grad(_loss_fn, argnums=1, has_aux=True), static_argnums=0)
        (_, (logits, losses)), grads = step(graphdef, placed, *args)
    worst_logit = assert_close(logits, ref_logits, np.float32, f"{mesh_name} logits")
    for name, value in ref_losses.items():
        assert_close(losses[name], value, np.float32, f"{mesh_name} {name}")
    worst_grad = 0.0
    for (path, g), (_, r) in zip(nnx.to_flat_state(grads), nnx.to_flat_state(ref_grads), strict=True):
        # The embedding's gradient sums every token's contribution (values up to ~80) in a mesh-dependent order.
        worst_grad = max(
            worst_grad, assert_close(g.get_value(), r.get_value(), np.float32, f"{mesh_name} {path}", scaled=True)
        )
    shown = ", ".join(f"{name}={float(value):.4f}" for name, value in losses.items())
    print(f"[vl-sharding] {mesh_name}: max|dlogit|={worst_logit:.2e} max|dgrad|={worst_grad:.2e} ({shown})")
    for pool in ("text", "vision"):  # every device holds only its share of each pool's experts
        w_gate = placed["groups"][1]["layer"]["ffn"][pool]["w_gate"].get_value()  # [R, E, D, F]
        assert all(s.data.shape[1] < w_gate.shape[1] for s in w_gate.addressable_shards), f"{pool}: not split"
    assert ref_losses["vision_aux_loss"] > 0 and ref_losses["text_aux_loss"] > 0
