"""PIL's `Image.resize` for 8-bit images, re-done in numpy, bit for bit.

transformers' ERNIE-4.5-VL image processor resizes through PIL (its torchvision twin is an optional backend). Matching
its `pixel_values` exactly means matching PIL's separable convolution: per axis, a filter scaled by the reduction
factor (antialiasing when shrinking), coefficients normalised in float64 and then rounded to 22-bit fixed point, a
horizontal pass and then a vertical pass, each rounding and clipping back to uint8. Integer arithmetic makes the
result independent of summation order, so a vectorised numpy version reproduces it exactly.
"""

from __future__ import annotations

import math

import numpy as np

# PIL's resampling codes, as preprocessor_config.json's "resample" stores them.
LANCZOS, BILINEAR, BICUBIC = 1, 2, 3

# PIL's fixed point for 8-bit images: 32 bits minus 8 for the pixel and 2 for the sign and headroom.
PRECISION_BITS = 32 - 8 - 2


def bilinear_filter(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    return np.where(x < 1.0, 1.0 - x, 0.0)


def bicubic_filter(x: np.ndarray) -> np.ndarray:
    """Keys' cubic with a = -0.5 (PIL's choice; torch and OpenCV use -0.75), written in PIL's operation order."""
    a = -0.5
    x = np.abs(x)
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def lanczos_filter(x: np.ndarray) -> np.ndarray:
    def sinc(v):
        safe = np.where(v == 0.0, 1.0, v * math.pi)
        return np.where(v == 0.0, 1.0, np.sin(safe) / safe)

    return np.where((x >= -3.0) & (x < 3.0), sinc(x) * sinc(x / 3.0), 0.0)


# code -> (filter, support in input pixels at scale 1)
FILTERS = {BILINEAR: (bilinear_filter, 1.0), BICUBIC: (bicubic_filter, 2.0), LANCZOS: (lanczos_filter, 3.0)}


def fixed_point_taps(in_size: int, out_size: int, resample: int) -> tuple[np.ndarray, np.ndarray]:
    """For each output pixel along one axis: the input indices it reads and their fixed-point weights.

    Returns (indices, weights), both [out_size, K] (K: the widest filter footprint); taps past a pixel's footprint
    carry weight 0 and a valid (clamped) index so they can be gathered blindly.
    """
    filter_fn, base_support = FILTERS[resample]
    scale = in_size / out_size
    filterscale = max(scale, 1.0)  # shrinking widens the filter: that is PIL's antialiasing
    support = base_support * filterscale
    ksize = int(math.ceil(support)) * 2 + 1
    center = (np.arange(out_size) + 0.5) * scale  # [out]
    # C's (int) cast truncates toward zero; the clamps make the sign of the truncation irrelevant.
    first = np.maximum(np.trunc(center - support + 0.5).astype(np.int64), 0)  # [out]
    last = np.minimum(np.trunc(center + support + 0.5).astype(np.int64), in_size)  # [out]
    count = last - first  # [out]
    offsets = np.arange(ksize)  # [K]
    inside = offsets[None, :] < count[:, None]  # [out, K]
    positions = (first[:, None] + offsets[None, :]).astype(np.float64)  # [out, K]
    weights = np.where(inside, filter_fn((positions - center[:, None] + 0.5) * (1.0 / filterscale)), 0.0)
    # PIL sums the weights left to right; keep that order so the float64 total is the same to the last bit.
    total = np.zeros(out_size)
    for k in range(ksize):
        total = total + weights[:, k]
    weights = np.where(total[:, None] != 0.0, weights / np.where(total == 0.0, 1.0, total)[:, None], weights)
    scaled = weights * (1 << PRECISION_BITS)
    fixed = np.trunc(np.where(scaled < 0, scaled - 0.5, scaled + 0.5)).astype(np.int64)  # round half away from 0
    indices = np.minimum(first[:, None] + offsets[None, :], in_size - 1)
    return indices, fixed


def resample_axis(image: np.ndarray, out_size: int, axis: int, resample: int) -> np.ndarray:
    """One PIL pass along `axis` of a uint8 image: weighted sum in fixed point, rounded, clipped to 0..255."""
    indices, fixed = fixed_point_taps(image.shape[axis], out_size, resample)  # [out, K] each
    shape = [1] * image.ndim
    shape[axis] = out_size
    acc = np.full(image.shape[:axis] + (out_size,) + image.shape[axis + 1 :], 1 << (PRECISION_BITS - 1), np.int64)
    for k in range(indices.shape[1]):  # one tap at a time keeps memory at one int64 image
        acc += np.take(image, indices[:, k], axis=axis).astype(np.int64) * fixed[:, k].reshape(shape)
    return np.clip(acc >> PRECISION_BITS, 0, 255).astype(np.uint8)


def pil_resize(image: np.ndarray, height: int, width: int, resample: int = BICUBIC) -> np.ndarray:
    """`np.asarray(PIL.Image.fromarray(image).resize((width, height), resample))` for a uint8 [H, W, C] image."""
    if image.dtype != np.uint8 or image.ndim != 3:
        raise ValueError(f"pil_resize: image must be uint8 [H, W, C], got {image.dtype} {image.shape}")
    if resample not in FILTERS:
        raise ValueError(f"pil_resize: resample must be one of {sorted(FILTERS)} (PIL codes), got {resample}")
    in_height, in_width = image.shape[:2]
    # Pillow 13 runs the vertical pass first when the height shrinks by more than twice as many rows as the width
    # loses columns (for speed); the uint8 rounding between passes makes the order visible. Earlier Pillows always
    # went horizontal first and can differ from this by one level on a few pixels of such images.
    vertical_first = in_height - height > 0 and in_height - height > (in_width - width) * 2
    passes = [(width, 1), (height, 0)]
    out = image
    for size, axis in reversed(passes) if vertical_first else passes:
        if size != image.shape[axis]:  # PIL skips a pass whose size does not change
            out = resample_axis(out, size, axis=axis, resample=resample)
    return out if out is not image else image.copy()
