"""Wall-clock timing shared by the benchmarks that compare whole calls (decode loops) side by side."""

from __future__ import annotations

import time


def best_seconds(fn, repeats: int):
    """(fastest of `repeats` calls in seconds, the last call's result), after one warm-up call that compiles (ours)
    and warms the allocator (both sides)."""
    out = fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return min(times), out
