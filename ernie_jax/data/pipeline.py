"""The Grain pipeline: documents -> (shard, shuffle, repeat) -> tokens -> packed rows -> per-process batches.

Packing works on (input, target) pairs made per document *before* packing: document tokens ``t`` become
``input_ids = t[:-1]`` and ``targets = t[1:]``, and Grain's ConcatThenSplitIterDataset packs both features with the
same cuts. So every target is the true next token of its own document (no target ever crosses a document, and
none is lost at row boundaries), ``loss_mask`` is simply ``segment_ids > 0``, and documents longer than a row
continue in the next row as a new segment whose positions restart at 0.
"""

from __future__ import annotations

import dataclasses
import json
import weakref
from typing import Any

import grain
import numpy as np
from grain import experimental as grain_exp

from ernie_jax.data.config import BUILTIN_PYTHON_DOCS, DataConfig
from ernie_jax.data.schema import make_batch
from ernie_jax.data.sft import ConversationEncoder
from ernie_jax.data.sources import DocumentSource, expand_sources, file_format
from ernie_jax.data.tokenizers import Tokenizer, load_tokenizer

STATE_FORMAT = "ernie_jax.data/v1"
# Fields that do not change the token stream a process sees; everything else must match on restore.
_STATE_NEUTRAL_FIELDS = ("read_threads", "on_bad_record")
# Iterator -> the config fingerprint it was made from, so iterator_state(it) needs nothing but the iterator.
_FINGERPRINTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Iterator -> its DocumentSource, for the count of skipped bad records.
_SOURCES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def make_tokenizer(cfg: DataConfig) -> Tokenizer:
    """The tokenizer named by ``cfg.tokenizer`` (encode, decode, vocab_size, pad_id, bos_id, eos_id)."""
    return load_tokenizer(cfg.tokenizer)


def vocab_size_for(cfg: DataConfig) -> int:
    """Vocabulary size of the config's tokenizer; the model's ``vocab_size`` must be at least this."""
    return make_tokenizer(cfg).vocab_size


def local_batch_size(cfg: DataConfig, process_count: int) -> int:
    """Rows per process per step.

    Raises:
        ValueError: naming ``global_batch_size`` when it does not split evenly over the processes.
    """
    if cfg.global_batch_size % process_count:
        raise ValueError(
            f"DataConfig.global_batch_size={cfg.global_batch_size} is not divisible by the process count "
            f"{process_count}: each process must yield an equal share of the global batch"
        )
    return cfg.global_batch_size // process_count


class _Encode:
    """Document text -> {"input_ids", "targets"} next-token pairs (a class, not a lambda, so workers can pickle it)."""

    def __init__(self, tokenizer: Tokenizer, add_bos: bool, add_eos: bool):
        self.tokenizer, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos

    def __call__(self, text: str | None) -> dict[str, np.ndarray] | None:
        if text is None:  # a bad record that the source skipped
            return None
        ids = self.tokenizer.encode_array(text)
        parts = [ids]
        if self.add_bos:
            parts.insert(0, np.array([self.tokenizer.bos_id], np.int32))
        if self.add_eos:
            parts.append(np.array([self.tokenizer.eos_id], np.int32))
        tokens = np.concatenate(parts).astype(np.int32)
        if len(tokens) < 2:  # A document needs two tokens to make one (input, target) pair.
            return None
        return {"input_ids": tokens[:-1], "targets": tokens[1:]}


def _finalize(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Packed features -> the batch schema (data/schema.py). Text rows learn every real target; SFT rows carry a
    mask of their own; VL rows carry their own (3D) positions and image patches."""
    segment_ids = batch["input_ids_segment_ids"]
    loss_mask = (segment_ids > 0).astype(np.float32)
    if "loss_mask" in batch:
        loss_mask = loss_mask * batch["loss_mask"].astype(np.float32)
    vision = {}
    if "pixel_values" in batch:
        from ernie_jax.vl.sft import patch_frames  # only VL rows need it (and the vl package imports jax)

        vision = {key: batch[key] for key in ("positions_h", "positions_w", "token_types", "pixel_values")}
        vision.update(
            patch_frames=patch_frames(batch["pixel_values_segment_ids"], batch["patch_image"]),
            patch_rows=batch["patch_rows"],
            patch_cols=batch["patch_cols"],
        )
    return make_batch(
        input_ids=batch["input_ids"],
        targets=batch["targets"],
        segment_ids=segment_ids,
        positions=batch["positions"] if vision else batch["input_ids_positions"],
        loss_mask=loss_mask,
        **vision,
    )


def _not_none(x) -> bool:
    return x is not None


def make_dataset(
    cfg: DataConfig, *, process_index: int = 0, process_count: int = 1, source: DocumentSource | None = None
) -> grain.IterDataset:
    """The process's dataset of batches (see `make_iterator`); exposed for composing further Grain stages.

    Raises:
        ValueError: bad process arguments, an uneven global batch, or fewer documents than processes.
        FileNotFoundError: a missing source file or a pattern matching nothing (naming it).
    """
    if not isinstance(process_count, int) or process_count < 1:
        raise ValueError(f"process_count must be a positive int, got {process_count!r}")
    if not isinstance(process_index, int) or not 0 <= process_index < process_count:
        raise ValueError(f"process_index must be in [0, {process_count}), got {process_index!r}")
    batch = local_batch_size(cfg, process_count)
    tokenizer = make_tokenizer(cfg)
    if source is None:
        source = document_source(cfg)
    # Equal, disjoint, static shards: drop the last `n % process_count` documents, then take every
    # process_count-th one. Sharding before the shuffle keeps shards disjoint in every epoch.
    by_rows = cfg.process_sharding == "rows"
    readers = 1 if by_rows else process_count  # with "rows", every process reads the whole global stream
    usable = len(source) - len(source) % readers
    if usable == 0:
        raise ValueError(f"DataConfig.sources {cfg.sources} hold {len(source)} documents; need >= {process_count}")
    ds = grain.MapDataset.source(source)[:usable][(0 if by_rows else process_index) :: readers]
    if cfg.shuffle:
        ds = ds.shuffle(seed=cfg.seed)  # Grain folds the epoch into the seed: a new permutation each epoch.
    ds = ds.repeat(cfg.num_epochs)
    conversations = cfg.format in ("sft", "vl_sft")
    if conversations:  # the source already made (input, target, mask) triples; conversations are never split
        ds = ds.filter(_not_none)
    else:
        ds = ds.map(_Encode(tokenizer, cfg.add_bos, cfg.add_eos)).filter(_not_none)
    it_ds = ds.to_iter_dataset(grain.ReadOptions(num_threads=cfg.read_threads, prefetch_buffer_size=4 * batch))
    if conversations:
        # First-fit packing pads instead of splitting: a conversation cut across rows would lose its own context.
        # VL rows pack their image patches alongside, into the row's patch budget.
        lengths = {"input_ids": cfg.row_len, "targets": cfg.row_len, "loss_mask": cfg.row_len}
        if cfg.format == "vl_sft":
            from ernie_jax.vl.sft import PATCH_FEATURES, TOKEN_FEATURES

            lengths = {
                **dict.fromkeys(TOKEN_FEATURES, cfg.row_len),
                **dict.fromkeys(PATCH_FEATURES, cfg.vision_patches),
            }
        packed = grain_exp.FirstFitPackIterDataset(
            it_ds,
            length_struct=lengths,
            num_packing_bins=batch,
            shuffle_bins=False,
        )
    else:
        packed = grain_exp.ConcatThenSplitIterDataset(
            it_ds, length_struct={"input_ids": cfg.row_len, "targets": cfg.row_len}
        )
    out = packed.batch(cfg.global_batch_size if by_rows else batch, drop_remainder=True).map(_finalize)
    if by_rows:
        out = out.map(_TakeRows(process_index * batch, (process_index + 1) * batch))
    if cfg.worker_count > 0:
        # Grain's worker processes read absl flags; outside an absl app nobody parsed them, which makes
        # the workers fail with UnparsedFlagAccessError. Their defaults are what we want.
        from absl import flags

        if not flags.FLAGS.is_parsed():
            flags.FLAGS.mark_as_parsed()
        out = out.mp_prefetch(grain.MultiprocessingOptions(num_workers=cfg.worker_count))
    return out


class _TakeRows:
    """This process's rows of a global batch (a class, not a lambda, so Grain workers can pickle it)."""

    def __init__(self, start: int, stop: int):
        self.start, self.stop = start, stop

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {k: v[self.start : self.stop] for k, v in batch.items()}


def make_iterator(cfg: DataConfig, *, process_index: int = 0, process_count: int = 1) -> grain.DatasetIterator:
    """Batches for this process: dicts of numpy arrays shaped ``[global_batch_size // process_count, row_len]``
    (row_len = seq_len + lookahead).

    Keys: ``input_ids``, ``targets`` (next token of the same document), ``segment_ids`` (1.. per document piece in
    a row, 0 = padding), ``positions`` (restart at 0 per segment) int32, and ``loss_mask`` float32 (1 where
    ``targets`` is a real next token, 0 at padding). The stream is a pure function of ``cfg`` and the process
    arguments; ``get_state()`` / ``set_state()`` (or `iterator_state` / `restore_iterator`) resume it exactly.
    Processes read disjoint documents. With finite ``num_epochs`` processes may yield different numbers of
    batches (their documents differ in length), so multi-process trainers should run with ``num_epochs=None``.
    """
    source = document_source(cfg)
    it = iter(make_dataset(cfg, process_index=process_index, process_count=process_count, source=source))
    _FINGERPRINTS[it] = _fingerprint(cfg, process_index, process_count)
    _SOURCES[it] = source
    return it


def document_source(cfg: DataConfig) -> DocumentSource:
    files = expand_sources(cfg.sources)
    if cfg.format in ("sft", "vl_sft"):
        not_jsonl = [f for f in files if f == BUILTIN_PYTHON_DOCS or file_format(f) != "jsonl"]
        if not_jsonl:
            raise ValueError(f"data.format={cfg.format} reads jsonl conversations; not jsonl: {not_jsonl[:3]}")
        if cfg.format == "vl_sft":
            from ernie_jax.vl.sft import vl_encoder

            encoder = vl_encoder(make_tokenizer(cfg), cfg)
        else:
            encoder = ConversationEncoder(make_tokenizer(cfg), cfg.row_len)
        return DocumentSource(files, text_field=None, on_bad_record=cfg.on_bad_record, convert=encoder)
    return DocumentSource(files, text_field=cfg.text_field, txt_split=cfg.txt_split, on_bad_record=cfg.on_bad_record)


def truncation_counts(it: grain.DatasetIterator) -> dict[str, int]:
    """data.format=sft: conversations this process cut to fit data.seq_len, and dropped with nothing left to learn."""
    source = _SOURCES.get(it)
    encoder = getattr(source, "convert", None)
    return {"cut": encoder.cut, "dropped": encoder.dropped} if hasattr(encoder, "dropped") else {}


def skipped_records(it: grain.DatasetIterator) -> int:
    """Bad records this process's iterator skipped so far (data.on_bad_record=skip)."""
    source = _SOURCES.get(it)
    return source.skipped if source is not None else 0


def _fingerprint(cfg: DataConfig, process_index: int, process_count: int) -> dict[str, Any]:
    fields = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in _STATE_NEUTRAL_FIELDS}
    fields["sources"] = list(fields["sources"])
    fields.update(process_index=process_index, process_count=process_count)
    return fields


def iterator_state(it: grain.DatasetIterator) -> dict[str, Any]:
    """The position of an iterator from `make_iterator` as a JSON-serializable dict (e.g. ``ocp.args.JsonSave``).

    The config and process layout are recorded so `restore_iterator` can refuse a state that would silently
    resume a different stream.

    Raises:
        ValueError: if `it` did not come from `make_iterator` / `restore_iterator`.
    """
    if it not in _FINGERPRINTS:
        raise ValueError("iterator_state needs an iterator made by make_iterator or restore_iterator")
    grain_state = it.get_state()
    # Grain states round-trip through JSON (its own orbax handler stores them so); do it here to guarantee it.
    return {
        "format": STATE_FORMAT,
        "config": _FINGERPRINTS[it],
        "grain": json.loads(json.dumps(grain_state)),
    }


def restore_iterator(
    cfg: DataConfig, state: dict[str, Any] | bytes | str, *, process_index: int = 0, process_count: int = 1
) -> grain.DatasetIterator:
    """A fresh iterator positioned where the one that produced `state` (via `iterator_state`) was.

    Raises:
        ValueError: if `state` is not ours or was saved under a config / process layout that changes the stream.
    """
    if isinstance(state, bytes | str):
        state = json.loads(state)
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise ValueError(f"not an {STATE_FORMAT} iterator state (make it with iterator_state): {str(state)[:200]}")
    want = _fingerprint(cfg, process_index, process_count)
    # A field added after the state was saved reads as its default (states from older versions stay valid).
    defaults = _fingerprint(DataConfig(), process_index, process_count)
    saved = {**defaults, **state["config"]}
    diff = {k: (saved.get(k), v) for k, v in want.items() if saved.get(k) != v}
    if diff:
        details = ", ".join(f"{k}: saved {a!r} vs now {b!r}" for k, (a, b) in sorted(diff.items()))
        raise ValueError(f"iterator state was saved with a different data config / process layout ({details})")
    it = make_iterator(cfg, process_index=process_index, process_count=process_count)
    it.set_state(state["grain"])
    return it
