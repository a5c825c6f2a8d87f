"""How every benchmark here times a call: the median wall time after warm-up calls.

The scripts import it as `from timing import median_seconds` (run as `python benchmarks/X.py`,
their own folder is on the import path).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax


def median_seconds(fn, *args, warmup: int = 1, iters: int = 3) -> float:
    """Median seconds of `fn(*args)` over `iters` calls, after `warmup` untimed calls (the first
    compiles); waits for JAX results, so asynchronous dispatch is not mistaken for speed."""
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def add_kernel_args(parser: argparse.ArgumentParser, on_cpu: bool) -> None:
    """The kernel benchmarks' shared flags, with defaults for the device."""
    parser.add_argument("--dtype", default="float32" if on_cpu else "bfloat16")
    parser.add_argument("--interpret", action="store_true", help="CPU: add Pallas, interpreted")
    parser.add_argument("--warmup", type=int, default=1 if on_cpu else 3)
    parser.add_argument("--iters", type=int, default=3 if on_cpu else 10)
