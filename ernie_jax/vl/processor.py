"""ERNIE 4.5 VL image preprocessing in numpy: images in, `pixel_values` and `image_grid_thw` out, for `ernie_jax.vl`.

Equal to transformers' `Ernie4_5_VLMoeImageProcessorPil` (the PIL backend, which transformers uses when torchvision
is absent): each image is converted to RGB, resized so both sides are multiples of patch_size * merge_size and its
area lies in [min_pixels, max_pixels] (`smart_resize`, then PIL's resampling re-done exactly in `pil_resize`),
rescaled to [0, 1], normalised with the CLIP mean and std, and cut into patches ordered merge block by merge block,
each flattened channel-major: [C, P, P] -> C*P*P values, as the vision tower's patch embedding reads them.

    processor = ImageProcessor.from_pretrained("path/to/ERNIE-4.5-VL")  # reads preprocessor_config.json
    out = processor([image_hwc_uint8, other_image])
    out["pixel_values"]    # [N, C*P*P] float32, N = sum of each image's patch rows * patch columns
    out["image_grid_thw"]  # [n, 3] int64: (1, patch rows, patch columns) per image

Videos are not handled: transformers' video processor needs torchvision and stamps timestamps onto frames with a
font fetched from the hub, neither of which can be matched offline.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from ernie_jax.config import ConfigError
from ernie_jax.vl.pil_resize import BICUBIC, FILTERS, pil_resize

# OpenAI CLIP's statistics, the ones ERNIE-4.5-VL's vision tower was trained with.
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
PREPROCESSOR_CONFIG = "preprocessor_config.json"
MAX_ASPECT_RATIO = 200  # transformers refuses thinner images: a side would round to nothing


def smart_resize(height: int, width: int, factor: int, min_pixels: int, max_pixels: int) -> tuple[int, int]:
    """The size transformers resizes a (height, width) image to: both sides multiples of `factor`, the area within
    [min_pixels, max_pixels], the aspect ratio kept as well as rounding allows."""
    if min(height, width) < 1:
        raise ValueError(f"image of size {height}x{width}: both sides must be at least 1 pixel")
    if max(height, width) / min(height, width) > MAX_ASPECT_RATIO:
        raise ValueError(
            f"image of size {height}x{width}: aspect ratio {max(height, width) / min(height, width):.1f} exceeds "
            f"{MAX_ASPECT_RATIO}; crop or pad it first"
        )
    # Python's round (half to even) and math.floor/ceil, as transformers: numpy's rounding would match, but the
    # sqrt-scaled branches must see exactly the same float64 values.
    new_height, new_width = round(height / factor) * factor, round(width / factor) * factor
    if new_height * new_width > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        new_height = max(factor, math.floor(height / beta / factor) * factor)
        new_width = max(factor, math.floor(width / beta / factor) * factor)
    elif new_height * new_width < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        new_height = math.ceil(height * beta / factor) * factor
        new_width = math.ceil(width * beta / factor) * factor
    return new_height, new_width


def check(condition: bool, field: str, message: str) -> None:
    if not condition:
        raise ConfigError(f"ImageProcessor.{field}: {message}")


@dataclasses.dataclass(frozen=True)
class ImageProcessor:
    """ERNIE-4.5-VL's image processor; fields and defaults follow transformers' `Ernie4_5_VLMoeImageProcessor`.

    Images are numpy arrays [H, W, C] (channels last, C = 1, 3 or 4): uint8 in 0..255, or float in [0, 1]. Float
    images are not rescaled again (transformers would divide them by 255 a second time unless called with
    do_rescale=False; this equals that call). Alpha is composited onto white, grey is repeated to RGB.
    """

    patch_size: int = 14
    merge_size: int = 2
    temporal_patch_size: int = 1  # each patch repeated this many times along time (images have one frame)
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 6177
    resample: int = BICUBIC  # PIL's code: 1 lanczos, 2 bilinear, 3 bicubic
    do_resize: bool = True
    do_rescale: bool = True
    rescale_factor: float = 1 / 255
    do_normalize: bool = True
    image_mean: tuple[float, ...] = CLIP_MEAN
    image_std: tuple[float, ...] = CLIP_STD

    def __post_init__(self):
        for name in ("patch_size", "merge_size", "temporal_patch_size", "min_pixels", "max_pixels"):
            value = getattr(self, name)
            check(isinstance(value, int) and value >= 1, name, f"must be a positive int, got {value!r}")
        check(self.min_pixels <= self.max_pixels, "min_pixels", f"{self.min_pixels} > max_pixels {self.max_pixels}")
        supported = sorted(FILTERS)
        check(self.resample in FILTERS, "resample", f"PIL code {self.resample} unsupported; use one of {supported}")
        object.__setattr__(self, "image_mean", tuple(float(v) for v in self.image_mean))
        object.__setattr__(self, "image_std", tuple(float(v) for v in self.image_std))
        check(len(self.image_mean) == 3, "image_mean", f"needs 3 values (RGB), got {self.image_mean}")
        check(len(self.image_std) == 3, "image_std", f"needs 3 values (RGB), got {self.image_std}")
        check(all(s > 0 for s in self.image_std), "image_std", f"values must be > 0, got {self.image_std}")
        check(self.rescale_factor > 0, "rescale_factor", f"must be > 0, got {self.rescale_factor}")

    @property
    def factor(self) -> int:
        """Resized sides are multiples of this: one merged token covers merge_size x merge_size patches."""
        return self.patch_size * self.merge_size

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ImageProcessor:
        """From transformers' preprocessor_config.json keys; keys this processor has no use for are ignored."""
        if values.get("do_convert_rgb") is False:
            raise ConfigError("ImageProcessor: do_convert_rgb=false is not supported (ERNIE-4.5-VL expects RGB)")
        kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
        size = values.get("size") or {}
        # transformers' `size` ({shortest_edge, longest_edge} are pixel counts here) wins over the older
        # min_pixels / max_pixels keys of Baidu's original configs.
        if "shortest_edge" in size:
            kwargs["min_pixels"] = size["shortest_edge"]
        if "longest_edge" in size:
            kwargs["max_pixels"] = size["longest_edge"]
        if kwargs.get("temporal_patch_size") is None:
            kwargs.pop("temporal_patch_size", None)
        return cls(**kwargs)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, **overrides) -> ImageProcessor:
        """Read `path`/preprocessor_config.json; keyword arguments override its values."""
        config_file = os.path.join(path, PREPROCESSOR_CONFIG)
        if not os.path.isfile(config_file):
            raise FileNotFoundError(
                f"{config_file} not found: pass a checkpoint directory that has one, or build "
                f"ImageProcessor(patch_size=..., min_pixels=..., max_pixels=...) directly"
            )
        with open(config_file) as f:
            values = json.load(f)
        return dataclasses.replace(cls.from_dict(values), **overrides)

    def target_size(self, height: int, width: int) -> tuple[int, int]:
        """The (height, width) an image of this size is resized to."""
        if not self.do_resize:
            return height, width
        return smart_resize(height, width, self.factor, self.min_pixels, self.max_pixels)

    def num_image_tokens(self, height: int, width: int) -> int:
        """How many image placeholder tokens the decoder needs for one image of this size."""
        resized_height, resized_width = self.target_size(height, width)
        return (resized_height // self.patch_size) * (resized_width // self.patch_size) // self.merge_size**2

    def __call__(self, images: np.ndarray | Sequence[np.ndarray]) -> dict[str, np.ndarray]:
        """One image [H, W, C] or a list of them -> {"pixel_values": [N, C*T*P*P] float32, "image_grid_thw": [n, 3]}."""
        if isinstance(images, np.ndarray) and images.ndim == 3:
            images = [images]
        if isinstance(images, np.ndarray) or not isinstance(images, Sequence) or len(images) == 0:
            raise ValueError(
                "images: pass one numpy array [H, W, C] or a non-empty list of them (np.asarray(pil_image) converts)"
            )
        patches, grids = [], []
        for index, image in enumerate(images):
            pixels = self.prepare(image, f"images[{index}]")  # [H', W', 3] float32
            image_patches, grid_h, grid_w = self.patchify(pixels)
            patches.append(image_patches)
            grids.append((1, grid_h, grid_w))
        return {
            "pixel_values": np.concatenate(patches, axis=0),  # [N, C*T*P*P]
            "image_grid_thw": np.asarray(grids, dtype=np.int64),  # [n, 3]
        }

    def prepare(self, image: np.ndarray, name: str = "image") -> np.ndarray:
        """One [H, W, C] image -> resized, rescaled and normalised [H', W', 3] float32 pixels."""
        rgb = to_rgb(image, name)  # [H, W, 3], uint8 or float in [0, 1]
        is_float = np.issubdtype(rgb.dtype, np.floating)
        if self.do_resize:
            height, width = self.target_size(*rgb.shape[:2])
            if is_float:
                # PIL resizes 8-bit images only: transformers scales floats to 0..255 and truncates to uint8 first,
                # then divides by 255 after the resize. Same steps, same dtypes, so the same numbers.
                rgb = (rgb.astype(np.float64) * 255).astype(np.float32).astype(np.uint8)
            rgb = pil_resize(rgb, height, width, self.resample)
            if is_float:
                rgb = (rgb.astype(np.float64) * (1 / 255)).astype(np.float32)
        elif rgb.shape[0] % self.factor or rgb.shape[1] % self.factor:
            raise ValueError(
                f"{name}: with do_resize=False both sides must be multiples of patch_size * merge_size = "
                f"{self.factor}, got {rgb.shape[0]}x{rgb.shape[1]}; resize or crop it, or enable do_resize"
            )
        if self.do_rescale and not is_float:
            rgb = (rgb.astype(np.float64) * self.rescale_factor).astype(np.float32)
        if not np.issubdtype(rgb.dtype, np.floating):
            rgb = rgb.astype(np.float32)
        if self.do_normalize:
            mean = np.asarray(self.image_mean, dtype=rgb.dtype)
            std = np.asarray(self.image_std, dtype=rgb.dtype)
            rgb = (rgb - mean) / std
        return rgb.astype(np.float32)

    def patchify(self, pixels: np.ndarray) -> tuple[np.ndarray, int, int]:
        """[H, W, C] -> ([grid_h * grid_w, C*T*P*P], grid_h, grid_w), patches ordered merge block by merge block
        (the m x m patches of one merged token are consecutive), each flattened as [C, T, P, P]."""
        height, width, channels = pixels.shape
        p, m, t = self.patch_size, self.merge_size, self.temporal_patch_size
        grid_h, grid_w = height // p, width // p
        blocks = pixels.reshape(grid_h // m, m, p, grid_w // m, m, p, channels)
        # -> [block row, block column, row in block, column in block, C, pixel row, pixel column]
        blocks = blocks.transpose(0, 3, 1, 4, 6, 2, 5)
        blocks = np.broadcast_to(blocks[:, :, :, :, :, None], blocks.shape[:5] + (t, p, p))  # [..., C, T, P, P]
        return blocks.reshape(grid_h * grid_w, channels * t * p * p), grid_h, grid_w


def to_rgb(image: np.ndarray, name: str = "image") -> np.ndarray:
    """Check one image and bring it to [H, W, 3]: grey repeated, alpha composited onto white (as transformers)."""
    if not isinstance(image, np.ndarray):
        raise TypeError(f"{name}: expected a numpy array [H, W, C], got {type(image).__name__}; use np.asarray(image)")
    if image.ndim != 3 or image.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{name}: expected shape [H, W, C] with C = 1, 3 or 4 (channels last), got {image.shape}; "
            f"for [C, H, W] pass image.transpose(1, 2, 0), for [H, W] pass image[..., None]"
        )
    if image.dtype == np.uint8:
        white = 255
    elif np.issubdtype(image.dtype, np.floating):
        white = 1.0
        low, high = float(np.min(image)), float(np.max(image))
        if not (low >= 0.0 and high <= 1.0):  # also catches NaN
            raise ValueError(
                f"{name}: float pixels must lie in [0, 1], got [{low}, {high}]; divide 0..255 values by 255 or "
                f"pass them as uint8"
            )
    else:
        raise TypeError(f"{name}: dtype {image.dtype} unsupported; pass uint8 (0..255) or float (0..1) pixels")
    channels = image.shape[-1]
    if channels == 1:
        return np.repeat(image, 3, axis=-1)
    if channels == 3:
        return image
    alpha = image[..., 3:4] / white
    composite = alpha * image[..., :3] + (1 - alpha) * white
    return np.round(composite).astype(np.uint8) if white == 255 else composite.astype(image.dtype)
