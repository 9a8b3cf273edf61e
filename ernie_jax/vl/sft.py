"""Vision-language SFT rows: {"images": [paths], "messages": [...]} -> token ids, 3D positions and image patches.

A jsonl row is an OpenAI-style conversation (`ernie_jax.data.sft`) plus the images it shows, in order:

    {"images": ["cat.png"], "messages": [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A cat."}]}

Each image is marked where it appears, as transformers' ERNIE-4.5-VL processor reads it: by the image placeholder
token (`<|IMAGE_PLACEHOLDER|>`) in a string content, or by an `{"type": "image"}` part of a list content, which is
written `<|IMAGE_START|><|IMAGE_PLACEHOLDER|><|IMAGE_END|>`. The k-th placeholder is images[k]. Image paths are read
relative to the jsonl file (absolute paths as they are): PNG/JPEG through Pillow, or `.npy` arrays [H, W, C].

The conversation is rendered and tokenized as a text SFT row (the checkpoint's chat template, loss on the replies
only, each reply's end learned as EOS); then, as the processor does, each placeholder becomes
grid_t * grid_h * grid_w / merge_size**2 placeholders for its image's patch grid (from `ImageProcessor`), and
the 3D RoPE positions and the MoE token types are those transformers computes for the conversation alone (packing
keeps each conversation's own positions). A conversation longer than a row, or with more patches than a row
holds, is dropped and counted: cutting it would cut an image from its placeholders.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

from ernie_jax.data.sft import ConversationEncoder, conversation
from ernie_jax.data.sources import BadRecordError, JsonRecord, ThreadSafeCounts
from ernie_jax.vl.processor import ImageProcessor
from ernie_jax.vl.rope import IMAGE, rope_index, vision_patch_positions

IMAGE_TOKEN, IMAGE_START, IMAGE_END = "<|IMAGE_PLACEHOLDER|>", "<|IMAGE_START|>", "<|IMAGE_END|>"
# Features of one encoded conversation: per token [L], and per image patch [P_i] (pixel_values [P_i, C]).
TOKEN_FEATURES = ("input_ids", "targets", "loss_mask", "positions", "positions_h", "positions_w", "token_types")
PATCH_FEATURES = ("pixel_values", "patch_image", "patch_rows", "patch_cols")


def load_image(path: str) -> np.ndarray:
    """An image file as [H, W, C] (uint8 from PNG/JPEG, or the array a .npy file holds)."""
    if path.endswith(".npy"):
        return np.load(path)
    try:
        from PIL import Image
    except ImportError as e:  # pragma: no cover - pillow is in the test extra
        raise ImportError(f"reading {path} needs Pillow (pip install pillow), or store images as .npy arrays") from e
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


class VLConversationEncoder(ThreadSafeCounts):
    """JsonRecord -> the features above for one conversation (a DocumentSource converter; None when dropped).

    Counts `cut` (always 0: VL conversations are never cut) and `dropped` (longer than a row, or more patches than
    `max_patches`) thread-safely, like `ConversationEncoder`.
    """

    def __init__(self, tokenizer, seq_len: int, max_patches: int, processor: ImageProcessor):
        super().__init__()
        self.text = ConversationEncoder(tokenizer, seq_len)
        self.seq_len, self.max_patches, self.processor = seq_len, max_patches, processor
        special = tokenizer.special_tokens
        names = (("image_token", IMAGE_TOKEN), ("image_start_token", IMAGE_START), ("image_end_token", IMAGE_END))
        self.image_token, self.image_start, self.image_end = (special.get(key, default) for key, default in names)
        ids = [tokenizer.token_to_id(token) for token in (self.image_token, self.image_start, self.image_end)]
        tokens = (self.image_token, self.image_start, self.image_end)
        missing = [token for token, i in zip(tokens, ids, strict=True) if i is None]
        if missing:
            raise ValueError(
                f"data.format=vl_sft: the tokenizer in data.tokenizer has no {', '.join(missing)} token(s); use an "
                "ERNIE-4.5-VL checkpoint directory (its tokenizer holds the image tokens)"
            )
        self.image_token_id, self.image_start_id, self.image_end_id = ids
        self.cut = self.dropped = 0

    def _messages(self, record: JsonRecord) -> tuple[list[dict[str, str]], list[int], list[str]]:
        """(messages with string contents, labels, image paths) of a row; BadRecordError names what is wrong."""
        obj, where = record.value, record.where
        images = obj.get("images", [])
        if not isinstance(images, list) or not all(isinstance(p, str) and p for p in images):
            raise BadRecordError(f"{where}: 'images' must be a list of image file paths, got {images!r:.80}")
        raw = obj.get("messages")
        if not isinstance(raw, list):
            raise BadRecordError(f"{where}: a VL conversation needs 'messages' (a list of {{role, content}})")
        messages = []
        for i, m in enumerate(raw):
            content = m.get("content") if isinstance(m, dict) else None
            if isinstance(content, list):
                m = {**m, "content": self._join_parts(content, f"{where}: messages[{i}]")}
            messages.append(m)
        messages, labels = conversation(JsonRecord({"messages": messages}, where))
        root = os.path.dirname(where.rsplit(":", 1)[0])  # `where` is "file:line"
        return messages, labels, [p if os.path.isabs(p) else os.path.join(root, p) for p in images]

    def _join_parts(self, parts: list, where: str) -> str:
        out = []
        for part in parts:
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                out.append(part["text"])
            elif kind in ("image", "image_url"):
                out.append(self.image_start + self.image_token + self.image_end)
            else:
                raise BadRecordError(
                    f"{where}: content parts are {{'type': 'text', 'text': str}} or {{'type': 'image'}}, "
                    f"got {part!r:.80}"
                )
        return "".join(out)

    def __call__(self, record: Any) -> dict[str, np.ndarray] | None:
        messages, labels, paths = self._messages(record)
        ids, supervised = self.text.token_ids(messages, labels)
        where = record.where
        at = np.flatnonzero(ids == self.image_token_id)
        if len(at) != len(paths):
            raise BadRecordError(
                f"{where}: 'images' lists {len(paths)} image(s) but the messages hold {len(at)} image placeholder(s) "
                f"({self.image_token} or an {{'type': 'image'}} part); give one image per placeholder"
            )
        if supervised[at].any():
            raise BadRecordError(f"{where}: an image placeholder in an assistant reply; images belong to user turns")
        if paths:
            try:
                batch = self.processor([load_image(p) for p in paths])
            except (OSError, ValueError) as e:
                raise BadRecordError(f"{where}: 'images': {e}") from e
            grid = batch["image_grid_thw"]
        else:
            batch, grid = {"pixel_values": np.zeros((0, self._patch_dim()), np.float32)}, np.zeros((0, 3), np.int64)
        merge = self.processor.merge_size
        counts = (np.prod(grid, axis=-1) // merge**2).astype(np.int64)
        # Each placeholder becomes its image's token count (transformers' processor does this on the text).
        repeats = np.ones(len(ids), np.int64)
        repeats[at] = counts
        ids, supervised = np.repeat(ids, repeats), np.repeat(supervised, repeats)
        patches = int(np.prod(grid, axis=-1).sum())
        if len(ids) > self.seq_len + 1 or patches > self.max_patches:
            self.count("dropped")
            return None
        inputs = ids[:-1]
        types = np.where(inputs == self.image_token_id, IMAGE, 0)[None]  # [1, L] mm_token_type_ids
        positions = rope_index(types, grid if paths else None, spatial_merge_size=merge, temporal_merge_size=2)[:, 0]
        targets = ids[1:].copy()
        loss_mask = supervised[1:].astype(np.float32)
        targets[(targets == self.text.end_id) & (loss_mask > 0)] = self.text.eos_id  # as the text SFT rows
        gate = np.isin(inputs, [self.image_token_id, self.image_start_id, self.image_end_id])  # the MoE hard gate
        patch_image = np.repeat(np.arange(1, len(grid) + 1), np.prod(grid, axis=-1)).astype(np.int32)
        rows_cols = vision_patch_positions(grid, merge) if paths else np.zeros((0, 2), np.int32)
        return {
            "input_ids": inputs.astype(np.int32),
            "targets": targets.astype(np.int32),
            "loss_mask": loss_mask,
            "positions": positions[0],
            "positions_h": positions[1],
            "positions_w": positions[2],
            "token_types": (gate * IMAGE).astype(np.int32),
            "pixel_values": batch["pixel_values"].astype(np.float32),
            "patch_image": patch_image,
            "patch_rows": rows_cols[:, 0].astype(np.int32),
            "patch_cols": rows_cols[:, 1].astype(np.int32),
        }

    def _patch_dim(self) -> int:
        p = self.processor
        return 3 * p.temporal_patch_size * p.patch_size**2


def patch_frames(patch_segments: np.ndarray, patch_image: np.ndarray) -> np.ndarray:
    """Packed rows [B, P]: the frame (image) id of every patch, 1.. along the row, 0 for padding, from the packed
    conversation of each patch and its image index within that conversation."""
    key = patch_segments.astype(np.int64) * (int(patch_image.max(initial=0)) + 1) + patch_image
    starts = np.concatenate([np.ones_like(key[:, :1], bool), key[:, 1:] != key[:, :-1]], axis=1)
    return np.where(patch_segments > 0, np.cumsum(starts, axis=1), 0).astype(np.int32)


def vl_encoder(tokenizer, data_cfg) -> VLConversationEncoder:
    """The encoder for a DataConfig with format=vl_sft: the image processor of the checkpoint directory in
    data.tokenizer (its preprocessor_config.json), else ERNIE-4.5-VL's defaults."""
    directory = data_cfg.tokenizer
    has_config = os.path.isdir(directory) and os.path.isfile(os.path.join(directory, "preprocessor_config.json"))
    processor = ImageProcessor.from_pretrained(directory) if has_config else ImageProcessor()
    return VLConversationEncoder(tokenizer, data_cfg.row_len, data_cfg.vision_patches, processor)


def check_image_tokens(cfg, tokenizer) -> None:
    """The tokenizer's image placeholder, start and end tokens are the model's (VLConfig's ids), or ValueError."""
    special = tokenizer.special_tokens
    pairs = (
        ("image_token_id", special.get("image_token", IMAGE_TOKEN)),
        ("image_start_token_id", special.get("image_start_token", IMAGE_START)),
        ("image_end_token_id", special.get("image_end_token", IMAGE_END)),
    )
    for field, token in pairs:
        if tokenizer.token_to_id(token) != getattr(cfg, field):
            raise ValueError(
                f"the tokenizer gives {token} the id {tokenizer.token_to_id(token)} but the model's {field} is "
                f"{getattr(cfg, field)}; use the VL checkpoint's own tokenizer (or set model.{field})"
            )
