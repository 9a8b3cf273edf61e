"""Training input pipeline (Grain): sources -> tokenizer -> document packing -> per-process batches.

Typical use::

    cfg = DataConfig(sources=("data/*.jsonl",), tokenizer="path/to/checkpoint", seq_len=4096)
    it = make_iterator(cfg, process_index=jax.process_index(), process_count=jax.process_count())
    batch = next(it)                 # dict of [global_batch_size // process_count, seq_len] numpy arrays
    state = iterator_state(it)       # JSON-serializable; save with the model checkpoint
    it = restore_iterator(cfg, state, process_index=..., process_count=...)

Grain's own orbax integration works too: ``grain.checkpoint.CheckpointSave(it)`` /
``grain.checkpoint.CheckpointRestore(it)`` as an item of ``ocp.args.Composite`` (see tests/test_data.py).
"""

from ernie_jax.data.config import BUILTIN_PYTHON_DOCS, TXT_SPLITS, DataConfig
from ernie_jax.data.pipeline import (
    iterator_state,
    local_batch_size,
    make_dataset,
    make_iterator,
    make_tokenizer,
    restore_iterator,
    skipped_records,
    truncation_counts,
    vocab_size_for,
)
from ernie_jax.data.schema import BATCH_DTYPES, BATCH_KEYS, VL_BATCH_DTYPES, batch_keys, make_batch
from ernie_jax.data.sft import ConversationEncoder
from ernie_jax.data.sources import (
    SUPPORTED_FORMATS,
    BadRecordError,
    DocumentSource,
    expand_sources,
    python_docs_corpus,
)
from ernie_jax.data.tokenizers import ByteTokenizer, SentencePieceTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "BATCH_DTYPES",
    "BATCH_KEYS",
    "VL_BATCH_DTYPES",
    "batch_keys",
    "make_batch",
    "BUILTIN_PYTHON_DOCS",
    "SUPPORTED_FORMATS",
    "TXT_SPLITS",
    "BadRecordError",
    "ByteTokenizer",
    "ConversationEncoder",
    "DataConfig",
    "DocumentSource",
    "SentencePieceTokenizer",
    "Tokenizer",
    "expand_sources",
    "iterator_state",
    "load_tokenizer",
    "local_batch_size",
    "make_dataset",
    "make_iterator",
    "make_tokenizer",
    "python_docs_corpus",
    "restore_iterator",
    "skipped_records",
    "truncation_counts",
    "vocab_size_for",
]
