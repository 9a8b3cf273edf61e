"""Random-access document sources: jsonl, txt, parquet, ArrayRecord files and the builtin Python-docs corpus.

Every file becomes a random-access list of documents (strings), so Grain can shuffle globally and its iterator
state is just an index. jsonl and txt files are indexed once up front (a scan for line / paragraph byte spans,
16 bytes of index per document); parquet uses its row-group metadata; ArrayRecord is random access natively.
Readers keep per-thread file handles because Grain reads with a thread pool.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from etils import epath

from ernie_jax.data.config import BUILTIN_PYTHON_DOCS

log = logging.getLogger(__name__)

SUPPORTED_FORMATS = (".jsonl", ".txt", ".parquet", ".array_record")
_FORMAT_HELP = (
    f"supported formats: {', '.join(SUPPORTED_FORMATS)} (optionally with a -NNNNN-of-NNNNN shard suffix), "
    f"or {BUILTIN_PYTHON_DOCS!r}"
)
_SHARD_SUFFIX = re.compile(r"-\d+-of-\d+$")
_EXTENSIONS = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".txt": "txt",
    ".parquet": "parquet",
    ".array_record": "array_record",
    ".arrayrecord": "array_record",
}
_GLOB_CHARS = re.compile(r"[*?\[]")
# Two or more line breaks with only spaces/tabs between them separate paragraph documents.
_BLANK_LINES = re.compile(rb"(?:\r?\n[ \t]*){2,}")


def file_format(path: str) -> str:
    """The reader for `path`, from its extension (shard suffixes like ``-00003-of-00010`` are ignored).

    Raises:
        ValueError: for an unknown extension, listing the supported formats.
    """
    name = _SHARD_SUFFIX.sub("", epath.Path(path).name)
    for ext, kind in _EXTENSIONS.items():
        if name.endswith(ext):
            return kind
    raise ValueError(f"data source {path}: unknown file format; {_FORMAT_HELP}")


def expand_sources(sources: Sequence[str]) -> list[str]:
    """Globs expanded (sorted, so every process sees the same order); missing files raise naming the path."""
    files: list[str] = []
    for src in sources:
        if src == BUILTIN_PYTHON_DOCS:
            files.append(src)
            continue
        if src.startswith("builtin:"):
            raise ValueError(f"data source {src!r}: unknown builtin corpus; the only one is {BUILTIN_PYTHON_DOCS!r}")
        if _GLOB_CHARS.search(src):
            matches = _glob(src)
            if not matches:
                raise FileNotFoundError(f"data source pattern {src} matched no files")
            files.extend(matches)
        else:
            if not epath.Path(src).exists():
                raise FileNotFoundError(f"data source {src} does not exist")
            files.append(src)
    for f in files:
        if f != BUILTIN_PYTHON_DOCS:
            file_format(f)  # Fail on an unknown extension before reading anything.
    return files


def _glob(pattern: str) -> list[str]:
    # epath globs relative to a concrete directory: split at the first path component holding a wildcard.
    parts = pattern.split("/")
    first = next(i for i, p in enumerate(parts) if _GLOB_CHARS.search(p))
    base = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
    base_path = epath.Path(base)
    if not base_path.exists():
        return []
    return sorted(str(p) for p in base_path.glob("/".join(parts[first:])) if p.is_file())


class BadRecordError(ValueError):
    """One record cannot be read as a document. The message starts with `file:line` (or the row or record)."""


@dataclasses.dataclass(frozen=True)
class JsonRecord:
    """A whole JSON object read from a source (text_field=None, e.g. an SFT conversation) and where it was."""

    value: dict
    where: str


def _decode_json_text(raw: bytes | str, field: str | None, where: str) -> str | JsonRecord:
    """The text in `field` of a JSON object, or (field None) the whole object as a JsonRecord."""
    try:
        obj = json.loads(raw)
    except UnicodeDecodeError as e:
        raise BadRecordError(f"{where}: not UTF-8 ({e.reason} at byte {e.start})") from e
    except json.JSONDecodeError as e:
        raise BadRecordError(f"{where}: not valid JSON ({e})") from e
    if field is None:
        if not isinstance(obj, dict):
            raise BadRecordError(f"{where}: expected a JSON object, got {type(obj).__name__}")
        return JsonRecord(obj, where)
    if not isinstance(obj, dict) or field not in obj:
        keys = sorted(obj) if isinstance(obj, dict) else type(obj).__name__
        raise BadRecordError(f"{where}: no field {field!r} (data.text_field); found {keys}")
    value = obj[field]
    if value is None:
        return ""
    if not isinstance(value, str):
        raise BadRecordError(f"{where}: field {field!r} holds {type(value).__name__}, expected a string")
    return value


class _ThreadLocalHandles:
    """One open file per (thread, path): seek+read on a shared handle would race across Grain's read threads."""

    def __init__(self):
        self._local = threading.local()

    def get(self, path: str):
        handles = self._local.__dict__.setdefault("handles", {})
        if path not in handles:
            handles[path] = epath.Path(path).open("rb")
        return handles[path]

    def __getstate__(self):
        return {}

    def __setstate__(self, state):
        self._local = threading.local()


class SpanFile:
    """jsonl or txt: documents are byte spans found by one scan of the file."""

    def __init__(self, path: str, kind: str, text_field: str, txt_split: str):
        self.path, self.kind, self.text_field = path, kind, text_field
        data = epath.Path(path).read_bytes()
        if kind == "txt" and txt_split == "file":
            starts, ends = np.array([0]), np.array([len(data)])
        elif kind == "jsonl" or txt_split == "line":
            newlines = np.flatnonzero(np.frombuffer(data, np.uint8) == ord("\n"))
            starts = np.concatenate([[0], newlines + 1])
            ends = np.concatenate([newlines, [len(data)]])
        else:
            seps = [(m.start(), m.end()) for m in _BLANK_LINES.finditer(data)]
            starts = np.array([0] + [e for _, e in seps])
            ends = np.array([s for s, _ in seps] + [len(data)])
        # Whitespace-only spans are dropped here so the index counts real documents.
        keep = [i for i, (s, e) in enumerate(zip(starts, ends, strict=True)) if data[s:e].strip()]
        self.starts = starts[keep].astype(np.int64)
        self.lengths = (ends[keep] - starts[keep]).astype(np.int64)
        if kind == "jsonl" and len(keep):  # Catch a wrong text_field now, not in a reader thread mid-training.
            try:
                first = json.loads(data[self.starts[0] : self.starts[0] + self.lengths[0]])
            except ValueError:
                first = None  # a bad first line is a bad record, reported (or skipped) when it is read
            if isinstance(first, dict) and text_field is not None and text_field not in first:
                raise ValueError(f"{path}: no field {text_field!r} (data.text_field); found {sorted(first)}")
        self._handles = _ThreadLocalHandles()

    def __len__(self) -> int:
        return len(self.starts)

    def _line_of(self, offset: int) -> int:
        """1-based line number of a byte offset (only computed for an error message)."""
        f = self._handles.get(self.path)
        f.seek(0)
        return f.read(offset).count(b"\n") + 1

    def __getitem__(self, i: int) -> str:
        start = int(self.starts[i])
        f = self._handles.get(self.path)
        f.seek(start)
        raw = f.read(int(self.lengths[i]))
        if self.kind == "jsonl":
            return _decode_json_text(raw, self.text_field, f"{self.path}:{self._line_of(start)}")
        try:
            return raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise BadRecordError(
                f"{self.path}:{self._line_of(start + e.start)}: not UTF-8 text ({e.reason}: byte 0x{raw[e.start]:02x})"
            ) from None


class ParquetFile:
    """One parquet file's `text_field` column; the last row group read is cached per thread."""

    def __init__(self, path: str, text_field: str):
        pq = _pyarrow_parquet(path)
        self.path, self.text_field = path, text_field
        with epath.Path(path).open("rb") as f:
            meta = pq.ParquetFile(f)
            names = meta.schema_arrow.names
            if text_field not in names:
                raise ValueError(f"{path}: no column {text_field!r} (data.text_field); found {names}")
            column_type = meta.schema_arrow.field(text_field).type
            if not _is_arrow_string(column_type):
                raise ValueError(
                    f"{path}: column {text_field!r} holds {column_type}, not text; point data.text_field at a "
                    "string column"
                )
            counts = [meta.metadata.row_group(g).num_rows for g in range(meta.num_row_groups)]
        self.row_group_ends = np.cumsum(counts, dtype=np.int64)
        self._local = threading.local()

    def __len__(self) -> int:
        return int(self.row_group_ends[-1]) if len(self.row_group_ends) else 0

    def __getitem__(self, i: int) -> str:
        group = int(np.searchsorted(self.row_group_ends, i, side="right"))
        cached = getattr(self._local, "group", None)
        if cached is None or cached[0] != group:
            pq = _pyarrow_parquet(self.path)
            with epath.Path(self.path).open("rb") as f:
                rows = pq.ParquetFile(f).read_row_group(group, columns=[self.text_field]).column(0).to_pylist()
            cached = self._local.group = (group, rows)
        first = int(self.row_group_ends[group - 1]) if group else 0
        value = cached[1][i - first]
        return "" if value is None else value

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_local"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()


def _is_arrow_string(arrow_type) -> bool:
    import pyarrow as pa

    checks = (pa.types.is_string, pa.types.is_large_string, getattr(pa.types, "is_string_view", None))
    return any(check is not None and check(arrow_type) for check in checks)


def _pyarrow_parquet(path: str):
    try:
        import pyarrow.parquet as pq
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(f"{path} is a parquet file: `pip install pyarrow` to read parquet sources") from e
    return pq


class ArrayRecordFile:
    """ArrayRecord records: UTF-8 text, or a JSON object whose `text_field` holds the text."""

    def __init__(self, path: str, text_field: str):
        import grain

        self.path, self.text_field = path, text_field
        self._source = grain.sources.ArrayRecordDataSource([path])

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, i: int) -> str:
        raw = self._source[i]
        if raw[:1] == b"{":
            try:
                obj = json.loads(raw)
            except json.JSONDecodeError:
                obj = None
            if isinstance(obj, dict):
                return _decode_json_text(raw, self.text_field, f"{self.path} (record {i})")
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRecordError(f"{self.path} (record {i}): not UTF-8 text ({e.reason} at byte {e.start})") from None


def python_docs_corpus() -> list[str]:
    """The Python documentation topics (``pydoc_data.topics``, ~460 KB of English), one document per topic."""
    try:
        from pydoc_data.topics import topics
    except ImportError as e:  # pragma: no cover - every CPython ships it; some distro splits may not
        raise ImportError(
            f"{BUILTIN_PYTHON_DOCS!r} reads the stdlib module pydoc_data.topics, which this Python lacks; "
            f"pass DataConfig.sources explicitly"
        ) from e
    return [topics[k].strip() for k in sorted(topics) if topics[k].strip()]


class ThreadSafeCounts:
    """Counters bumped from Grain's read threads. The lock is rebuilt after pickling (Grain worker processes)."""

    def __init__(self):
        self._lock = threading.Lock()

    def count(self, name: str, n: int = 1) -> int:
        with self._lock:
            value = getattr(self, name) + n
            setattr(self, name, value)
            return value

    def __getstate__(self):
        return {k: v for k, v in self.__dict__.items() if k != "_lock"}

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()


class DocumentSource(ThreadSafeCounts):
    """All files of a config as one random-access sequence of document strings (a Grain data source).

    A record that cannot be read raises `BadRecordError` naming its file and line (`on_bad_record="stop"`), or is
    logged, counted in `skipped` and read as None (`"skip"`), which the pipeline drops. The count is this
    process's: with Grain worker processes (data.worker_count > 0) the workers' skips are logged, not counted.
    """

    def __init__(
        self,
        files: Sequence[str],
        text_field: str | None = "text",
        txt_split: str = "blank_line",
        on_bad_record: str = "stop",
        convert: Callable[[Any], Any] | None = None,
    ):
        super().__init__()
        self.files = list(files)
        self.on_bad_record = on_bad_record
        self.convert = convert  # applied to each record here, so its errors fall under the bad-record policy too
        self._parts = [self._open(f, text_field, txt_split) for f in self.files]
        self._ends = np.cumsum([len(p) for p in self._parts], dtype=np.int64)
        self.skipped = 0
        self._read = 0

    @staticmethod
    def _open(path: str, text_field: str, txt_split: str):
        if path == BUILTIN_PYTHON_DOCS:
            return python_docs_corpus()
        kind = file_format(path)
        if kind in ("jsonl", "txt"):
            return SpanFile(path, kind, text_field, txt_split)
        if kind == "parquet":
            return ParquetFile(path, text_field)
        return ArrayRecordFile(path, text_field)

    def __len__(self) -> int:
        return int(self._ends[-1]) if len(self._ends) else 0

    def __getitem__(self, i: int) -> str:
        i = int(i)
        if not 0 <= i < len(self):
            raise IndexError(f"document {i} out of range [0, {len(self)})")
        part = int(np.searchsorted(self._ends, i, side="right"))
        start = int(self._ends[part - 1]) if part else 0
        try:
            document = self._parts[part][i - start]
            if self.convert is not None:
                document = self.convert(document)
        except BadRecordError as e:
            if self.on_bad_record != "skip":
                raise
            skipped = self.count("skipped")
            if self._read == 0 and skipped >= len(self):  # no good record yet: a repeating stream would spin
                raise BadRecordError(f"every one of the {len(self)} records read so far was bad; last: {e}") from e
            log.warning("skipped a bad record (data.on_bad_record=skip): %s", e)
            return None
        self.count("_read")
        return document

    def __repr__(self):
        return f"DocumentSource({len(self.files)} files, {len(self)} documents)"
