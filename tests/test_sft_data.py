"""data.format=sft: conversations rendered with the real ERNIE chat template, loss on replies only, packed whole."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from ernie_jax.data import (
    BadRecordError,
    ConversationEncoder,
    DataConfig,
    iterator_state,
    make_iterator,
    restore_iterator,
    truncation_counts,
)
from ernie_jax.data.sources import JsonRecord

REAL = os.environ.get(
    "ERNIE_TOKENIZER_DIR",
    os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ERNIE-4.5-0.3B-Base"),
)
pytestmark = pytest.mark.skipif(not os.path.isdir(REAL), reason=f"no ERNIE 4.5 tokenizer files at {REAL}")
END, EOS, BEGIN = 100272, 2, 100273


@pytest.fixture(scope="module")
def tokenizer():
    from ernie_jax.tokenizer import Tokenizer

    return Tokenizer.from_pretrained(REAL)


def encode(tokenizer, row: dict, seq_len: int = 256):
    return ConversationEncoder(tokenizer, seq_len)(JsonRecord(row, "conv.jsonl:1"))


def test_a_conversation_is_the_prompt_then_the_reply_with_loss_on_the_reply_only(tokenizer):
    out = encode(tokenizer, {"system": "Be brief.", "src": ["hi"], "tgt": ["hello there"]})
    prompt = tokenizer.encode("<|begin_of_sentence|>Be brief.\nUser: hi\nAssistant: ", add_special_tokens=False)
    reply = tokenizer.encode("hello there", add_special_tokens=False)
    ids = [*prompt, *reply, END]
    assert out["input_ids"].tolist() == ids[:-1]
    # Targets are the next tokens, except that the reply's end token is learned as EOS (</s>, id 2).
    assert out["targets"].tolist() == [*ids[1:-1], EOS]
    # The loss covers exactly the reply tokens and the end-of-reply target.
    expected_mask = [0] * (len(prompt) - 1) + [1] * (len(reply) + 1)
    assert out["loss_mask"].tolist() == expected_mask


def test_turns_labelled_0_are_context_and_both_row_forms_agree(tokenizer):
    erniekit = {"src": ["a?", "b?"], "tgt": ["first", "second"], "label": [0, 1]}
    openai = {
        "messages": [
            {"role": "user", "content": "a?"},
            {"role": "assistant", "content": "first", "label": 0},
            {"role": "user", "content": "b?"},
            {"role": "assistant", "content": "second"},
        ]
    }
    a, b = encode(tokenizer, erniekit), encode(tokenizer, openai)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    learned = a["targets"][a["loss_mask"] > 0].tolist()
    assert learned == [*tokenizer.encode("second", add_special_tokens=False), EOS]
    both = encode(tokenizer, {**erniekit, "label": [1, 1]})
    assert both["loss_mask"].sum() == len(tokenizer.encode("first", add_special_tokens=False)) + 1 + len(learned)


@pytest.mark.parametrize(
    "row, says",
    [
        ({"src": ["q"], "tgt": ["a", "b"]}, "same, non-zero length"),
        ({"src": ["q"], "tgt": ["   "]}, "empty assistant reply"),
        ({"messages": [{"role": "assistant", "content": "x"}]}, "roles out of order"),
        ({"messages": [{"role": "user", "content": "x"}]}, "must end with an assistant reply"),
        ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0] must be"),
        ({"text": "plain"}, "needs 'messages', or 'src' and 'tgt'"),
        ({"src": ["q"], "tgt": ["a"], "label": [0]}, "nothing to learn from"),
    ],
)
def test_bad_conversations_name_the_row(tokenizer, row, says):
    with pytest.raises(BadRecordError, match=rf"conv\.jsonl:1: .*{__import__('re').escape(says)}"):
        encode(tokenizer, row)


def test_long_conversations_keep_their_end_or_are_dropped(tokenizer):
    long_context = {"src": ["word " * 200, "ok?"], "tgt": ["sure", "fine"], "label": [0, 1]}
    encoder = ConversationEncoder(tokenizer, 32)
    out = encoder(JsonRecord(long_context, "c:1"))
    assert len(out["input_ids"]) == 32 and out["input_ids"][0] == BEGIN
    assert out["targets"][out["loss_mask"] > 0].tolist() == [*tokenizer.encode("fine", add_special_tokens=False), EOS]
    long_reply_first = {"src": ["ok?", "word " * 200], "tgt": ["fine", "x"], "label": [1, 0]}
    assert encoder(JsonRecord(long_reply_first, "c:2")) is None  # the only supervised turn was cut away
    assert (encoder.cut, encoder.dropped) == (1, 1)


def _write(path, rows):
    with open(path, "w") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row)) + "\n")
    return str(path)


def _rows(n):
    return [{"src": [f"What is {i} + {i}?"], "tgt": [f"It is {2 * i}."]} for i in range(n)]


def test_pipeline_packs_whole_conversations_and_resumes(tmp_path):
    src = _write(tmp_path / "c.jsonl", _rows(40))
    cfg = DataConfig(sources=(src,), tokenizer=REAL, format="sft", seq_len=64, global_batch_size=2, seed=3)
    it = make_iterator(cfg)
    batches = [next(it) for _ in range(3)]
    for batch in batches:
        seg, mask = batch["segment_ids"], batch["loss_mask"]
        for row in range(seg.shape[0]):
            assert mask[row].sum() > 0, "a row without a supervised token"
            assert seg[row].max() >= 2, "conversations are packed several to a row"
            for s in range(1, seg[row].max() + 1):  # each conversation starts at position 0 with its begin token
                first = np.flatnonzero(seg[row] == s)[0]
                assert batch["positions"][row, first] == 0 and batch["input_ids"][row, first] == BEGIN
        assert ((mask > 0) <= (seg > 0)).all()
    state = iterator_state(it)
    following = next(it)
    again = next(restore_iterator(cfg, state))
    for key in following:
        np.testing.assert_array_equal(following[key], again[key])
    assert truncation_counts(it) == {"cut": 0, "dropped": 0}


def test_pipeline_bad_rows_stop_with_file_and_line_or_are_skipped(tmp_path):
    src = _write(tmp_path / "c.jsonl", [*_rows(5), {"src": ["q"], "tgt": [""]}, *_rows(5)])
    cfg = DataConfig(sources=(src,), tokenizer=REAL, format="sft", seq_len=64, global_batch_size=1, shuffle=False)
    with pytest.raises(BadRecordError, match=r"c\.jsonl:6: turn 1: empty assistant reply"):
        list(make_iterator(cfg.replace(num_epochs=1)))
    rows = list(make_iterator(cfg.replace(num_epochs=1, on_bad_record="skip")))
    assert sum(int(r["segment_ids"].max()) for r in rows) == 10


def test_sft_needs_a_checkpoint_tokenizer(tmp_path):
    src = _write(tmp_path / "c.jsonl", _rows(2))
    with pytest.raises(ValueError, match="data.format=sft renders conversations"):
        make_iterator(DataConfig(sources=(src,), tokenizer="bytes", format="sft"))
