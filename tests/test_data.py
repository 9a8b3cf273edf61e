"""Data pipeline: sources, tokenizers, packing invariants, determinism, resume, per-process sharding, errors."""

from __future__ import annotations

import json
import os
import pickle
import re

import grain
import numpy as np
import pytest

from ernie_jax.data import (
    BUILTIN_PYTHON_DOCS,
    ByteTokenizer,
    DataConfig,
    DocumentSource,
    expand_sources,
    iterator_state,
    make_iterator,
    make_tokenizer,
    python_docs_corpus,
    restore_iterator,
    vocab_size_for,
)

BYTES = ByteTokenizer()
KEYS = ("input_ids", "targets", "segment_ids", "positions", "loss_mask")


def _docs(n: int, seed: int = 0) -> list[str]:
    """Documents tagged #i# with varied lengths (some longer than the test rows, so they get split)."""
    rng = np.random.default_rng(seed)
    words = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "mu"]
    return [f"#{i}# " + " ".join(rng.choice(words, size=int(rng.integers(1, 30)))) for i in range(n)]


def _write_jsonl(path, docs, field="text"):
    path.write_text("".join(json.dumps({field: d, "id": i}) + "\n" for i, d in enumerate(docs)))
    return str(path)


def _take(it, n):
    return [next(it) for _ in range(n)]


def _assert_batches_equal(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b, strict=True):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _stream(batches, key="input_ids"):
    """All non-padding tokens of `key` in stream order (rows in batch order)."""
    return np.concatenate([row[seg > 0] for b in batches for row, seg in zip(b[key], b["segment_ids"], strict=True)])


def _check_row_invariants(batch, seq_len, rows):
    for k in KEYS:
        assert batch[k].shape == (rows, seq_len), k
    for k in ("input_ids", "targets", "segment_ids", "positions"):
        assert batch[k].dtype == np.int32, k
    assert batch["loss_mask"].dtype == np.float32
    for ids, tgt, seg, pos, mask in zip(*(batch[k] for k in KEYS), strict=True):
        real = seg > 0
        # Padding only at the end, and it is all zeros.
        n = int(real.sum())
        assert real[:n].all() and not real[n:].any()
        assert (ids[n:] == 0).all() and (tgt[n:] == 0).all() and (pos[n:] == 0).all()
        np.testing.assert_array_equal(mask, real.astype(np.float32))
        # Segments are numbered 1, 2, ... in order; positions restart at 0 for each and count up by one.
        s = seg[:n]
        starts = np.concatenate([[True], s[1:] != s[:-1]]) if n else np.zeros(0, bool)
        np.testing.assert_array_equal(s[starts], np.arange(1, starts.sum() + 1))
        expected_pos = np.arange(n) - np.maximum.accumulate(np.where(starts, np.arange(n), 0))
        np.testing.assert_array_equal(pos[:n], expected_pos)
        # Within a segment the target is the next input: targets never cross a document.
        same = s[1:] == s[:-1]
        np.testing.assert_array_equal(tgt[:n][:-1][same], ids[:n][1:][same])


# ---------------------------------------------------------------------------------------------- config / tokenizers


def test_config_validation_names_fields():
    assert DataConfig(sources="a.jsonl").sources == ("a.jsonl",)
    for field, bad in [
        ("global_batch_size", 0),
        ("seq_len", -1),
        ("num_epochs", 0),
        ("seed", -1),
        ("txt_split", "words"),
        ("worker_count", -1),
        ("sources", ()),
    ]:
        with pytest.raises(ValueError, match=field):
            DataConfig(**{field: bad})


def test_byte_tokenizer():
    cfg = DataConfig()
    tok = make_tokenizer(cfg)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.vocab_size) == (0, 1, 2, 259) == (0, 1, 2, vocab_size_for(cfg))
    text = "héllo, ERNIE 文心"
    ids = tok.encode(text)
    assert ids[:2] == [ord("h") + 3, 0xC3 + 3] and max(ids) < 259 and min(ids) >= 3
    assert tok.decode([tok.bos_id, *ids, tok.eos_id, tok.pad_id]) == text


def test_sentencepiece_tokenizer_from_checkpoint_dir(tmp_path):
    spm = pytest.importorskip("sentencepiece")
    corpus = tmp_path / "corpus.txt"
    docs = python_docs_corpus()
    corpus.write_text("\n".join(docs[:20]))
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    spm.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(ckpt / "tokenizer"),
        vocab_size=300,
        model_type="bpe",
        pad_id=0,
        bos_id=1,
        eos_id=2,
        unk_id=3,
        minloglevel=2,
        num_threads=1,
    )
    for spec in (str(ckpt), str(ckpt / "tokenizer.model")):
        cfg = DataConfig(tokenizer=spec, seq_len=64, global_batch_size=2)
        tok = make_tokenizer(cfg)
        assert (tok.vocab_size, tok.pad_id, tok.bos_id, tok.eos_id) == (300, 0, 1, 2) == (vocab_size_for(cfg), 0, 1, 2)
    text = "The return statement leaves the current function call."
    ids = tok.encode(text)
    assert len(ids) < len(text) and tok.decode(ids) == text
    # Grain workers get the tokenizer by pickle: it must come back working.
    assert pickle.loads(pickle.dumps(tok)).encode(text) == ids
    batch = next(make_iterator(cfg))
    _check_row_invariants(batch, 64, 2)
    assert batch["input_ids"].max() < 300
    # SentencePiece normalises whitespace (newlines become spaces), so compare whitespace-collapsed text.
    first = " ".join(tok.decode(batch["input_ids"][0][batch["segment_ids"][0] == 1]).split())
    assert any(first in " ".join(d.split()) for d in docs), first


REAL_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ERNIE-4.5-0.3B-Base")


@pytest.mark.skipif(not os.path.isdir(REAL_TOKENIZER), reason="the real ERNIE tokenizer files are not in ../shared")
def test_a_checkpoint_directory_gets_the_ernie_tokenizer():
    cfg = DataConfig(tokenizer=REAL_TOKENIZER, seq_len=64, global_batch_size=2)
    tok = make_tokenizer(cfg)
    assert vocab_size_for(cfg) == 101304 and (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert tok.encode("<|begin_of_sentence|>User: hi") == [100273, *tok.encode("User: hi")]
    batch = next(make_iterator(cfg))
    _check_row_invariants(batch, 64, 2)


def test_sentencepiece_missing_model_names_path(tmp_path):
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "tokenizer.model"))):
        make_tokenizer(DataConfig(tokenizer=str(tmp_path)))


# ------------------------------------------------------------------------------------------- default corpus / packing


def test_builtin_corpus_default_config():
    cfg = DataConfig()
    assert cfg.sources == (BUILTIN_PYTHON_DOCS,)
    docs = DocumentSource(expand_sources(cfg.sources))
    assert len(docs) > 50 and sum(map(len, docs)) > 300_000  # Enough English for a few hundred small-model steps.
    batch = next(make_iterator(cfg))
    _check_row_invariants(batch, cfg.seq_len, cfg.global_batch_size)
    text = BYTES.decode(batch["input_ids"][0])
    assert text.count(" the ") >= 2, text


def test_packing_reconstructs_documents_exactly(tmp_path):
    docs = _docs(40)
    cfg = DataConfig(
        sources=(_write_jsonl(tmp_path / "d.jsonl", docs),),
        seq_len=32,
        global_batch_size=1,
        shuffle=False,
        num_epochs=1,
    )
    batches = list(make_iterator(cfg))
    for b in batches:
        _check_row_invariants(b, 32, 1)
    assert max(b["segment_ids"].max() for b in batches) > 1  # Several documents share rows.
    tokens = [BYTES.encode_array(d).tolist() + [BYTES.eos_id] for d in docs]
    assert max(map(len, tokens)) > 32  # ... and some are split across rows.
    # In order, inputs are every document minus its last token and targets every document minus its first.
    np.testing.assert_array_equal(_stream(batches), np.concatenate([t[:-1] for t in tokens]))
    np.testing.assert_array_equal(_stream(batches, "targets"), np.concatenate([t[1:] for t in tokens]))
    assert int(sum(b["loss_mask"].sum() for b in batches)) == sum(len(t) - 1 for t in tokens)


def test_add_bos_and_no_eos(tmp_path):
    src = _write_jsonl(tmp_path / "d.jsonl", ["ab", "cde"])
    cfg = DataConfig(
        sources=(src,), seq_len=8, global_batch_size=1, shuffle=False, num_epochs=1, add_bos=True, add_eos=False
    )
    (b,) = list(make_iterator(cfg))
    a, bb, c, d, e = (x + 3 for x in b"abcde")
    np.testing.assert_array_equal(b["input_ids"][0], [1, a, 1, c, d, 0, 0, 0])
    np.testing.assert_array_equal(b["targets"][0], [a, bb, c, d, e, 0, 0, 0])
    np.testing.assert_array_equal(b["segment_ids"][0], [1, 1, 2, 2, 2, 0, 0, 0])
    np.testing.assert_array_equal(b["positions"][0], [0, 1, 0, 1, 2, 0, 0, 0])


# ------------------------------------------------------------------------------------------------ determinism / resume


def test_deterministic_given_seed():
    cfg = DataConfig(seq_len=64, global_batch_size=4, seed=3)
    _assert_batches_equal(_take(make_iterator(cfg), 4), _take(make_iterator(cfg), 4))
    ours, other = _take(make_iterator(cfg), 4), _take(make_iterator(cfg.replace(seed=4)), 4)
    assert any((x["input_ids"] != y["input_ids"]).any() for x, y in zip(ours, other, strict=True))


@pytest.mark.parametrize("small_corpus", [False, True], ids=["builtin", "multi-epoch"])
def test_resume_from_state_is_exact(tmp_path, small_corpus):
    cfg = DataConfig(seq_len=48, global_batch_size=2, seed=7)
    if small_corpus:  # 12 short documents: k + m batches run through several epochs (and reshuffles).
        cfg = cfg.replace(sources=(_write_jsonl(tmp_path / "d.jsonl", _docs(12)),))
    k, m = 5, 7
    it = make_iterator(cfg)
    _take(it, k)
    state = iterator_state(it)
    raw_state = it.get_state()
    expected = _take(it, m)
    _assert_batches_equal(_take(restore_iterator(cfg, json.loads(json.dumps(state))), m), expected)
    _assert_batches_equal(_take(restore_iterator(cfg, json.dumps(state).encode()), m), expected)
    fresh = make_iterator(cfg)
    fresh.set_state(raw_state)
    _assert_batches_equal(_take(fresh, m), expected)


def test_restore_refuses_state_from_other_config():
    cfg = DataConfig(seq_len=32, global_batch_size=2)
    it = make_iterator(cfg)
    next(it)
    state = iterator_state(it)
    with pytest.raises(ValueError, match="seed"):
        restore_iterator(cfg.replace(seed=1), state)
    with pytest.raises(ValueError, match="process_count"):
        restore_iterator(cfg, state, process_index=0, process_count=2)
    with pytest.raises(ValueError, match="iterator_state"):
        restore_iterator(cfg, it.get_state())


def test_iterator_state_through_orbax_checkpoint_manager(tmp_path):
    ocp = pytest.importorskip("orbax.checkpoint")
    cfg = DataConfig(seq_len=32, global_batch_size=2, seed=1)
    it = make_iterator(cfg)
    _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data", "grain")) as mngr:
        mngr.save(
            3,
            args=ocp.args.Composite(
                data=ocp.args.JsonSave(iterator_state(it)), grain=grain.checkpoint.CheckpointSave(it)
            ),
        )
        mngr.wait_until_finished()
    expected = _take(it, 3)
    with ocp.CheckpointManager(tmp_path / "ckpt", item_names=("data", "grain")) as mngr:
        fresh = make_iterator(cfg)
        restored = mngr.restore(
            3, args=ocp.args.Composite(data=ocp.args.JsonRestore(), grain=grain.checkpoint.CheckpointRestore(fresh))
        )
    _assert_batches_equal(_take(restore_iterator(cfg, restored["data"]), 3), expected)
    _assert_batches_equal(_take(fresh, 3), expected)  # Grain's handler restored `fresh` in place.


# ---------------------------------------------------------------------------------------------------------- formats


def test_source_formats(tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa
    from array_record.python.array_record_module import ArrayRecordWriter

    docs = _docs(9)
    paths = {"jsonl": _write_jsonl(tmp_path / "a.jsonl", docs, field="body")}
    (tmp_path / "b.txt").write_text("\n\n  \n".join(docs) + "\n")
    pq.write_table(pa.table({"body": docs, "n": list(range(9))}), tmp_path / "c.parquet", row_group_size=4)
    writer = ArrayRecordWriter(str(tmp_path / "d.array_record-00000-of-00001"), "group_size:1")
    for i, d in enumerate(docs):  # Mixed records: JSON objects and raw UTF-8 text.
        writer.write(json.dumps({"body": d}).encode() if i % 2 else d.encode())
    writer.close()
    for name in ("b.txt", "c.parquet", "d.array_record-00000-of-00001"):
        paths[name.split(".")[1].split("-")[0]] = str(tmp_path / name)
    for kind, path in paths.items():
        src = DocumentSource(expand_sources([path]), text_field="body")
        assert [src[i] for i in range(len(src))] == docs, kind
        cfg = DataConfig(
            sources=(path,), text_field="body", seq_len=16, global_batch_size=2, shuffle=False, num_epochs=1
        )
        batches = list(make_iterator(cfg))
        assert len(batches) >= 3, kind
        assert BYTES.decode(_stream(batches)).startswith(docs[0] + docs[1][:-1]), kind
    # A glob over all four files reads each once, in sorted path order.
    assert len(DocumentSource(expand_sources([str(tmp_path / "*")]), text_field="body")) == 4 * len(docs)


@pytest.mark.parametrize(
    ("split", "expected"),
    [
        ("blank_line", ["one\ntwo", "three", "four"]),
        ("line", ["one", "two", "three", "four"]),
        ("file", ["one\ntwo\n\nthree\n \n\nfour"]),
    ],
)
def test_txt_splits(tmp_path, split, expected):
    (tmp_path / "t.txt").write_text("\none\ntwo\n\nthree\n \n\nfour\n")
    src = DocumentSource([str(tmp_path / "t.txt")], txt_split=split)
    assert [src[i] for i in range(len(src))] == expected


# ---------------------------------------------------------------------------------------------------- multi-process


def test_two_processes_read_disjoint_halves(tmp_path):
    docs = _docs(30)
    cfg = DataConfig(
        sources=(_write_jsonl(tmp_path / "d.jsonl", docs),), seq_len=24, global_batch_size=2, num_epochs=1, seed=5
    )
    seen = []
    for p in range(2):
        batches = list(make_iterator(cfg, process_index=p, process_count=2))
        for b in batches:
            _check_row_invariants(b, 24, 1)  # Half the global batch each.
        seen.append([int(x) for x in re.findall(r"#(\d+)#", BYTES.decode(_stream(batches)))])
    assert set(seen[0]).isdisjoint(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(30))
    assert len(seen[0]) == len(seen[1]) == 15


def test_worker_process_matches_in_process_and_resumes():
    cfg = DataConfig(seq_len=32, global_batch_size=2, seed=2)
    expected = _take(make_iterator(cfg), 5)
    it = make_iterator(cfg.replace(worker_count=1))
    _assert_batches_equal(_take(it, 2), expected[:2])
    state = iterator_state(it)
    _assert_batches_equal(_take(restore_iterator(cfg.replace(worker_count=1), state), 3), expected[2:])


# ----------------------------------------------------------------------------------------------------------- errors


def test_errors_are_clear(tmp_path):
    missing = str(tmp_path / "nope.jsonl")
    with pytest.raises(FileNotFoundError, match=re.escape(missing)):
        make_iterator(DataConfig(sources=(missing,)))
    with pytest.raises(FileNotFoundError, match="matched no files"):
        make_iterator(DataConfig(sources=(str(tmp_path / "*.jsonl"),)))
    with pytest.raises(ValueError, match="global_batch_size"):
        make_iterator(DataConfig(global_batch_size=3), process_index=0, process_count=2)
    odd = tmp_path / "data.csv"
    odd.write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"\.jsonl.*\.txt.*\.parquet.*\.array_record"):
        make_iterator(DataConfig(sources=(str(odd),)))
    src = _write_jsonl(tmp_path / "d.jsonl", ["x"], field="content")
    with pytest.raises(ValueError, match="'text'.*found"):
        make_iterator(DataConfig(sources=(src,)))
    with pytest.raises(ValueError, match="process_index"):
        make_iterator(DataConfig(), process_index=2, process_count=2)
    with pytest.raises(ValueError, match="builtin"):
        make_iterator(DataConfig(sources=("builtin:wikipedia",)))
