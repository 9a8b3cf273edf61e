"""ERNIE 4.5's tokenizer, read from a checkpoint directory: the same ids and text as transformers 5.x's AutoTokenizer.

transformers converts ``tokenizer.model`` into a `TokenizersBackend`, which this module reproduces:
- Added tokens are cut out first, whole, leftmost and longest first: special ones (the config's ``*_token`` entries,
  SentencePiece's control pieces) in the raw text, the others (added_tokens.json) after spaces become "▁". Whitespace
  beside them stays and is tokenized with the text around it.
- The rest is cut around user-defined pieces (ERNIE's digits). A chunk that is a whole vocabulary piece becomes that
  piece (the converted BPE's ``ignore_merges``; SentencePiece itself splits, e.g., "▁AssemblyFileVersion" in three);
  SentencePiece encodes the other chunks.
- BOS/EOS only where tokenizer_config.json sets ``add_bos_token``/``add_eos_token`` (ERNIE's does not).
- Decoding drops unknown ids, turns "▁" into spaces and fuses byte pieces (``<0xE4>``) into UTF-8, with one U+FFFD per
  byte of an invalid run. No clean-up of spaces: transformers skips it for BPE backends.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import sentencepiece as spm

SPACE = "▁"  # SentencePiece's escaped space
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_USER_DEFINED = 4  # a SentencePiece piece type (sentencepiece_model.proto)


@dataclass(frozen=True)
class AddedToken:
    content: str
    id: int
    special: bool  # dropped by decode(skip_special_tokens=True)
    normalized: bool  # matched in the text after spaces become "▁", not in the raw text


class Tokenizer:
    """Encode, decode and chat-format text for ERNIE 4.5. Build it with `Tokenizer.from_pretrained(directory)`."""

    def __init__(
        self,
        model_proto: bytes,
        added_tokens: list[AddedToken],
        special_tokens: dict[str, str],
        chat_template: str | None = None,
        add_bos_token: bool = False,
        add_eos_token: bool = False,
    ):
        self._model_proto = model_proto
        self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        self.added_tokens = list(added_tokens)
        self.special_tokens = dict(special_tokens)  # e.g. {"bos_token": "<s>", "cls_token": "<|begin_of_sentence|>"}
        self.chat_template = chat_template
        self.add_bos_token, self.add_eos_token = add_bos_token, add_eos_token

        self._piece_ids = {self._sp.id_to_piece(i): i for i in range(self._sp.get_piece_size())}
        self._added_by_id = {token.id: token for token in self.added_tokens}
        self._added_by_content = {token.content: token for token in self.added_tokens}
        self._special_contents = {token.content for token in self.added_tokens if token.special}
        self._size = len(self._piece_ids.keys() | self._added_by_content.keys())
        raw = {t.content: t for t in self.added_tokens if not t.normalized}
        normalized = {t.content.replace(" ", SPACE): t for t in self.added_tokens if t.normalized}
        self._raw_added, self._raw_pattern = raw, _alternation(raw)
        self._normalized_added, self._normalized_pattern = normalized, _alternation(normalized)
        types = _piece_types(model_proto)
        user_defined = [self._sp.id_to_piece(i) for i, kind in enumerate(types) if kind == _USER_DEFINED]
        self._user_defined_pattern = _alternation(user_defined, capture=True)
        # transformers' converted BPE takes a chunk that is a whole piece as is (ignore_merges) only in this case
        self._whole_pieces = self._piece_ids if user_defined else {}
        self._template = None

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Tokenizer:
        """Read tokenizer.model, tokenizer_config.json, special_tokens_map.json, added_tokens.json of `directory`."""
        directory = Path(directory)
        model_file = directory / "tokenizer.model"
        if not model_file.is_file():
            raise FileNotFoundError(
                f"{directory}: no tokenizer.model there. An ERNIE 4.5 checkpoint directory holds its SentencePiece "
                "model under that name (with tokenizer_config.json and added_tokens.json beside it)."
            )
        model_proto = model_file.read_bytes()
        _check_supported(model_proto, model_file)
        config = _read_json(directory / "tokenizer_config.json")
        named, added = _read_added_tokens(directory, config, spm.SentencePieceProcessor(model_proto=model_proto))
        template_file = directory / "chat_template.jinja"  # transformers prefers this file to the config's entry
        template = template_file.read_text(encoding="utf-8") if template_file.is_file() else config.get("chat_template")
        if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
            template = {entry["name"]: entry["template"] for entry in template}.get("default")
        add_bos, add_eos = bool(config.get("add_bos_token")), bool(config.get("add_eos_token"))
        return cls(model_proto, added, named, template, add_bos_token=add_bos, add_eos_token=add_eos)

    # ---- encoding

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; added tokens written in it are matched whole. BOS/EOS only if the config asks."""
        ids = [self.bos_token_id] if add_special_tokens and self.add_bos_token else []
        for raw_text, raw_token in _split(text, self._raw_pattern, self._raw_added):
            if raw_token is not None:
                ids.append(raw_token.id)
                continue
            normalized_text = raw_text.replace(" ", SPACE)
            for chunk, token in _split(normalized_text, self._normalized_pattern, self._normalized_added):
                ids.extend([token.id] if token is not None else self._encode_plain(chunk))
        if add_special_tokens and self.add_eos_token:
            ids.append(self.eos_token_id)
        return ids

    def _encode_plain(self, text: str) -> list[int]:
        """Text without added tokens, spaces already "▁": SentencePiece per chunk between user-defined pieces."""
        chunks = self._user_defined_pattern.split(text) if self._user_defined_pattern else [text]
        ids = []
        for chunk in filter(None, chunks):
            piece_id = self._whole_pieces.get(chunk)
            ids.extend([piece_id] if piece_id is not None else self._sp.encode(chunk))
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        """Text of `ids` (any iterable of ints); unknown ids are dropped, as transformers does."""
        pieces = []
        for token_id in map(int, ids):
            added = self._added_by_id.get(token_id)
            if added is not None:
                piece = added.content
            elif 0 <= token_id < self._sp.get_piece_size():
                piece = self._sp.id_to_piece(token_id)
            else:
                continue
            if not (skip_special_tokens and piece in self._special_contents):
                pieces.append(piece)
        return _join_pieces(pieces)

    # ---- chat

    def render_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> str:
        """The checkpoint's own jinja chat template applied to `messages`, as text (transformers' tokenize=False)."""
        if self.chat_template is None:
            raise ValueError("no chat_template: tokenizer_config.json and chat_template.jinja give none")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        # transformers drops keys whose value is None: templates test for a missing key, not for None
        messages = [{key: value for key, value in message.items() if value is not None} for message in messages]
        context = {**self.special_tokens, **kwargs}
        return self._template.render(
            messages=messages, tools=None, documents=None, add_generation_prompt=add_generation_prompt, **context
        )

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = False, **kwargs) -> list[int]:
        """Token ids of the rendered chat; the template writes its own special tokens, so none are added."""
        text = self.render_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    # ---- vocabulary

    def token_to_id(self, token: str | None) -> int | None:
        """Id of an added token or a vocabulary piece, or None."""
        added = self._added_by_content.get(token)
        return added.id if added is not None else self._piece_ids.get(token)

    @property
    def vocab_size(self) -> int:
        """Pieces plus added tokens, like len(tokenizer) in transformers (whose .vocab_size counts pieces only)."""
        return self._size

    def __len__(self) -> int:
        return self.vocab_size

    bos_token = property(lambda self: self.special_tokens.get("bos_token"))
    eos_token = property(lambda self: self.special_tokens.get("eos_token"))
    pad_token = property(lambda self: self.special_tokens.get("pad_token"))
    unk_token = property(lambda self: self.special_tokens.get("unk_token"))
    bos_token_id = property(lambda self: self.token_to_id(self.bos_token))
    eos_token_id = property(lambda self: self.token_to_id(self.eos_token))
    pad_token_id = property(lambda self: self.token_to_id(self.pad_token))
    unk_token_id = property(lambda self: self.token_to_id(self.unk_token))
    # the names of the data pipeline's Tokenizer protocol (ernie_jax.data.tokenizers)
    bos_id, eos_id, pad_id = bos_token_id, eos_token_id, pad_token_id

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.int32)

    # Grain workers receive the tokenizer by pickle: the SentencePiece processor is rebuilt from the model bytes.
    def __getstate__(self):
        return {key: value for key, value in self.__dict__.items() if key not in ("_sp", "_template")}

    def __setstate__(self, state):
        self.__dict__.update(state, _sp=spm.SentencePieceProcessor(model_proto=state["_model_proto"]), _template=None)

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, added_tokens={len(self.added_tokens)})"


def _read_added_tokens(directory: Path, config: dict, sp) -> tuple[dict[str, str], list[AddedToken]]:
    """The named special tokens and every added token, with the ids and flags transformers gives them."""
    # Named tokens: the config's *_token entries, which special_tokens_map.json overrides in transformers' legacy path
    # (no added_tokens_decoder). That file's additional_special_tokens list is not used: transformers replaces it
    # with SentencePiece's control pieces, so the 1,009 tokens of added_tokens.json are not special.
    named = _named_tokens(config)
    if "added_tokens_decoder" not in config:
        named.update(_named_tokens(_read_json(directory / "special_tokens_map.json")))
    for name, piece_id in (("bos_token", sp.bos_id()), ("eos_token", sp.eos_id()), ("unk_token", sp.unk_id())):
        if piece_id >= 0:
            named.setdefault(name, sp.id_to_piece(piece_id))
    control = [sp.id_to_piece(i) for i in range(sp.get_piece_size()) if sp.is_control(i)]
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    if isinstance(extra, dict):  # transformers 5 may keep model-specific named tokens here
        named.update(_named_tokens(extra))
    special = {*named.values(), *control, *(map(_content, extra) if isinstance(extra, list) else ())} - {None}

    added: dict[str, AddedToken] = {}
    for token_id, fields in (config.get("added_tokens_decoder") or {}).items():
        if any(fields.get(flag) for flag in ("lstrip", "rstrip", "single_word")):
            raise NotImplementedError(
                f"{directory / 'tokenizer_config.json'}: added token {fields['content']!r} sets lstrip, rstrip or "
                "single_word, which this tokenizer does not implement (no ERNIE 4.5 checkpoint uses them)"
            )
        is_special = fields.get("special", False) or fields["content"] in special
        added[fields["content"]] = AddedToken(
            fields["content"], int(token_id), is_special, fields.get("normalized", not is_special)
        )
    if "added_tokens_decoder" not in config:
        for content, token_id in _read_json(directory / "added_tokens.json").items():
            added[content] = AddedToken(content, int(token_id), content in special, content not in special)
    # Special tokens not added yet keep their vocabulary id, or take the next free id as the tokenizers library does.
    next_id = max([sp.get_piece_size() - 1, *(token.id for token in added.values())]) + 1
    for content in sorted(special - added.keys()):
        in_vocab = sp.piece_to_id(content) != sp.unk_id() or content == sp.id_to_piece(sp.unk_id())
        added[content] = AddedToken(content, sp.piece_to_id(content) if in_vocab else next_id, True, False)
        next_id += not in_vocab
    return named, sorted(added.values(), key=lambda token: token.id)


def _split(text: str, pattern: re.Pattern | None, tokens: dict[str, AddedToken]):
    """Yield (stretch, None) for the text between matches of `pattern` and (match, its token) for each match."""
    start = 0
    for match in pattern.finditer(text) if pattern else ():
        if match.start() > start:
            yield text[start : match.start()], None
        yield match.group(), tokens[match.group()]
        start = match.end()
    if start < len(text):
        yield text[start:], None


def _alternation(strings, capture: bool = False) -> re.Pattern | None:
    """Regex matching any of `strings`; longest first, so each match is the longest one at the leftmost position."""
    if not strings:
        return None
    body = "|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True))
    return re.compile(f"({body})" if capture else body)


def _join_pieces(pieces: list[str]) -> str:
    """The tokenizers decoders Replace("▁", " "), ByteFallback and Fuse, in that order."""
    out, pending = [], bytearray()
    for piece in pieces:
        byte = _BYTE_PIECE.fullmatch(piece)
        if byte:
            pending.append(int(byte[1], 16))
            continue
        out.append(_bytes_to_text(pending))
        pending.clear()
        out.append(piece.replace(SPACE, " "))
    out.append(_bytes_to_text(pending))
    return "".join(out)


def _bytes_to_text(data: bytearray) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:  # tokenizers writes one U+FFFD per byte, not Python's one per bad sequence
        return "\ufffd" * len(data)


def _compile_template(source: str):
    """Compile like transformers: sandboxed, trim_blocks/lstrip_blocks, loop controls, its tojson and globals."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        # jinja's own tojson escapes HTML characters; templates expect plain JSON
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


def _read_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _content(value) -> str | None:
    """A token written as a string or as an AddedToken dict ({"content": ...})."""
    return value.get("content") if isinstance(value, dict) else value if isinstance(value, str) else None


def _named_tokens(config: dict) -> dict[str, str]:
    return {key: _content(v) for key, v in config.items() if key.endswith("_token") and _content(v) is not None}


# ---- the few fields of SentencePiece's ModelProto that its Python API does not expose


def _proto_fields(buffer: bytes):
    """Yield (field number, value) of a protobuf message: int for varints, bytes for the other wire types."""
    position = 0
    while position < len(buffer):
        key, position = _varint(buffer, position)
        if key & 7 == 0:
            value, position = _varint(buffer, position)
        else:
            size, position = _varint(buffer, position) if key & 7 == 2 else ({1: 8, 5: 4}[key & 7], position)
            value, position = buffer[position : position + size], position + size
        yield key >> 3, value


def _varint(buffer: bytes, position: int) -> tuple[int, int]:
    result = shift = 0
    while True:
        byte, position = buffer[position], position + 1
        result, shift = result | (byte & 0x7F) << shift, shift + 7
        if byte < 0x80:
            return result, position


def _piece_types(model_proto: bytes) -> list[int]:
    """Type of every piece (ModelProto field 1, SentencePiece field 3; 1 = normal when absent)."""
    return [dict(_proto_fields(piece)).get(3, 1) for field, piece in _proto_fields(model_proto) if field == 1]


def _check_supported(model_proto: bytes, source: Path) -> None:
    """Refuse models whose transformers conversion this module does not reproduce; ERNIE's needs none of these."""
    message = dict(_proto_fields(model_proto))
    trainer, normalizer = dict(_proto_fields(message.get(2, b""))), dict(_proto_fields(message.get(3, b"")))
    unsupported = {  # TrainerSpec 3 model_type (1 unigram, 2 BPE); NormalizerSpec 2 charsmap, 3-5 flags default true
        "a model type other than BPE": trainer.get(3, 1) != 2,
        "a precompiled character map": bool(normalizer.get(2)),
        "add_dummy_prefix": normalizer.get(3, 1),
        "remove_extra_whitespaces": normalizer.get(4, 1),
        "no escape_whitespaces": not normalizer.get(5, 1),
    }
    if any(unsupported.values()):
        found = ", ".join(name for name, used in unsupported.items() if used)
        raise ValueError(f"{source}: this SentencePiece model has {found}; ERNIE 4.5's tokenizer.model has none")
