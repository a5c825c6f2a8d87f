"""How every benchmark here times a call, and how it reports a call that failed.

The scripts import it as `from benchmarks.timing import median_seconds`; they run from the
checkout's root as `python -m benchmarks.X`.
"""

from __future__ import annotations

import argparse
import statistics
import time
import traceback

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


def is_number(cell: str) -> bool:
    """Whether a table cell holds a measurement (not the reason it has none)."""
    try:
        float(cell)
    except ValueError:
        return False
    return True


def is_out_of_memory(e: BaseException | str) -> bool:
    """Whether an exception (or the text a failed process wrote) says memory ran out."""
    text = str(e)
    return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


class Failures:
    """Calls that raised: a short table cell now, the reasons printed after the table (the
    first line of each; the whole traceback unless it is out of memory), so that one run on a
    borrowed accelerator says why a row is missing. Keeps text only: the exception's frames
    would keep the failed call's arrays alive."""

    def __init__(self) -> None:
        self.items: list[tuple[str, str, str, str, bool]] = []

    def cell(self, where: str, e: BaseException) -> str:
        first = (str(e).strip().splitlines() or [""])[0][:300]
        oom = is_out_of_memory(e)
        self.items.append((where, type(e).__name__, first, traceback.format_exc(), oom))
        return "OOM" if oom else type(e).__name__

    def print(self) -> None:
        for where, kind, first, _, _ in self.items:
            print(f"failed: {where}: {kind}: {first}")
        for where, _, _, trace, oom in self.items:
            if not oom:
                print(f"\ntraceback of {where}:\n{trace}", end="")
