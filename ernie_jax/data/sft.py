"""Supervised fine-tuning rows: conversations -> token ids with the loss on the assistant's replies only.

A jsonl row is a conversation in one of two forms:

- ERNIEKit's: ``{"system"?: str, "src": [user turns], "tgt": [assistant turns], "label"?: [0|1 per turn]}``
  (a single turn may be given as strings instead of lists);
- OpenAI's: ``{"messages": [{"role": "system"|"user"|"assistant", "content": str, "label"?: 0|1}, ...]}``.

The conversation is rendered with the checkpoint's own chat template and tokenized piece by piece: each prompt (the
history plus the generation prompt, "Assistant: ") alone, then each reply with its end token. A reply is therefore
tokenized exactly as the model meets it when it generates after that prompt. The loss covers every reply token and
the reply's end token, whose target is the EOS id (ERNIEKit's convention, so a fine-tuned model stops the way the
released chat models do: generation_config's eos is 2). Turns labelled 0 are context only.

A conversation longer than a row keeps its end (the last replies), with the begin-of-sentence token put back in
front; one left with nothing to learn from is dropped. Both are counted.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ernie_jax.data.sources import BadRecordError, JsonRecord, ThreadSafeCounts

ROLES = ("system", "user", "assistant")


def conversation(record: JsonRecord) -> tuple[list[dict[str, str]], list[int]]:
    """(messages, label per assistant turn) of one row; raises BadRecordError naming the row and what is wrong."""
    obj, where = record.value, record.where

    def bad(message: str) -> BadRecordError:
        return BadRecordError(f"{where}: {message}")

    if "messages" in obj:
        raw = obj["messages"]
        if not isinstance(raw, list) or not raw:
            raise bad("'messages' must be a non-empty list of {role, content} objects")
        messages, labels = [], []
        for i, m in enumerate(raw):
            if not isinstance(m, dict) or m.get("role") not in ROLES or not isinstance(m.get("content"), str):
                raise bad(f"messages[{i}] must be {{'role': system|user|assistant, 'content': str}}, got {m!r:.80}")
            messages.append({"role": m["role"], "content": m["content"]})
            if m["role"] == "assistant":
                labels.append(int(m.get("label", 1)))
    elif "src" in obj and "tgt" in obj:
        src = [obj["src"]] if isinstance(obj["src"], str) else obj["src"]
        tgt = [obj["tgt"]] if isinstance(obj["tgt"], str) else obj["tgt"]
        if not (isinstance(src, list) and isinstance(tgt, list)) or len(src) != len(tgt) or not src:
            raise bad("'src' and 'tgt' must be lists of the same, non-zero length (one reply per user turn)")
        if not all(isinstance(t, str) for t in (*src, *tgt)):
            raise bad("every 'src' and 'tgt' turn must be a string")
        labels = obj.get("label", [1] * len(tgt))
        if not isinstance(labels, list) or len(labels) != len(tgt) or any(x not in (0, 1) for x in labels):
            raise bad(f"'label' must hold one 0 or 1 per turn ({len(tgt)}), got {labels!r:.80}")
        system = obj.get("system")
        if system is not None and not isinstance(system, str):
            raise bad("'system' must be a string")
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in zip(src, tgt, strict=True):
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    else:
        raise bad(f"a conversation needs 'messages', or 'src' and 'tgt'; found keys {sorted(obj)}")
    _check_order(messages, bad)
    if not any(labels):
        raise bad("no assistant turn is labelled 1: nothing to learn from")
    return messages, labels


def _check_order(messages: list[dict[str, str]], bad) -> None:
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            raise bad(f"roles out of order: turn {i} is {m['role']!r}, expected {want!r} (system?, user, assistant...)")
        if want == "assistant" and not m["content"].strip():
            raise bad(f"turn {i}: empty assistant reply")
    if not turns or turns[-1]["role"] != "assistant":
        raise bad("a conversation must end with an assistant reply")


class ConversationEncoder(ThreadSafeCounts):
    """JsonRecord -> {"input_ids", "targets", "loss_mask"} of at most `seq_len` pairs (a DocumentSource converter).

    Counts `cut` (truncated to fit) and `dropped` (nothing supervised left) conversations, thread-safely.
    """

    def __init__(self, tokenizer, seq_len: int):
        if not hasattr(tokenizer, "render_chat_template") or tokenizer.chat_template is None:
            raise ValueError(
                "data.format=sft renders conversations with the checkpoint's chat template: set data.tokenizer to a "
                "checkpoint directory that holds tokenizer.model and tokenizer_config.json"
            )
        super().__init__()
        self.tokenizer, self.seq_len = tokenizer, seq_len
        special = tokenizer.special_tokens
        self.begin_id = tokenizer.token_to_id(special.get("cls_token", "<|begin_of_sentence|>"))
        self.end_id = tokenizer.token_to_id(special.get("sep_token", "<|end_of_sentence|>"))
        self.eos_id = tokenizer.eos_token_id
        self.cut = self.dropped = 0

    def token_ids(self, messages: list[dict[str, str]], labels: list[int]) -> tuple[np.ndarray, np.ndarray]:
        """(ids, supervised) of the whole conversation: supervised[i] = 1 for reply tokens of labelled turns."""
        ids: list[int] = []
        supervised: list[int] = []
        rendered = ""
        turn = 0
        for k, m in enumerate(messages):
            if m["role"] != "assistant":
                continue
            prompt = self.tokenizer.render_chat_template(messages[:k], add_generation_prompt=True)
            full = self.tokenizer.render_chat_template(messages[: k + 1])
            if not (prompt.startswith(rendered) and full.startswith(prompt)):
                raise ValueError("the chat template does not render a conversation as the sum of its turns")
            context = self.tokenizer.encode(prompt[len(rendered) :], add_special_tokens=False)
            reply = self.tokenizer.encode(full[len(prompt) :], add_special_tokens=False)
            ids += context + reply
            supervised += [0] * len(context) + [labels[turn]] * len(reply)
            rendered, turn = full, turn + 1
        return np.asarray(ids, np.int32), np.asarray(supervised, np.int32)

    def __call__(self, record: Any) -> dict[str, np.ndarray] | None:
        messages, labels = conversation(record)
        ids, supervised = self.token_ids(messages, labels)
        if len(ids) > self.seq_len + 1:  # keep the end: the latest replies, with the begin token back in front
            keep = self.seq_len
            ids = np.concatenate([[self.begin_id], ids[-keep:]]).astype(np.int32)
            supervised = np.concatenate([[0], supervised[-keep:]]).astype(np.int32)
            if not supervised[1:].any():
                self.count("dropped")
                return None
            self.count("cut")
        targets = ids[1:].copy()
        loss_mask = supervised[1:].astype(np.float32)
        # The reply's end token is learned as EOS (what generation stops on), as ERNIEKit trains it.
        targets[(targets == self.end_id) & (loss_mask > 0)] = self.eos_id
        return {"input_ids": ids[:-1], "targets": targets, "loss_mask": loss_mask}
