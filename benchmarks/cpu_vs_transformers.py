"""ernie-jax vs transformers' PyTorch ERNIE MoE on the CPU, side by side in one run, on the same weights and batch.

    python -m benchmarks.cpu_vs_transformers [--steps 10] [--rounds 3] [--batch 8] [--seq 128]

Measures forward tokens/s and training-step tokens/s (forward + backward + AdamW) for both and prints the ratios.
The two frameworks take turns, round after round (each round times both forwards, then both train steps), and the
figures are medians over the rounds: a slow spell of a shared or virtual machine then lands on both sides instead
of on whichever ran during it.
The model is the tiny preset's architecture (a shrunk 21B-A3B layout) with the same random weights in both
frameworks: ernie-jax loads the checkpoint that transformers writes. Both run in fp32 on all host cores.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from benchmarks.peers import tiny_pair, train_step


def _time(fn, steps: int) -> float:
    """Median seconds per call after one warm-up call (compiles, allocator warm-up)."""
    fn()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def main(argv=None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=128)
    args = parser.parse_args(argv)
    import torch

    cfg, torch_model, jax_model = tiny_pair()

    rng = np.random.RandomState(0)
    ids = rng.randint(0, cfg.vocab_size, (args.batch, args.seq + 1))
    inputs, targets = ids[:, :-1], ids[:, 1:]
    tokens = args.batch * args.seq

    # --- transformers (PyTorch eager) ---
    t_inputs, t_targets = torch.as_tensor(inputs), torch.as_tensor(targets)
    torch_opt = torch.optim.AdamW(torch_model.parameters(), lr=1e-4)

    def torch_forward():
        with torch.no_grad():
            torch_model.eval()
            torch_model(t_inputs).logits.sum().item()

    def torch_train():
        torch_model.train()
        logits = torch_model(t_inputs).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), t_targets.reshape(-1))
        torch_opt.zero_grad()
        loss.backward()
        torch_opt.step()

    # --- ernie-jax (jit) ---
    graphdef, params, rest = nnx.split(jax_model, nnx.Param, ...)
    j_inputs, j_targets = jnp.asarray(inputs), jnp.asarray(targets)
    jax_opt = optax.adamw(1e-4)
    opt_state = jax_opt.init(params)
    forward = jax.jit(lambda p, r, x: nnx.merge(graphdef, p, r)(x).sum())

    step = jax.jit(train_step(graphdef, jax_opt))

    state = {"p": params, "o": opt_state}

    def jax_forward():
        forward(state["p"], rest, j_inputs).block_until_ready()

    def jax_train():
        state["p"], state["o"], _ = step(state["p"], rest, state["o"], j_inputs, j_targets)
        jax.block_until_ready(state["p"])

    runs = {"forward_tok_s_ernie_jax": jax_forward, "forward_tok_s_transformers": torch_forward}
    runs |= {"train_tok_s_ernie_jax": jax_train, "train_tok_s_transformers": torch_train}
    rounds = {name: [] for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            rounds[name].append(tokens / _time(fn, args.steps))
    results = {name: float(np.median(values)) for name, values in rounds.items()}
    print(
        f"model: tiny preset ({cfg.num_params():,} params, {cfg.moe_num_experts} experts, k={cfg.moe_k}), "
        f"batch {args.batch} x {args.seq} tokens, fp32, {jax.devices()[0].device_kind}, torch threads "
        f"{torch.get_num_threads()}"
    )
    for kind in ("forward", "train"):
        ours, theirs = results[f"{kind}_tok_s_ernie_jax"], results[f"{kind}_tok_s_transformers"]
        ratio = ours / theirs
        pairs = zip(rounds[f"{kind}_tok_s_ernie_jax"], rounds[f"{kind}_tok_s_transformers"], strict=True)
        per_round = ", ".join(f"{a / b:.2f}x" for a, b in pairs)
        print(
            f"{kind:8s} ernie-jax {ours:10,.0f} tok/s   transformers {theirs:10,.0f} tok/s   ratio {ratio:5.2f}x"
            f"   (rounds: {per_round})"
        )
    return results


if __name__ == "__main__":
    main()
