"""Speculative decoding with the MTP head vs plain decoding, on the CPU, side by side in one run.

    python -m benchmarks.speculative_decode [--steps 600] [--model DIR] [--batch 1] [--new 128] [--repeats 3]

A draft head is only as good as its training, so this first trains the embedded default (`configs/tiny.py`, which
carries one MTP depth trained with mtp.depth=1) for `--steps` steps and exports it; `--model DIR` skips that and
uses an exported checkpoint with an MTP head. Then both decoders run greedily (no EOS: every row produces exactly
`--new` tokens) from the same prompts. Prints new tokens per second of each (best of `--repeats` after a warm-up
call that compiles), the ratio, the acceptance rate, tokens per main-model forward, and whether the tokens are
identical (they must be: greedy speculative decoding is exact).
"""

from __future__ import annotations

import argparse
import os
import tempfile

import jax.numpy as jnp

import ernie_jax
from benchmarks.timing import best_seconds
from ernie_jax.data import load_tokenizer
from ernie_jax.generation import DecodeSpec, Sampling, decode_batch
from ernie_jax.training import loop
from ernie_jax.training.config import apply_overrides, load_preset

PROMPTS = ("The ", "A list is ", "In Python, the ", "If the ")


def trained_model_dir(steps: int) -> str:
    run = tempfile.mkdtemp(prefix="ernie-spec-bench-")
    export = os.path.join(run, "hf")
    cfg = apply_overrides(
        load_preset("tiny"), [f"steps={steps}", f"run_dir={run}", f"export_hf={export}", "sample_tokens=0"]
    )
    summary = loop.train(cfg, "tiny", progress=True)
    print(f"trained the tiny preset with its MTP head for {steps} steps: loss {summary['last_loss']:.3f}")
    return export


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=600, help="training steps of the tiny preset before decoding")
    parser.add_argument("--model", help="an exported checkpoint with an MTP head (skips the training)")
    parser.add_argument("--batch", type=int, default=1, help="rows decoded together (prompts cycle)")
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    path = args.model or trained_model_dir(args.steps)
    model = ernie_jax.from_pretrained(path, dtype=jnp.float32, progress=False)
    tokenizer = load_tokenizer(load_preset("tiny").data.tokenizer)
    prompts = [tokenizer.encode(PROMPTS[i % len(PROMPTS)]) for i in range(args.batch)]

    def run(speculative: bool):
        spec = DecodeSpec(Sampling(), max_new_tokens=args.new, eos_ids=(), pad_id=0, speculative=speculative)
        return decode_batch(model, prompts, spec)

    plain_s, plain = best_seconds(lambda: run(False), args.repeats)
    spec_s, spec = best_seconds(lambda: run(True), args.repeats)
    new = args.batch * args.new
    stats = spec.stats
    identical = (plain.tokens[:, : args.new] == spec.tokens[:, : args.new]).all()
    print(
        f"batch {args.batch}, {args.new} new tokens per row, greedy: plain {new / plain_s:,.0f} tok/s, "
        f"speculative (mtp) {new / spec_s:,.0f} tok/s: {plain_s / spec_s:.2f}x; acceptance "
        f"{stats['acceptance']:.0%}, {stats['tokens_per_forward']:.2f} tokens per main-model forward; "
        f"tokens identical: {bool(identical)}"
    )
    print(f"sample: {tokenizer.decode(prompts[0] + spec.tokens[0, : args.new].tolist())!r}")
    return {"ratio": plain_s / spec_s, "acceptance": stats["acceptance"], "identical": bool(identical)}


if __name__ == "__main__":
    main()
