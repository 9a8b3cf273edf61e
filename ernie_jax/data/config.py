"""DataConfig: everything that determines the token stream (and so must match when an iterator is restored)."""

from __future__ import annotations

import dataclasses
from typing import Literal

BUILTIN_PYTHON_DOCS = "builtin:python-docs"
TXT_SPLITS = ("blank_line", "line", "file")


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Input pipeline settings.

    Attributes:
        sources: File paths or globs (local, ``gs://`` and anything else ``etils.epath`` opens), or
            ``"builtin:python-docs"``: the Python documentation topics shipped with every CPython install
            (``pydoc_data.topics``), one document per topic, so the default needs no download.
        text_field: Field holding the document text in jsonl lines, parquet rows and JSON ArrayRecord records.
        tokenizer: ``"bytes"`` (UTF-8 bytes, vocab 259) or a path to a directory holding ``tokenizer.model``
            (ERNIE's SentencePiece model) or to the ``.model`` file itself.
        seq_len: Tokens per packed row (the model's sequence length).
        lookahead: Extra tokens per row past ``seq_len`` (rows hold ``seq_len + lookahead``): the tokens that
            multi-token prediction embeds and predicts beyond the main model's window. The trainer sets it from
            ``mtp.depth``; 0 otherwise.
        global_batch_size: Rows per step summed over all processes.
        seed: Seed of the document shuffle; the stream is a pure function of the config and the seed.
        shuffle: Shuffle documents (a fresh permutation each epoch).
        num_epochs: Passes over the data; None repeats forever (what a step-driven trainer wants).
        add_bos: Prepend bos to each document.
        add_eos: Append eos to each document, so the model learns where documents end.
        txt_split: How ``.txt`` files split into documents: ``"blank_line"`` (paragraph blocks separated by
            empty lines), ``"line"`` or ``"file"`` (the whole file is one document).
        worker_count: Grain worker processes (0 = in-process, the sensible default on small CPU hosts).
        read_threads: Threads that read and tokenize documents ahead of packing.
        process_sharding: "documents": each process reads a disjoint 1/P of the documents (scales to any corpus).
            "rows": every process builds the same global stream and keeps its rows of each global batch, so the
            batches do not depend on the number of processes (costs P times the reading; for tests and audits).
        format: ``"text"``: documents, every token learned, packed by concatenation (a long document continues in
            the next row). ``"sft"``: jsonl conversations (see `ernie_jax.data.sft`), loss on the assistant's
            replies only, packed whole (first fit); needs ``tokenizer`` to be a checkpoint directory.
            ``"vl_sft"``: conversations with images for ERNIE-4.5-VL (see `ernie_jax.vl.sft`), packed whole with
            their image patches; ``tokenizer`` must be the VL checkpoint directory (its image tokens, and its
            ``preprocessor_config.json`` if it has one, else ERNIE-4.5-VL's image processor defaults).
        vision_patches: ``"vl_sft"``: image patches per row (P): the static budget every row's images share.
        on_bad_record: A record that cannot be read (malformed JSON, a missing or non-string field, bytes that
            are not UTF-8): ``"stop"`` raises an error naming its file and line; ``"skip"`` logs it, counts it and
            reads on. It does not change the stream of good records, so a stopped run can resume with ``"skip"``.
    """

    sources: tuple[str, ...] = (BUILTIN_PYTHON_DOCS,)
    text_field: str = "text"
    tokenizer: str = "bytes"
    seq_len: int = 256
    lookahead: int = 0
    global_batch_size: int = 8
    seed: int = 0
    shuffle: bool = True
    num_epochs: int | None = None
    add_bos: bool = False
    add_eos: bool = True
    txt_split: Literal["blank_line", "line", "file"] = "blank_line"
    worker_count: int = 0
    read_threads: int = 4
    process_sharding: Literal["documents", "rows"] = "documents"
    on_bad_record: Literal["stop", "skip"] = "stop"
    format: Literal["text", "sft", "vl_sft"] = "text"
    vision_patches: int = 0

    def __post_init__(self):
        # A bare string is the most common slip (`sources="a.jsonl"` would otherwise iterate its characters).
        sources = (self.sources,) if isinstance(self.sources, str) else tuple(self.sources)
        object.__setattr__(self, "sources", sources)
        if not sources or not all(isinstance(s, str) and s for s in sources):
            raise ValueError(f"DataConfig.sources must be a non-empty tuple of non-empty strings, got {self.sources!r}")
        if not isinstance(self.text_field, str) or not self.text_field:
            raise ValueError(f"DataConfig.text_field must be a non-empty string, got {self.text_field!r}")
        if not isinstance(self.tokenizer, str) or not self.tokenizer:
            raise ValueError(f"DataConfig.tokenizer must be 'bytes' or a path, got {self.tokenizer!r}")
        for name in ("seq_len", "global_batch_size", "read_threads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DataConfig.{name} must be a positive int, got {value!r}")
        if not isinstance(self.lookahead, int) or isinstance(self.lookahead, bool) or self.lookahead < 0:
            raise ValueError(f"DataConfig.lookahead must be an int >= 0, got {self.lookahead!r}")
        if not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"DataConfig.seed must be an int in [0, 2**32), got {self.seed!r}")
        if self.num_epochs is not None and (not isinstance(self.num_epochs, int) or self.num_epochs < 1):
            raise ValueError(f"DataConfig.num_epochs must be None (forever) or a positive int, got {self.num_epochs!r}")
        if self.process_sharding not in ("documents", "rows"):
            raise ValueError(
                f"DataConfig.process_sharding must be 'documents' or 'rows', got {self.process_sharding!r}"
            )
        if not isinstance(self.worker_count, int) or self.worker_count < 0:
            raise ValueError(f"DataConfig.worker_count must be an int >= 0, got {self.worker_count!r}")
        if self.format not in ("text", "sft", "vl_sft"):
            raise ValueError(f"DataConfig.format must be 'text', 'sft' or 'vl_sft', got {self.format!r}")
        if not isinstance(self.vision_patches, int) or self.vision_patches < 0:
            raise ValueError(f"DataConfig.vision_patches must be an int >= 0, got {self.vision_patches!r}")
        if self.format == "vl_sft" and self.vision_patches == 0:
            raise ValueError(
                "DataConfig.vision_patches must be > 0 with format=vl_sft: the image patches one row holds "
                "(e.g. 4096; a 448x448 image takes 1024)"
            )
        if self.on_bad_record not in ("stop", "skip"):
            raise ValueError(f"DataConfig.on_bad_record must be 'stop' or 'skip', got {self.on_bad_record!r}")
        if self.txt_split not in TXT_SPLITS:
            raise ValueError(f"DataConfig.txt_split must be one of {TXT_SPLITS}, got {self.txt_split!r}")

    @property
    def row_len(self) -> int:
        """Tokens per packed row: seq_len plus the lookahead."""
        return self.seq_len + self.lookahead

    def replace(self, **changes) -> DataConfig:
        """A copy with `changes` applied (and validated)."""
        return dataclasses.replace(self, **changes)
