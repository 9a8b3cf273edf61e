"""Sampling and stopping defaults, read from a checkpoint's generation_config.json (transformers' file format)."""

from __future__ import annotations

import dataclasses
import json
import os

GENERATION_CONFIG_FILE = "generation_config.json"


@dataclasses.dataclass(frozen=True)
class GenerationConfig:
    """The fields of generation_config.json that `generate` uses; a key absent from the file keeps its default.

    Defaults are transformers' except top_k: transformers filters to 50 tokens when sampling unless told otherwise;
    here an absent top_k means no top-k filter, so a file that says only top_p gets exactly top-p.
    """

    do_sample: bool = False
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float = 1.0
    eos_token_id: tuple[int, ...] | None = None
    pad_token_id: int | None = None

    @classmethod
    def from_dict(cls, values: dict) -> GenerationConfig:
        eos = values.get("eos_token_id")
        if isinstance(eos, int):
            eos = (eos,)
        elif eos is not None:
            eos = tuple(int(i) for i in eos)
        top_k = values.get("top_k")
        top_p = values.get("top_p")
        return cls(
            do_sample=bool(values.get("do_sample", False)),
            temperature=float(values.get("temperature", 1.0)),
            top_k=None if top_k in (None, 0) else int(top_k),
            top_p=None if top_p is None or float(top_p) >= 1.0 else float(top_p),
            repetition_penalty=float(values.get("repetition_penalty", 1.0)),
            eos_token_id=eos,
            pad_token_id=values.get("pad_token_id"),
        )

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> GenerationConfig | None:
        """The checkpoint directory's generation_config.json, or None when it has none."""
        path = os.path.join(os.fspath(directory), GENERATION_CONFIG_FILE)
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return cls.from_dict(json.load(f))
