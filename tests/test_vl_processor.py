"""ernie_jax.vl.ImageProcessor equals transformers' Ernie4_5_VLMoeImageProcessorPil, built locally with explicit
arguments (no download): pixel_values within 1e-6 (fp32; the resize is PIL's, re-done bit for bit, so the figures
printed are 0) and identical image_grid_thw. Then our processor feeding our VL model gives transformers' logits for
transformers' processor feeding its model. Figures are printed with a `[vl-processor]` tag:
    python -m pytest tests/test_vl_processor.py -q -s
"""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

import ernie_jax.vl as vl
from ernie_jax.config import ConfigError
from ernie_jax.vl.pil_resize import BICUBIC, BILINEAR, LANCZOS, pil_resize
from ernie_jax.vl.processor import smart_resize
from tests.test_vl_parity import IMG, IMG_END, IMG_START, Case, compare, hf_logits, hf_vl_model, jitted_forward

PIXEL_TOLERANCE = 1e-6  # fp32; the resize is exact, so only normalisation rounding could differ (it does not)
# Small limits so that small test images exercise both bounds: factor 28, 4..64 merged tokens.
LIMITS = dict(patch_size=14, merge_size=2, min_pixels=56 * 56, max_pixels=28 * 28 * 64)


def reference_processor(do_rescale: bool = True, resample: int = BICUBIC, **limits):
    """transformers' PIL-backend processor with explicit arguments (pillow is its resize engine)."""
    pytest.importorskip("PIL", reason="transformers' reference image processor needs pillow (pip install pillow)")
    from transformers import Ernie4_5_VLMoeImageProcessorPil

    limits = {**LIMITS, **limits}
    return Ernie4_5_VLMoeImageProcessorPil(
        patch_size=limits["patch_size"],
        merge_size=limits["merge_size"],
        size={"shortest_edge": limits["min_pixels"], "longest_edge": limits["max_pixels"]},
        do_rescale=do_rescale,
        resample=resample,
    )


def random_image(rng, height, width, dtype="uint8", channels=3) -> np.ndarray:
    if dtype == "uint8":
        return rng.randint(0, 256, (height, width, channels), dtype=np.uint8)
    return rng.rand(height, width, channels).astype(dtype)


def compare_with_reference(name, images, resample=BICUBIC, **limits) -> float:
    floats = np.issubdtype(images[0].dtype, np.floating)
    # transformers divides float images by 255 a second time unless told not to; ours never does.
    ref = reference_processor(do_rescale=not floats, resample=resample, **limits)(images=images, return_tensors="np")
    ours = vl.ImageProcessor(**{**LIMITS, **limits}, resample=resample)(images)
    np.testing.assert_array_equal(ours["image_grid_thw"], ref["image_grid_thw"], err_msg=name)
    assert ours["pixel_values"].dtype == np.float32 and ours["pixel_values"].shape == ref["pixel_values"].shape, name
    diff = float(np.abs(ours["pixel_values"] - ref["pixel_values"]).max())
    print(f"[vl-processor] {name}: grid {ours['image_grid_thw'].tolist()} max|dpixel|={diff:.1e}")
    assert diff <= PIXEL_TOLERANCE, f"{name}: max|dpixel| {diff} > {PIXEL_TOLERANCE}"
    return diff


# (height, width): what the size exercises.
SIZES = {
    "small_37x53": (37, 53),
    "exact_multiple_56x84": (56, 84),  # no resize at all
    "tall_300x41": (300, 41),
    "thin_13x1500": (13, 1500),  # aspect ratio 115: one side rounds to a single factor
    "upscaled_to_min_9x14": (9, 14),  # 126 pixels < min_pixels
    "downscaled_to_max_700x1000": (700, 1000),  # well above max_pixels
}


@pytest.mark.parametrize("dtype", ["uint8", "float32"])
@pytest.mark.parametrize("size_name", list(SIZES))
def test_single_image_matches_transformers(size_name, dtype):
    height, width = SIZES[size_name]
    image = random_image(np.random.RandomState(height * 7 + width), height, width, dtype)
    compare_with_reference(f"{size_name}/{dtype}", [image])
    resized = smart_resize(height, width, 28, LIMITS["min_pixels"], LIMITS["max_pixels"])
    area = resized[0] * resized[1]
    if "min" in size_name:  # the case really was lifted to min_pixels, and the other one really cut to max_pixels
        assert height * width < LIMITS["min_pixels"] <= area
    if "max" in size_name:
        assert height * width > LIMITS["max_pixels"] >= area


def test_several_images_one_call_and_channel_layouts():
    """Three sizes in one call (patches concatenated in order, one grid row each), plus grey, RGBA and float64."""
    rng = np.random.RandomState(3)
    images = [random_image(rng, 37, 53), random_image(rng, 120, 45), random_image(rng, 9, 14)]
    compare_with_reference("three_images", images)
    compare_with_reference("grey_1ch", [random_image(rng, 40, 61, channels=1)])
    rgba = random_image(rng, 47, 33, channels=4)
    compare_with_reference("rgba_composited_on_white", [rgba])
    compare_with_reference("float64", [random_image(rng, 41, 77, dtype="float64")])
    # Values a hair below k / 255 (float arithmetic leaves such): x * 255 is just under k, and only the float32 step
    # transformers takes before truncating to uint8 rounds it back up to k.
    near_levels = np.maximum(random_image(rng, 50, 50) / 255 - 1e-10, 0.0)
    compare_with_reference("float64_a_hair_below_levels", [near_levels])


@pytest.mark.parametrize("resample", [BILINEAR, LANCZOS])
def test_other_resample_filters_match_transformers(resample):
    rng = np.random.RandomState(resample)
    images = [random_image(rng, 45, 70), random_image(rng, 600, 200)]
    compare_with_reference(f"resample_{resample}", images, resample=resample)


def test_pil_resize_is_bit_exact():
    """The core: PIL's fixed-point resampling, every filter, shrinking and growing each axis (both pass orders)."""
    Image = pytest.importorskip("PIL.Image", reason="the oracle is pillow itself (pip install pillow)")
    rng = np.random.RandomState(0)
    for _ in range(60):
        height, width = rng.randint(1, 200, 2)
        out_height, out_width = rng.randint(1, 200, 2)
        image = random_image(rng, height, width)
        for resample in (LANCZOS, BILINEAR, BICUBIC):
            ref = np.asarray(Image.fromarray(image).resize((out_width, out_height), resample=resample))
            ours = pil_resize(image, out_height, out_width, resample)
            np.testing.assert_array_equal(ours, ref, err_msg=f"{image.shape} -> {(out_height, out_width)} {resample}")


def test_from_pretrained_reads_transformers_config(tmp_path):
    ref = reference_processor(max_pixels=28 * 28 * 100)
    ref.save_pretrained(tmp_path)
    ours = vl.ImageProcessor.from_pretrained(tmp_path)
    assert ours == vl.ImageProcessor(**{**LIMITS, "max_pixels": 28 * 28 * 100})
    image = random_image(np.random.RandomState(1), 500, 333)
    out, expected = ours(image), ref(images=[image], return_tensors="np")
    np.testing.assert_array_equal(out["image_grid_thw"], expected["image_grid_thw"])
    assert float(np.abs(out["pixel_values"] - expected["pixel_values"]).max()) <= PIXEL_TOLERANCE
    # Baidu's original configs spell the limits min_pixels / max_pixels; overrides win over the file.
    (tmp_path / "preprocessor_config.json").write_text(json.dumps({"min_pixels": 100, "max_pixels": 5000}))
    assert vl.ImageProcessor.from_pretrained(tmp_path, patch_size=2).max_pixels == 5000
    assert vl.ImageProcessor.from_pretrained(tmp_path, patch_size=2).patch_size == 2
    with pytest.raises(FileNotFoundError, match="preprocessor_config.json not found"):
        vl.ImageProcessor.from_pretrained(tmp_path / "missing")


def test_bad_input_gets_one_clear_error():
    processor = vl.ImageProcessor(**LIMITS)
    good = np.zeros((30, 30, 3), np.uint8)
    with pytest.raises(TypeError, match=r"images\[1\]: dtype int32 unsupported; pass uint8"):
        processor([good, np.zeros((30, 30, 3), np.int32)])
    with pytest.raises(ValueError, match=r"images\[0\]: expected shape \[H, W, C\].*got \(30, 30\)"):
        processor([np.zeros((30, 30), np.uint8)])
    with pytest.raises(ValueError, match=r"float pixels must lie in \[0, 1\], got \[255.0, 255.0\]"):
        processor(np.full((30, 30, 3), 255.0, np.float32))
    with pytest.raises(ValueError, match="aspect ratio 250.0 exceeds 200; crop or pad"):
        processor(np.zeros((2, 500, 3), np.uint8))
    with pytest.raises(ValueError, match="non-empty list"):
        processor([])
    with pytest.raises(ValueError, match="multiples of patch_size \\* merge_size = 28, got 30x30"):
        vl.ImageProcessor(**LIMITS, do_resize=False)(good)
    with pytest.raises(ConfigError, match="ImageProcessor.min_pixels: 5000 > max_pixels 4000"):
        vl.ImageProcessor(min_pixels=5000, max_pixels=4000)
    with pytest.raises(ConfigError, match="ImageProcessor.resample: PIL code 0 unsupported"):
        vl.ImageProcessor(resample=0)


def test_processor_to_model_matches_transformers_end_to_end(tmp_path):
    """An image through our processor and our VL model == the same image through transformers' processor and model
    (the small random checkpoint of test_vl_parity: 2x2-pixel patches, 2x2 merge)."""
    limits = dict(patch_size=2, merge_size=2, min_pixels=64, max_pixels=400)
    image = random_image(np.random.RandomState(5), 13, 21)
    ours = vl.ImageProcessor(**limits)(image)
    theirs = reference_processor(**limits)(images=[image], return_tensors="np")
    np.testing.assert_array_equal(ours["image_grid_thw"], [[1, 6, 10]])  # 12x20 pixels -> 6x10 patches
    n_tokens = vl.ImageProcessor(**limits).num_image_tokens(13, 21)
    assert n_tokens == 15
    rng = np.random.RandomState(6)
    ids = rng.randint(0, 200, 3).tolist() + [IMG_START] + [IMG] * n_tokens + [IMG_END] + rng.randint(0, 200, 4).tolist()
    types = [0] * 4 + [1] * n_tokens + [0] * 5

    hf = hf_vl_model({}, {})
    hf.save_pretrained(tmp_path)
    model = vl.from_pretrained(tmp_path, dtype=jnp.float32, progress=False)
    ids, types = np.array([ids]), np.array([types])
    ours_case = Case(ids, types, image_grid=ours["image_grid_thw"], pixel_values=ours["pixel_values"])
    theirs_case = Case(ids, types, image_grid=theirs["image_grid_thw"], pixel_values=theirs["pixel_values"])
    moe_types = vl.moe_token_types(ours_case.ids, model.config)
    compare(
        "processor_end_to_end",
        jitted_forward(ours_case)(model, moe_types),
        hf_logits(hf, theirs_case, moe_types),
        None,
    )
