"""A short LoRA SFT run end to end, with the real ERNIE tokenizer, and its loss curve.

    python -m benchmarks.sft_curve [--tokenizer ../shared/data/ERNIE-4.5-0.3B-Base] [--steps 60] [--out DIR]

Writes a conversation file (short multi-turn chats in English and Chinese, OpenAI-style `messages`, some with a
system prompt, plus ERNIEKit src/tgt rows), makes a small random base checkpoint over ERNIE's real vocabulary with
transformers, then runs the issue's command in-process:

    python -m ernie_jax.train --init-from-hf BASE data.sources=SFT.jsonl data.format=sft data.tokenizer=BASE \
        lora.rank=8 steps=60 optim.lr=1e-2 export_hf=MERGED export_peft=ADAPTER run_dir=RUN

and prints the training loss (assistant tokens only) every few steps. The base is random, so the curve shows the
adapters learning the conversations' shape and answers, not a chat model's quality.
"""

from __future__ import annotations

import argparse
import json
import os
import random

from ernie_jax.config import ERNIE_4_5_0P3B
from ernie_jax.training import loop

DEFAULT_TOKENIZER = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "ERNIE-4.5-0.3B-Base")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json")
CITIES = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Canada": "Ottawa", "Egypt": "Cairo", "Peru": "Lima"}
CITIES_ZH = {"法国": "巴黎", "日本": "东京", "意大利": "罗马", "加拿大": "渥太华", "埃及": "开罗", "秘鲁": "利马"}


def conversations(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            country = rng.choice(list(CITIES))
            rows.append({"messages": [
                {"role": "user", "content": f"What is the capital of {country}?"},
                {"role": "assistant", "content": f"The capital of {country} is {CITIES[country]}."},
            ]})  # fmt: skip
        elif kind == 1:
            a, b = rng.randint(2, 40), rng.randint(2, 40)
            rows.append({"messages": [
                {"role": "system", "content": "You are a careful calculator. Answer with the number only."},
                {"role": "user", "content": f"{a} + {b} = ?"},
                {"role": "assistant", "content": str(a + b)},
                {"role": "user", "content": f"And times {b}?"},
                {"role": "assistant", "content": str((a + b) * b)},
            ]})  # fmt: skip
        elif kind == 2:
            country = rng.choice(list(CITIES_ZH))
            rows.append({"messages": [
                {"role": "user", "content": f"{country}的首都是哪里？"},
                {"role": "assistant", "content": f"{country}的首都是{CITIES_ZH[country]}。"},
            ]})  # fmt: skip
        else:
            word = rng.choice(["apple", "river", "window", "garden", "music"])
            rows.append({"src": [f"Spell '{word}' backwards."], "tgt": [word[::-1]]})
    return rows


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER, help="a directory with ERNIE's tokenizer files")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", default="runs/sft_curve")
    args = parser.parse_args(argv)
    import torch
    from transformers import Ernie4_5Config, Ernie4_5ForCausalLM

    out = os.path.abspath(args.out)
    base, data = os.path.join(out, "base"), os.path.join(out, "sft.jsonl")
    os.makedirs(base, exist_ok=True)
    with open(data, "w") as f:
        for row in conversations(512):
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    cfg = ERNIE_4_5_0P3B.replace(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                 num_key_value_heads=2, head_dim=16)  # fmt: skip
    hf_cfg = {k: v for k, v in cfg.to_hf_config().items() if k not in ("architectures", "model_type")}
    torch.manual_seed(0)
    Ernie4_5ForCausalLM(Ernie4_5Config(**hf_cfg)).float().save_pretrained(base)
    for name in TOKENIZER_FILES:
        target = os.path.join(base, name)
        if not os.path.exists(target):
            os.symlink(os.path.abspath(os.path.join(args.tokenizer, name)), target)
    argv = [
        "--init-from-hf", base, f"data.sources={data}", "data.format=sft", f"data.tokenizer={base}",
        "lora.rank=8", f"steps={args.steps}", "optim.lr=1e-2", "log_every=5", "sample_tokens=0",
        f"export_hf={os.path.join(out, 'merged')}", f"export_peft={os.path.join(out, 'adapter')}",
        f"run_dir={os.path.join(out, 'run')}",
    ]  # fmt: skip
    print("python -m ernie_jax.train " + " ".join(argv))
    code = loop.main(argv)
    with open(os.path.join(out, "run", "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    print("step  loss (assistant tokens)")
    for r in rows:
        print(f"{r['step']:4d}  {r['ce']:.3f}")
    return {"exit_code": code, "curve": [(r["step"], r["ce"]) for r in rows]}


if __name__ == "__main__":
    main()
