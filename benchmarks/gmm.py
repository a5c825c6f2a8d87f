"""Grouped matmul throughput: jaxllm's Pallas gmm vs jax.lax.ragged_dot vs a per-group loop.

    python -m benchmarks.gmm [--tokens=8192] [--experts=64] [--top_k=8] [--hidden=3584]
                             [--moe_dim=2560] [--dtype=bfloat16]

The MoE expert up-projection: M = tokens·top_k rows sorted by expert, routed with a skewed
(Zipf-like) distribution so group sizes differ and some are 0; lhs [M, hidden] @ rhs
[E, hidden, moe_dim]. Prints TFLOP/s of the forward (2·M·K·N) and of forward+backward
(gradients of lhs and of the expert weights, the transposed product: 3× the forward).
Defaults follow the device: the Qwen2-57B-A14B layer on GPU/TPU, a small layer in float32 on
CPU, where the Pallas kernel only runs interpreted (--interpret, small sizes). A cell that
cannot run says why (`OOM`, or the exception's type) and the reasons follow the table; the
exit status is 1 if jaxllm's kernel failed.
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import sys

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import Failures, add_kernel_args, is_number, median_seconds
from jaxllm.kernels.gmm import gmm
from jaxllm.kernels.gmm_ref import gmm_loop


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    on_cpu = jax.default_backend() == "cpu"
    parser.add_argument("--tokens", type=int, default=512 if on_cpu else 8192)
    parser.add_argument("--experts", type=int, default=8 if on_cpu else 64)
    parser.add_argument("--top_k", type=int, default=2 if on_cpu else 8)
    parser.add_argument("--hidden", type=int, default=256 if on_cpu else 3584)
    parser.add_argument("--moe_dim", type=int, default=512 if on_cpu else 2560)
    add_kernel_args(parser, on_cpu)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    M, K, N, E = args.tokens * args.top_k, args.hidden, args.moe_dim, args.experts
    weights = 1.0 / np.arange(1, E + 1) ** 1.2
    weights[E // 3] = 0.0  # an expert nobody routes to
    group_sizes = jnp.asarray(rng.multinomial(M, weights / weights.sum()), jnp.int32)
    lhs = jnp.asarray(rng.standard_normal((M, K), np.float32), args.dtype)
    rhs = jnp.asarray(rng.standard_normal((E, K, N), np.float32) / np.sqrt(K), args.dtype)

    impls = {}
    if not on_cpu or args.interpret:
        impls["jaxllm gmm (pallas)"] = functools.partial(gmm, impl="pallas")
    impls["jax.lax.ragged_dot"] = functools.partial(gmm, impl="xla")
    impls["per-group loop (ref)"] = gmm_loop

    device = jax.devices()[0]
    print(f"\n{device.platform} {device.device_kind} / {platform.processor() or platform.machine()}"
          f" x {os.cpu_count()} cores, jax {jax.__version__}; M={M} K={K} N={N} E={E}, "
          f"group sizes {int(group_sizes.min())}..{int(group_sizes.max())}, {args.dtype}; "
          f"TFLOP/s (median of {args.iters})")
    print(f"| {'implementation':<24} | {'forward':>10} | {'fwd+bwd':>10} |")
    print(f"|{'-' * 26}|{'-' * 12}|{'-' * 12}|")
    flops = 2 * M * K * N
    failures, ours_failed = Failures(), False
    for name, impl in impls.items():
        fwd = jax.jit(lambda a, b, impl=impl: impl(a, b, group_sizes))
        loss = lambda a, b, impl=impl: jnp.sum(impl(a, b, group_sizes).astype(jnp.float32))
        fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1)))
        cells = []
        for fn, scale, part in ((fwd, 1.0, "forward"), (fwd_bwd, 3.0, "fwd+bwd")):
            if cells and not is_number(cells[0]):
                cells.append(cells[0])  # what the forward could not do, fwd+bwd cannot either
                continue
            try:
                seconds = median_seconds(fn, lhs, rhs, warmup=args.warmup, iters=args.iters)
                cells.append(f"{flops * scale / seconds / 1e12:.3f}")
            except Exception as e:  # noqa: BLE001  out of memory or unsupported: say so
                cells.append(failures.cell(f"{name} {part}", e))
        ours_failed |= name.startswith("jaxllm") and not is_number(cells[1])
        print(f"| {name:<24} | {cells[0]:>10} | {cells[1]:>10} |", flush=True)
    failures.print()
    sys.exit(1 if ours_failed else 0)


if __name__ == "__main__":
    main()
