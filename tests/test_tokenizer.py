"""ernie_jax.tokenizer against transformers' AutoTokenizer, both reading the released ERNIE 4.5 tokenizer files."""

from __future__ import annotations

import json
import os
import pickle
import random
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import given, settings
from hypothesis import strategies as st

from ernie_jax.tokenizer import Tokenizer


def find_tokenizer_dir() -> Path:
    """$ERNIE_TOKENIZER_DIR, else ../shared/data/ERNIE-4.5-0.3B-Base beside the repository root.

    The files are read in place: they are Baidu's, and are never copied into this repository.
    """
    repo_root = Path(__file__).resolve().parents[1]
    default = repo_root.parent / "shared" / "data" / "ERNIE-4.5-0.3B-Base"
    return Path(os.environ.get("ERNIE_TOKENIZER_DIR", default))


TOKENIZER_DIR = find_tokenizer_dir()


def require_tokenizer_files() -> None:
    if not (TOKENIZER_DIR / "tokenizer.model").is_file():
        pytest.skip(f"no ERNIE 4.5 tokenizer files at {TOKENIZER_DIR} (ERNIE_TOKENIZER_DIR may name a checkpoint dir)")


@pytest.fixture(scope="module")
def ours() -> Tokenizer:
    require_tokenizer_files()
    return Tokenizer.from_pretrained(TOKENIZER_DIR)


@pytest.fixture(scope="module")
def sentencepiece_model() -> spm.SentencePieceProcessor:
    require_tokenizer_files()
    return spm.SentencePieceProcessor(model_file=str(TOKENIZER_DIR / "tokenizer.model"))


@pytest.fixture(scope="module")
def reference():
    require_tokenizer_files()
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(TOKENIZER_DIR)


TEXTS = {
    "english": "Hello, world! The quick brown fox jumps over the lazy dog.",
    "chinese": "文心大模型是百度发布的基础模型，支持中文和英文。",
    "emoji": "I ❤️ 🦀 and 👩🏽‍💻! 🇨🇳🎉",
    "code": "def add(a, b):\n    return a + b\n\nclass A:\n\tdef f(self):\n\t\treturn {'x': [1,  2,   3]}\n",
    "leading_trailing_spaces": "   padded on both sides   ",
    "newlines": "\n\nline one\r\nline two\n\n\n",
    "only_whitespace": " \t \n  ",
    "empty": "",
    "digits": "3.14159, 2026-01-31 and 1,000,000",
    "special_inline": "<|begin_of_sentence|>User: hi\nAssistant: hello<|end_of_sentence|>",
    "special_between_spaces": "a <s> b</s>c <unk>  <mask:1>\n<|end_of_sentence|> x",
    "added_inline": "box <|LOC_0|><|LOC_1000|> <|IMAGE_PLACEHOLDER|>x<|LOC_BEGIN|>",
    "pieces_not_added_tokens": "<|prefixoftext|> <mask:2> <0x0A>",
    "whole_piece_chunk": " AssemblyFileVersion",
    "byte_fallback": "𠀀𪚥 \x00\x7f\u200b",
    "escaped_space_literal": "▁ ▁▁x",
    "combining_and_ligatures": "e\u0301 ﬁ Å Ω",
}


def test_released_facts(ours, reference):
    """No BOS by default, specials and added tokens at the released ids, vocabulary size as len(tokenizer)."""
    assert ours.encode("Hello, world!") == reference.encode("Hello, world!") == [16276, 93938, 3135, 94018]
    assert ours.token_to_id("<|begin_of_sentence|>") == 100273 and ours.token_to_id("<|end_of_sentence|>") == 100272
    assert ours.token_to_id("<|IMAGE_PLACEHOLDER|>") == 100295 and ours.token_to_id("<|IMAGE_SEP|>") == 101303
    assert ours.vocab_size == len(ours) == len(reference) == 101304
    for name in ("bos", "eos", "pad", "unk"):
        assert getattr(ours, f"{name}_token") == getattr(reference, f"{name}_token")
        assert getattr(ours, f"{name}_token_id") == getattr(reference, f"{name}_token_id")
    assert (ours.bos_token_id, ours.eos_token_id, ours.pad_token_id) == (1, 2, 0)
    assert ours.special_tokens == reference.special_tokens_map
    assert ours.chat_template == reference.chat_template


def test_added_tokens_match_transformers(ours, reference):
    """Same ids, contents and flags: only the 10 named/control tokens are special, added_tokens.json's are not."""
    mine = {(t.id, t.content, t.special, t.normalized) for t in ours.added_tokens}
    theirs = {(i, t.content, t.special, t.normalized) for i, t in reference.added_tokens_decoder.items()}
    assert mine == theirs
    assert {t.content for t in ours.added_tokens if t.special} == set(reference.all_special_tokens)


@pytest.mark.parametrize("name", TEXTS)
def test_encode_and_decode_match_transformers(ours, reference, name):
    text = TEXTS[name]
    ids = reference.encode(text)
    assert ours.encode(text) == ids
    assert ours.encode(text, add_special_tokens=False) == reference.encode(text, add_special_tokens=False)
    for skip in (False, True):
        assert ours.decode(ids, skip_special_tokens=skip) == reference.decode(ids, skip_special_tokens=skip)


def test_whole_tokens_where_sentencepiece_splits(ours, sentencepiece_model):
    """Added tokens and whole-piece chunks are single ids; raw SentencePiece splits both."""
    assert ours.encode("<|begin_of_sentence|>") == [100273]
    assert len(sentencepiece_model.encode("<|begin_of_sentence|>")) > 1
    assert ours.encode(" AssemblyFileVersion") == [ours.token_to_id("▁AssemblyFileVersion")]
    assert len(sentencepiece_model.encode(" AssemblyFileVersion")) == 3


@pytest.mark.parametrize(
    "ids",
    [
        [241, 197, 186],  # <0xE4><0xB8><0xAD>: "中"
        [241, 100273, 197, 186],  # a byte run cut by a special token: U+FFFD per byte, unless the special is skipped
        [241, 100297, 197, 186],  # ... and by a non-special added token, which skip_special_tokens keeps
        [241, 197],  # an incomplete sequence
        [999_999, 5, 200_000, -1],  # unknown ids are dropped
        [1, 2, 0, 100272, 100273, 100274, 100277, 100297, 101303],
        [23, 23, 269, 93919],  # newlines and "▁" pieces
    ],
)
def test_decode_edge_cases_match_transformers(ours, reference, ids):
    for skip in (False, True):
        expected = reference.decode([i for i in ids if i >= 0], skip_special_tokens=skip)
        assert ours.decode(ids, skip_special_tokens=skip) == expected


CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "What is the capital of France?"}],
    "system_multi_turn": [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "写一首关于秋天的诗。"},
    ],
    "no_system_multi_turn": [
        {"role": "user", "content": "def f(x):\n    return x"},
        {"role": "assistant", "content": "  It returns x.\n"},
        {"role": "user", "content": "And <|end_of_sentence|> inside? 🤔", "name": None},
    ],
}


@pytest.mark.parametrize("add_generation_prompt", [False, True])
@pytest.mark.parametrize("name", CONVERSATIONS)
def test_chat_template_matches_transformers(ours, reference, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    expected_text = reference.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    expected_ids = reference.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, return_dict=False
    )
    assert ours.render_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected_text
    assert ours.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected_ids
    assert ours.decode(expected_ids) == expected_text
    assert expected_ids[0] == 100273


@settings(max_examples=300, deadline=None, database=None)
@given(text=st.text(max_size=60))
def test_random_unicode_matches_transformers(ours, reference, text):
    ids = reference.encode(text)
    assert ours.encode(text) == ids
    assert ours.decode(ids) == reference.decode(ids)


def test_many_mixed_strings_match_transformers(ours, reference, sentencepiece_model):
    """Strings built from the parts that matter: pieces, added tokens, whitespace runs, digits, CJK, emoji, bytes."""
    rng = random.Random(0)
    pieces = [sentencepiece_model.id_to_piece(i).replace("▁", " ") for i in range(0, 100_295, 7)]
    added = [t.content for t in ours.added_tokens]
    fragments = [
        " ",
        "  ",
        "\t",
        "\n",
        "\n\n",
        "\r\n",
        "▁",
        "7",
        "42",
        "你好",
        "😀",
        "👩‍💻",
        "<",
        "|>",
        "𠀀",
        "\x00",
        "é",
    ]
    texts = []
    for _ in range(1500):
        parts = []
        for _ in range(rng.randint(1, 10)):
            kind = rng.random()
            if kind < 0.35:
                parts.append(rng.choice(fragments))
            elif kind < 0.7:
                parts.append(rng.choice(pieces))
            elif kind < 0.8:
                parts.append(rng.choice(added))
            else:
                parts.append(
                    "".join(chr(rng.choice([rng.randint(32, 0x3000), rng.randint(0xE000, 0x1FAFF)])) for _ in "ab")
                )
        texts.append("".join(parts))
    for text in texts:
        ids = reference.encode(text)
        assert ours.encode(text) == ids, text
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True), text


def test_pickle_round_trip(ours):
    """Grain workers get the tokenizer by pickle."""
    restored = pickle.loads(pickle.dumps(ours))
    text = TEXTS["special_inline"] + TEXTS["code"]
    assert restored.encode(text) == ours.encode(text)
    assert restored.apply_chat_template(CONVERSATIONS["single_user"]) == ours.apply_chat_template(
        CONVERSATIONS["single_user"]
    )


def test_added_tokens_decoder_in_config(ours, reference, tmp_path):
    """A config that lists added_tokens_decoder (the non-legacy layout) is read from there, flags included."""
    (tmp_path / "tokenizer.model").symlink_to(TOKENIZER_DIR / "tokenizer.model")
    config = json.loads((TOKENIZER_DIR / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        str(t.id): {"content": t.content, "special": t.special, "normalized": t.normalized} for t in ours.added_tokens
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    from_decoder = Tokenizer.from_pretrained(tmp_path)
    assert from_decoder.added_tokens == ours.added_tokens
    text = TEXTS["added_inline"] + TEXTS["special_between_spaces"]
    assert from_decoder.encode(text) == reference.encode(text)


def test_missing_tokenizer_model_is_one_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="tokenizer.model") as error:
        Tokenizer.from_pretrained(tmp_path)
    assert str(tmp_path) in str(error.value)
    with pytest.raises(FileNotFoundError, match="no-such-dir"):
        Tokenizer.from_pretrained(tmp_path / "no-such-dir")
