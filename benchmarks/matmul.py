"""The matrix products of one training step, jax (XLA) against torch, shape by shape, in one run.

    python -m benchmarks.matmul [--config=configs/tiny.py:bench] [--batch=8] [--seq_len=512]
        [--iters=10]

A dense step's time is mostly these products: for each projection of the model (q, k and v,
o, gate and up, down, the vocabulary head), the forward x @ W, the input gradient dy @ Wᵀ and
the weight gradient xᵀ @ dy, over batch × seq_len tokens in float32. Each is timed alone
under `jax.jit` and in torch (the median of `--iters` calls after three untimed), and the table
gives GFLOP/s for each and the step's total over all layers. It tells how much of the CPU
train-step gap to transformers (benchmarks/train_step.py) is the matmul library's: XLA:CPU's
dot kernels against the BLAS that torch calls (oneDNN / MKL).
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

import numpy as np

import jaxllm
from benchmarks.timing import median_seconds


def projections(model) -> list[tuple[str, int, int, int]]:
    """(name, in, out, how many per step) of every dense projection of the model."""
    q, kv = model.num_heads * model.head_dim, model.num_kv_heads * model.head_dim
    n = model.num_layers
    return [("q / o", model.hidden_size, q, 2 * n), ("k, v", model.hidden_size, kv, 2 * n),
            ("gate, up", model.hidden_size, model.intermediate_size, 2 * n),
            ("down", model.intermediate_size, model.hidden_size, n),
            ("head", model.hidden_size, model.vocab_size, 1)]


def jax_products(tokens: int, n_in: int, n_out: int, iters: int) -> list[float]:
    import jax

    rng = np.random.default_rng(0)
    x, w, dy = (rng.standard_normal(s, np.float32) for s in
                ((tokens, n_in), (n_in, n_out), (tokens, n_out)))
    x, w, dy = map(jax.numpy.asarray, (x, w, dy))
    calls = ((jax.jit(lambda x, w: x @ w), x, w), (jax.jit(lambda dy, w: dy @ w.T), dy, w),
             (jax.jit(lambda x, dy: x.T @ dy), x, dy))
    return [median_seconds(f, a, b, warmup=3, iters=iters) for f, a, b in calls]


def torch_products(tokens: int, n_in: int, n_out: int, iters: int) -> list[float]:
    import torch

    x, w, dy = (torch.randn(s) for s in ((tokens, n_in), (n_in, n_out), (tokens, n_out)))
    calls = (lambda: x @ w, lambda: dy @ w.T, lambda: x.T @ dy)
    return [median_seconds(call, warmup=3, iters=iters) for call in calls]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/tiny.py:bench")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq_len", type=int, default=512)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    model = jaxllm.load_config(args.config).model
    tokens = args.batch * args.seq_len
    try:
        import torch  # noqa: F401
    except ImportError:
        sys.exit("benchmarks/matmul.py compares with torch: pip install torch")
    print(f"{args.config}, {tokens} tokens, float32, {platform.processor() or platform.machine()}"
          f", {os.cpu_count()} cores\n")
    print("| projection (in → out) | product | jax GFLOP/s | torch GFLOP/s | jax / torch |")
    print("|---|---|--:|--:|--:|")
    total = {"jax": 0.0, "torch": 0.0}
    for name, n_in, n_out, count in projections(model):
        flops = 2.0 * tokens * n_in * n_out
        ours = jax_products(tokens, n_in, n_out, args.iters)
        peer = torch_products(tokens, n_in, n_out, args.iters)
        for product, a, b in zip(("x @ W", "dy @ Wᵀ", "xᵀ @ dy"), ours, peer, strict=True):
            print(f"| {name} ({n_in} → {n_out}) | {product} | {flops / a / 1e9:.0f} | "
                  f"{flops / b / 1e9:.0f} | {b / a:.2f} |", flush=True)
            total["jax"] += count * a
            total["torch"] += count * b
    print(f"\nall products of one step: jax {total['jax'] * 1e3:.0f} ms, torch "
          f"{total['torch'] * 1e3:.0f} ms ({total['torch'] / total['jax']:.2f}×)")


if __name__ == "__main__":
    main()
