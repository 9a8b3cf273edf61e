"""Small helpers the notebooks share: where the tokenizer comes from, a checkpoint made by transformers, a chat set.

Kept out of the notebooks so each stays about what it shows. Nothing here is part of `ernie_jax`; the notebooks import
it from their own directory (`notebooks/`), which Jupyter and the test both use as the working directory.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import ernie_jax  # first: on a host without TPU chips this keeps libtpu from initialising (ernie_jax/runtime_env.py)

REPO = Path(__file__).resolve().parent.parent
# ERNIE-4.5-0.3B's tokenizer files, when this checkout sits beside a shared data folder (no weights needed).
REAL_TOKENIZER = Path(os.environ.get("ERNIE_TOKENIZER_DIR", REPO.parent / "shared" / "data" / "ERNIE-4.5-0.3B-Base"))
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
BEGIN, END = "<|begin_of_sentence|>", "<|end_of_sentence|>"
# ERNIE 4.5's chat layout (written here for the stand-in tokenizer; a real checkpoint brings its own template):
# BEGIN, the system prompt and each user turn on its own line, each assistant turn closed by END.
CHAT_TEMPLATE = (
    "{{- '" + BEGIN + "' -}}"
    "{%- for m in messages -%}"
    "{%- if m['role'] == 'system' -%}{{- m['content'] + '\\n' -}}"
    "{%- elif m['role'] == 'user' -%}{{- 'User: ' + m['content'] + '\\n' -}}"
    "{%- elif m['role'] == 'assistant' -%}{{- 'Assistant: ' + m['content'] + '" + END + "' -}}"
    "{%- endif -%}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Assistant: ' -}}{%- endif -%}"
)


def write_tokenizer(directory: str | Path, extra_text: list[str] = ()) -> str:
    """Put tokenizer files into `directory`: ERNIE 4.5's own when REAL_TOKENIZER holds them, else a small BPE
    SentencePiece model trained here on the Python docs (and `extra_text`), with ERNIE's special-token ids
    (unk 0, bos 1, eos 2) and chat layout. Returns which one was written."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if all((REAL_TOKENIZER / name).is_file() for name in TOKENIZER_FILES):
        for name in TOKENIZER_FILES:
            shutil.copyfile(REAL_TOKENIZER / name, directory / name)
        return f"ERNIE 4.5's tokenizer ({REAL_TOKENIZER})"
    from pydoc_data.topics import topics

    import sentencepiece as spm

    corpus = directory / "corpus.txt"
    corpus.write_text("\n".join([*topics.values(), *extra_text]), encoding="utf-8")
    spm.SentencePieceTrainer.train(
        input=str(corpus), model_prefix=str(directory / "tokenizer"), model_type="bpe", vocab_size=2000,
        character_coverage=1.0, byte_fallback=True, add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        user_defined_symbols=[BEGIN, END], minloglevel=2,
    )  # fmt: skip
    corpus.unlink()
    (directory / "tokenizer.vocab").unlink()
    config = dict(bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>", cls_token=BEGIN,
                  sep_token=END, chat_template=CHAT_TEMPLATE)  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=1))
    return "a stand-in BPE tokenizer trained here (ERNIE's tokenizer files were not found)"


def hf_checkpoint(directory: str | Path, cfg: ernie_jax.ErnieConfig, seed: int = 0) -> Path:
    """A random checkpoint of architecture `cfg`, written by transformers' own save_pretrained (fp32)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    hf_cfg = cfg.to_hf_config()
    model_type = hf_cfg.pop("model_type")
    hf_cfg.pop("architectures")
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(model_type, **hf_cfg)).float().eval()
    model.save_pretrained(directory)
    return Path(directory)


CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Canada": "Ottawa", "Egypt": "Cairo",
            "Peru": "Lima", "Kenya": "Nairobi", "Norway": "Oslo"}  # fmt: skip


def conversations(n: int, seed: int = 0) -> list[dict]:
    """`n` short chats in the OpenAI `messages` layout: capitals (some with a system prompt, some two turns)."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        country = rng.choice(list(CAPITALS))
        turns = [
            {"role": "user", "content": f"What is the capital of {country}?"},
            {"role": "assistant", "content": f"The capital of {country} is {CAPITALS[country]}."},
        ]
        if i % 3 == 1:
            turns.insert(0, {"role": "system", "content": "Answer in one sentence."})
        if i % 3 == 2:
            other = rng.choice(list(CAPITALS))
            turns += [
                {"role": "user", "content": f"And of {other}?"},
                {"role": "assistant", "content": f"The capital of {other} is {CAPITALS[other]}."},
            ]
        rows.append({"messages": turns})
    return rows


class LivePlot:
    """Curves that redraw in place while a run goes on: pass it as `ernie_jax.train.train(cfg, on_log=plot)`.

    `panels` maps a panel title to the row keys drawn in it, e.g. {"loss": ["ce"]}. Each logged row appends a point
    and redraws (in a notebook through one display handle, so the output holds one, final, picture); the rows are
    kept in `self.rows`. `log_y` draws those panels on a log scale."""

    def __init__(self, panels: dict[str, list[str]], log_y: tuple[str, ...] = (), width: float = 5.0):
        import matplotlib.pyplot as plt
        from IPython.display import display

        self.rows: list[dict] = []
        self.fig, axes = plt.subplots(1, len(panels), figsize=(width * len(panels), 3.6), squeeze=False)
        self.lines = {}
        for ax, (title, keys) in zip(axes[0], panels.items(), strict=True):
            for key in keys:
                (self.lines[key],) = ax.plot([], [], marker=".", label=key)
            ax.set(title=title, xlabel="step", yscale="log" if title in log_y else "linear")
            ax.legend(fontsize=8)
        self.axes = axes[0]
        self.fig.tight_layout()
        self.handle = display(self.fig, display_id=True)
        plt.close(self.fig)  # drawn through the handle only, not again at the end of the cell

    def __call__(self, step: int, row: dict) -> None:
        self.rows.append({"step": step, **row})
        steps = [r["step"] for r in self.rows]
        for key, line in self.lines.items():
            line.set_data(steps, [r.get(key, float("nan")) for r in self.rows])
        for ax in self.axes:
            ax.relim()
            ax.autoscale_view()
        self.handle.update(self.fig)
