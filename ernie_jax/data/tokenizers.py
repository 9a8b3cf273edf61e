"""Tokenizers: UTF-8 bytes (no files needed) and ERNIE's SentencePiece ``tokenizer.model``."""

from __future__ import annotations

from typing import Protocol

import numpy as np
from etils import epath

# ERNIE 4.5's released tokenizer uses these ids too, so byte-trained and ERNIE-tokenized data agree on specials.
PAD_ID, BOS_ID, EOS_ID = 0, 1, 2


class Tokenizer(Protocol):
    vocab_size: int
    pad_id: int
    bos_id: int
    eos_id: int

    def encode(self, text: str) -> list[int]: ...

    def encode_array(self, text: str) -> np.ndarray: ...

    def decode(self, ids) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes: pad 0, bos 1, eos 2, byte b -> b + 3 (vocab 259)."""

    OFFSET = 3
    vocab_size = 256 + OFFSET
    pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids as an int32 array (the pipeline's fast path)."""
        return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32) + self.OFFSET

    def encode(self, text: str) -> list[int]:
        return self.encode_array(text).tolist()

    def decode(self, ids) -> str:
        ids = np.asarray(ids, np.int64).reshape(-1)
        # Specials carry no bytes; a model may also emit a cut multi-byte sequence, hence errors="replace".
        return bytes((ids[ids >= self.OFFSET] - self.OFFSET).astype(np.uint8)).decode("utf-8", errors="replace")

    def __repr__(self):
        return "ByteTokenizer()"


class SentencePieceTokenizer:
    """A SentencePiece model (ERNIE's ``tokenizer.model``), loaded from bytes so any epath location works.

    The processor is rebuilt after pickling (grain workers receive the tokenizer by pickle), from the model bytes.
    """

    def __init__(self, model_proto: bytes, source: str = "<bytes>"):
        self._proto = model_proto
        self.source = source
        self._sp = self._load()
        self.vocab_size = int(self._sp.get_piece_size())
        # sentencepiece reports -1 for a special the model does not define: fall back to ERNIE's ids.
        self.pad_id = _id_or(self._sp.pad_id(), PAD_ID)
        self.bos_id = _id_or(self._sp.bos_id(), BOS_ID)
        self.eos_id = _id_or(self._sp.eos_id(), EOS_ID)

    def _load(self):
        try:
            import sentencepiece as spm
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise ImportError(
                f"tokenizer {self.source!r} is a SentencePiece model: `pip install sentencepiece` to use it"
            ) from e
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(self._proto)
        except Exception as e:
            raise ValueError(f"{self.source} is not a valid SentencePiece model: {e}") from e
        return sp

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_sp"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._sp = self._load()

    def encode(self, text: str) -> list[int]:
        return list(self._sp.EncodeAsIds(text))

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self._sp.EncodeAsIds(text), np.int32)

    def decode(self, ids) -> str:
        return self._sp.DecodeIds([int(i) for i in np.asarray(ids).reshape(-1)])

    def __repr__(self):
        return f"SentencePieceTokenizer({self.source!r}, vocab_size={self.vocab_size})"


def _id_or(value: int, default: int) -> int:
    return int(value) if value is not None and value >= 0 else default


def load_tokenizer(spec: str) -> Tokenizer:
    """``"bytes"``, a Hugging Face checkpoint directory, or a SentencePiece ``.model`` (or a directory holding one).

    A checkpoint directory (``tokenizer.model`` with ``tokenizer_config.json`` beside it, as ERNIE's releases ship)
    gets `ernie_jax.tokenizer.Tokenizer`: the same ids as transformers, added and special tokens matched whole. Any
    other SentencePiece model is encoded by SentencePiece itself.

    Raises:
        FileNotFoundError: naming the path looked at.
    """
    if spec == "bytes":
        return ByteTokenizer()
    path = epath.Path(spec)
    if path.is_dir() and (path / "tokenizer_config.json").is_file():
        from ernie_jax.tokenizer import Tokenizer as CheckpointTokenizer

        return CheckpointTokenizer.from_pretrained(str(path))
    if path.is_dir():
        path = path / "tokenizer.model"
    if not path.is_file():
        raise FileNotFoundError(
            f"tokenizer: no SentencePiece model at {path} (DataConfig.tokenizer is 'bytes', a directory holding "
            f"tokenizer.model, or the .model file)"
        )
    return SentencePieceTokenizer(path.read_bytes(), source=str(path))
