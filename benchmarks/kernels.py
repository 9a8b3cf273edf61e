"""Kernel benchmarks: gmm vs `jax.lax.ragged_dot` and a per-expert loop; flash attention vs
`jax.nn.dot_product_attention` (xla, and cudnn on GPU). Forward and forward+backward, ratios and TFLOP/s.

    python -m benchmarks.kernels               # on GPU/TPU: ERNIE-4.5-21B-A3B shapes
    python -m benchmarks.kernels --size toy    # anywhere; the default on CPU (Pallas runs interpreted there)

On CPU the numbers only show the harness works: interpret mode is orders of magnitude slower than a kernel.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

import pallas_kernels
from pallas_kernels.gmm.reference import gmm_loop_reference

SIZES = {
    # tokens x k routed rows, hidden, expert width, experts; batch, seq, q heads, kv heads, head_dim
    "a3b": dict(m=16384, d=2560, f=1536, e=64, b=2, t=4096, n=20, kv=4, h=128),
    "toy": dict(m=256, d=128, f=128, e=4, b=1, t=128, n=4, kv=2, h=64),
}


def bench(fn, *args, iters: int) -> float:
    """Median wall seconds of a jitted call (compile excluded)."""
    fn = jax.jit(fn)
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def _report(title: str, flops: float, results: dict[str, float]) -> None:
    base = results.get("pallas")
    print(f"\n{title}  ({flops / 1e9:.2f} GFLOP)")
    for name, sec in results.items():
        ratio = f"{sec / base:6.2f}x pallas time" if base else ""
        print(f"  {name:<14} {sec * 1e3:10.3f} ms  {flops / sec / 1e12:8.3f} TFLOP/s  {ratio}")


def _grad(f, argnums):
    return jax.grad(lambda *a: jnp.sum(f(*a).astype(jnp.float32)), argnums=argnums)


def bench_gmm(s: dict, dtype, iters: int, backend: str) -> None:
    rng = np.random.RandomState(0)
    m, d, f, e = s["m"], s["d"], s["f"], s["e"]
    lhs = jnp.asarray(rng.randn(m, d), dtype)
    rhs = jnp.asarray(rng.randn(e, d, f) / np.sqrt(d), dtype)
    # Ragged, roughly balanced routing with a couple of empty experts.
    sizes = rng.multinomial(m, rng.dirichlet(np.full(e, 4.0)))
    sizes[: max(1, e // 16)] = 0
    sizes[-1] += m - sizes.sum()
    sizes = jnp.asarray(sizes, jnp.int32)
    impls = {
        "pallas": lambda a, b: pallas_kernels.gmm(a, b, sizes, implementation="pallas"),
        "ragged_dot": lambda a, b: jax.lax.ragged_dot(a, b, sizes),
    }
    if backend != "cpu" or e <= 8:  # the loop computes every expert densely: E x the FLOPs
        impls["expert_loop"] = lambda a, b: gmm_loop_reference(a, b, sizes)
    flops = 2.0 * m * d * f
    _report(f"gmm fwd [{m}, {d}] x [{e}, {d}, {f}] {jnp.dtype(dtype).name}",
            flops, {k: bench(fn, lhs, rhs, iters=iters) for k, fn in impls.items()})  # fmt: skip
    _report("gmm fwd+bwd (dlhs, drhs)", 3 * flops,
            {k: bench(_grad(fn, (0, 1)), lhs, rhs, iters=iters) for k, fn in impls.items()})  # fmt: skip


def bench_attention(s: dict, dtype, iters: int, backend: str) -> None:
    rng = np.random.RandomState(1)
    b, t, n, kv, h = s["b"], s["t"], s["n"], s["kv"], s["h"]
    q = jnp.asarray(rng.randn(b, t, n, h), dtype)
    k = jnp.asarray(rng.randn(b, t, kv, h), dtype)
    v = jnp.asarray(rng.randn(b, t, kv, h), dtype)
    impls = {
        "pallas": lambda q, k, v: pallas_kernels.flash_attention(q, k, v, implementation="pallas"),
        "xla": lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"),
    }
    if backend == "gpu":
        impls["cudnn"] = lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    flops = 4.0 * b * n * t * t * h / 2  # causal: half the score matrix
    _report(f"flash attention fwd B={b} T={t} N={n} K={kv} H={h} {jnp.dtype(dtype).name}",
            flops, {k_: bench(fn, q, k, v, iters=iters) for k_, fn in impls.items()})  # fmt: skip
    _report("flash attention fwd+bwd", 3.5 * flops,
            {k_: bench(_grad(fn, (0, 1, 2)), q, k, v, iters=iters) for k_, fn in impls.items()})  # fmt: skip


def errors() -> None:
    """Worst |kernel - twin| for forward and every gradient, per kernel and dtype (interpret mode on CPU)."""
    from pallas_kernels.flash_attention import ops as fa_ops
    from pallas_kernels.flash_attention.reference import attention_reference
    from pallas_kernels.gmm import ops as gmm_ops
    from pallas_kernels.gmm.reference import gmm_reference

    rng = np.random.RandomState(0)
    interp = jax.default_backend() == "cpu"
    sizes = jnp.asarray([20, 0, 17, 0, 35], jnp.int32)  # ragged, empty groups, 8 padding rows
    segs = jnp.asarray(np.stack([np.repeat([1, 2, 3, 0], [5, 14, 9, 4]), np.ones(32)]), jnp.int32)
    for dtype in (jnp.float32, jnp.bfloat16):
        lhs, rhs = jnp.asarray(rng.randn(80, 32), dtype), jnp.asarray(rng.randn(5, 32, 48) / 6, dtype)
        cot = jnp.asarray(rng.randn(80, 48), dtype)
        want = _vjp(lambda a, b: gmm_reference(a, b, sizes), (lhs, rhs), cot)
        for kernel in ("tpu", "gpu"):
            fn = lambda a, b, k=kernel: gmm_ops.gmm(a, b, sizes, tiling=(16, 16, 16), kernel=k, interpret=interp)
            _print_errors(f"gmm/{kernel}", dtype, ("out", "dlhs", "drhs"), _vjp(fn, (lhs, rhs), cot), want)
        q, do = (jnp.asarray(rng.randn(2, 32, 10, 16), dtype) for _ in range(2))
        k, v = (jnp.asarray(rng.randn(2, 32, 2, 16), dtype) for _ in range(2))
        want = _vjp(lambda *a: attention_reference(*a, segment_ids=segs), (q, k, v), do)
        for kernel, blocks in (("tpu", (8, 16)), ("gpu", (16, 16))):
            fn = lambda *a, k_=kernel, b_=blocks: fa_ops.flash_attention(
                *a, segment_ids=segs, block_sizes=b_, kernel=k_, interpret=interp
            )
            _print_errors(f"flash/{kernel} GQA5", dtype, ("out", "dq", "dk", "dv"), _vjp(fn, (q, k, v), do), want)


def _vjp(fn, primals, cot):
    out, vjp = jax.vjp(fn, *primals)
    return (out, *vjp(cot))


def _print_errors(title, dtype, names, got, want) -> None:
    errs = [
        float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))) for a, b in zip(got, want, strict=True)
    ]
    print(
        f"{title:<18} {jnp.dtype(dtype).name:<9} " + "  ".join(f"{n}={e:.2e}" for n, e in zip(names, errs, strict=True))
    )


def main(argv=None) -> None:
    backend = jax.default_backend()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="toy" if backend == "cpu" else "a3b")
    parser.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16")
    parser.add_argument("--iters", type=int, default=3 if backend == "cpu" else 20)
    parser.add_argument("--only", choices=["gmm", "attention"], default=None)
    parser.add_argument("--errors", action="store_true", help="print worst kernel-vs-twin errors and exit")
    args = parser.parse_args(argv)
    if args.errors:
        errors()
        return
    dtype = jnp.dtype(args.dtype)
    print(f"backend={backend} devices={jax.devices()[0].device_kind} size={args.size}")
    if backend == "cpu":
        print("CPU: Pallas runs in interpret mode; timings only show the harness works.")
    if args.only in (None, "gmm"):
        bench_gmm(SIZES[args.size], dtype, args.iters, backend)
    if args.only in (None, "attention"):
        bench_attention(SIZES[args.size], dtype, args.iters, backend)


if __name__ == "__main__":
    main()
