"""`ernie_jax.generate(..., images=...)` on ERNIE-4.5-VL: greedy tokens equal transformers' `generate` on a small
random VL checkpoint that transformers writes (one image; a left-padded batch with a text-only row; the 8-device
mesh with both expert pools expert-parallel)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest

import ernie_jax
import ernie_jax.vl as vl
import sharding
from tests.test_vl_parity import IMG, IMG_END, IMG_START, hf_vl_model

NEW = 12
# Patches of 2 x 2 pixels, merged 2 x 2: an image of 8 x 12 pixels is a 4 x 6 patch grid, 6 decoder tokens.
PROCESSOR = vl.ImageProcessor(patch_size=2, merge_size=2, min_pixels=4 * 4, max_pixels=16 * 16)


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    hf = hf_vl_model({}, {})
    path = tmp_path_factory.mktemp("vl_generate")
    hf.save_pretrained(path)
    return hf, vl.from_pretrained(path, dtype=jnp.float32, progress=False), str(path)


def image(seed: int, height: int = 8, width: int = 12) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def hf_greedy(hf, prompt: list[int], images: list[np.ndarray], cfg) -> list[int]:
    """transformers' generate on one prompt: placeholders expanded and pixels made by the processor (the same as
    transformers' own image processor, tests/test_vl_processor.py), token types as its processor builds them."""
    import torch

    ids = np.asarray(prompt)
    kwargs = {}
    if images:
        batch = PROCESSOR(images)
        counts = np.prod(batch["image_grid_thw"], axis=-1) // 4
        at = np.flatnonzero(ids == IMG)
        repeats = np.ones(len(ids), np.int64)
        repeats[at] = counts
        ids = np.repeat(ids, repeats)
        kwargs = dict(
            pixel_values=torch.as_tensor(batch["pixel_values"]),
            image_grid_thw=torch.as_tensor(batch["image_grid_thw"]),
        )
    ids_t = torch.as_tensor(ids[None])
    with torch.no_grad():
        out = hf.generate(
            ids_t,
            attention_mask=torch.ones_like(ids_t),
            mm_token_type_ids=torch.as_tensor((ids == IMG).astype(np.int64)[None]),
            moe_mm_token_type_ids=torch.as_tensor(vl.moe_token_types(ids[None], cfg).astype(np.int64)),
            max_new_tokens=NEW,
            min_new_tokens=NEW,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=0,
            **kwargs,
        )
    return out[0, len(ids) :].tolist()


def prompts():
    rng = np.random.RandomState(5)
    text = lambda n: rng.randint(0, 200, n).tolist()
    with_image = [*text(3), IMG_START, IMG, IMG_END, *text(4)]
    return [with_image, text(5)], [[image(0)], []]


def test_greedy_with_an_image_equals_transformers_generate(models):
    hf, ours, _ = models
    batch, images = prompts()
    expected = [hf_greedy(hf, p, im, ours.config) for p, im in zip(batch, images, strict=True)]
    got = ernie_jax.generate(
        ours, batch, images=images, image_processor=PROCESSOR, max_new_tokens=NEW, temperature=0.0, eos_token_id=None
    )
    print(f"[vl-generate] greedy tokens: ours {got} vs transformers {expected}")
    assert got == expected
    # The image matters: without it (its placeholders kept, as plain tokens) the continuation differs.
    blind = ernie_jax.generate(ours, batch[:1], max_new_tokens=NEW, temperature=0.0, eos_token_id=None)
    assert blind[0] != got[0]


def test_greedy_with_an_image_on_the_mesh_equals_one_device(models):
    _, ours, path = models
    batch, images = prompts()
    one = ernie_jax.generate(ours, batch, images=images, image_processor=PROCESSOR, max_new_tokens=NEW,
                             temperature=0.0, eos_token_id=None)  # fmt: skip
    mesh = sharding.make_mesh(data=2, expert=4)
    sharded = vl.from_pretrained(path, dtype=jnp.float32, mesh=mesh, progress=False)
    eight = ernie_jax.generate(sharded, batch, images=images, image_processor=PROCESSOR, max_new_tokens=NEW,
                               temperature=0.0, eos_token_id=None, mesh=mesh)  # fmt: skip
    assert eight == one


@pytest.mark.parametrize(
    "prompt, images, says",
    [
        ([1, IMG, 2], [[]], "1 run(s) of image placeholders"),
        ([1, IMG, IMG, 2], [[image(0)]], "has 2 placeholders; its (1, 4, 6) patch grid takes 6"),
    ],
)
def test_placeholders_that_do_not_match_the_images_are_refused(models, prompt, images, says):
    with pytest.raises(ValueError, match=__import__("re").escape(says)):
        ernie_jax.generate(models[1], [prompt], images=images, image_processor=PROCESSOR, max_new_tokens=2)
