"""Decode speed: `ernie_jax.generate` vs transformers' `generate` on the CPU, same weights and prompts, side by side.

    python -m benchmarks.decode_vs_transformers [--batch 4] [--prompt 32] [--new 64] [--repeats 3]

Both decode greedily (no EOS, so every row produces exactly `--new` tokens) from the same left-padded batch of
prompts of different lengths, on the tiny preset's architecture (a shrunk 21B-A3B layout) with the same random
weights: ernie-jax loads the checkpoint transformers writes. Prints new tokens per second of each (best of
`--repeats` after a warm-up call that compiles), the ratio, and whether the tokens are identical.
"""

from __future__ import annotations

import argparse

import numpy as np

import ernie_jax
from benchmarks.peers import tiny_pair
from benchmarks.timing import best_seconds


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=32, help="longest prompt; the others are shorter")
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args(argv)
    import torch

    cfg, torch_model, jax_model = tiny_pair()
    torch_model.eval()

    rng = np.random.RandomState(0)
    lengths = [max(1, args.prompt - 7 * i) for i in range(args.batch)]
    prompts = [rng.randint(3, cfg.vocab_size, n).tolist() for n in lengths]

    def ours():
        return ernie_jax.generate(jax_model, prompts, max_new_tokens=args.new, temperature=0.0, eos_token_id=None)

    width = max(lengths)
    ids = np.zeros((args.batch, width), np.int64)
    mask = np.zeros((args.batch, width), np.int64)
    for row, p in enumerate(prompts):  # left padding, as decoder-only generation wants
        ids[row, width - len(p) :], mask[row, width - len(p) :] = p, 1

    def theirs():
        with torch.no_grad():
            out = torch_model.generate(
                input_ids=torch.as_tensor(ids),
                attention_mask=torch.as_tensor(mask),
                max_new_tokens=args.new,
                min_new_tokens=args.new,
                do_sample=False,
                pad_token_id=0,
            )
        return out[:, width:].tolist()

    ours_s, ours_tokens = best_seconds(ours, args.repeats)
    theirs_s, theirs_tokens = best_seconds(theirs, args.repeats)
    new_tokens = args.batch * args.new
    result = {
        "ernie_jax_tokens_per_s": new_tokens / ours_s,
        "transformers_tokens_per_s": new_tokens / theirs_s,
        "ratio": theirs_s / ours_s,
        "identical_tokens": float(ours_tokens == theirs_tokens),
    }
    print(
        f"decode, tiny preset (fp32, CPU), batch {args.batch}, prompts of {lengths} tokens, {args.new} new tokens each:"
    )
    print(f"  ernie-jax     {result['ernie_jax_tokens_per_s']:10,.0f} tokens/s")
    print(f"  transformers  {result['transformers_tokens_per_s']:10,.0f} tokens/s")
    print(f"  ratio         {result['ratio']:10.2f}x   tokens identical: {bool(result['identical_tokens'])}")
    return result


if __name__ == "__main__":
    main()
