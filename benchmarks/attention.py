"""Attention throughput: jaxllm's implementations vs XLA attention vs jax.nn (cuDNN on GPU).

    python -m benchmarks.attention [--seq_lens=2048,8192,32768] [--batch=1] [--heads=32]
                                   [--kv_heads=4] [--head_dim=128] [--dtype=bfloat16]

Causal self-attention, grouped-query (heads / kv_heads query heads per kv head), one
document per row. Prints TFLOP/s of the forward and of forward+backward (gradients of q, k,
v), counting the causal half of the matmuls only: forward 2·2·B·N·T²·H / 2, backward 2.5×
the forward (five matmuls to two). A cell that cannot run says why (`OOM`, or the exception's
type) and the reasons follow the table; the exit status is 1 only if one of jaxllm's own
implementations failed (the XLA peers run out of memory at 32K by design: T² scores).

Defaults follow the device: on GPU/TPU the sizes above in bf16 (Pallas kernel vs
`attention_ref` in XLA vs `jax.nn.dot_product_attention`, cuDNN on GPU); on CPU small sizes
in float32 with the chunked jnp path vs XLA (Pallas only runs interpreted there, and only with
--interpret, at toy sizes). The `fastest` line is what `attention_impl='auto'` should pick.
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
from jaxllm.kernels.chunked_attention import chunked_attention
from jaxllm.kernels.flash_attention import flash_attention
from jaxllm.kernels.flash_attention_ref import attention_ref


def jax_nn(q, k, v, implementation):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation=implementation)


def implementations(backend: str, interpret: bool) -> dict:
    """Ours first, then the peers; the chunked jnp path last, being the slowest on a GPU (a
    run cut short by a time limit loses the least)."""
    impls = {}
    if backend != "cpu":
        impls["jaxllm pallas"] = functools.partial(flash_attention, causal=True)
    elif interpret:
        impls["jaxllm pallas (interpret)"] = functools.partial(flash_attention, causal=True,
                                                               interpret=True)
    impls["xla (attention_ref)"] = functools.partial(attention_ref, causal=True)
    if backend == "gpu":
        impls["jax.nn cudnn"] = functools.partial(jax_nn, implementation="cudnn")
    impls["jax.nn xla"] = functools.partial(jax_nn, implementation="xla")
    impls["jaxllm chunked (jnp)"] = functools.partial(chunked_attention, causal=True)
    return impls


def measure(impl, q, k, v, warmup: int, iters: int, where: str,
            failures: Failures) -> tuple[str, str]:
    fwd = jax.jit(impl)
    loss = lambda q, k, v: jnp.sum(impl(q, k, v).astype(jnp.float32))
    fwd_bwd = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    B, T, N, H = q.shape
    flops = 2 * 2 * B * N * T * T * H / 2
    cells = []
    for fn, scale, part in ((fwd, 1.0, "forward"), (fwd_bwd, 3.5, "fwd+bwd")):
        if cells and not is_number(cells[0]):
            cells.append(cells[0])  # what the forward could not do, fwd+bwd cannot either
            continue
        try:
            seconds = median_seconds(fn, q, k, v, warmup=warmup, iters=iters)
            cells.append(f"{flops * scale / seconds / 1e12:.3f}")
        except Exception as e:  # noqa: BLE001  out of memory, refused, unsupported: say so
            cells.append(failures.cell(f"T={T} {where} {part}", e))
    return cells[0], cells[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    backend = jax.default_backend()
    on_cpu = backend == "cpu"
    parser.add_argument("--seq_lens", default="512,2048,4096" if on_cpu else "2048,8192,32768")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=8 if on_cpu else 32)
    parser.add_argument("--kv_heads", type=int, default=1 if on_cpu else 4)
    parser.add_argument("--head_dim", type=int, default=64 if on_cpu else 128)
    add_kernel_args(parser, on_cpu)
    args = parser.parse_args()

    impls = implementations(backend, args.interpret)
    device = jax.devices()[0]
    print(f"\n{device.platform} {device.device_kind} / {platform.processor() or platform.machine()}"
          f" x {os.cpu_count()} cores, jax {jax.__version__}; causal, B={args.batch}, "
          f"N={args.heads}, K={args.kv_heads} (GQA {args.heads // args.kv_heads}:1), "
          f"H={args.head_dim}, {args.dtype}; TFLOP/s (median of {args.iters})")
    print(f"| {'T':>6} | {'implementation':<26} | {'forward':>10} | {'fwd+bwd':>10} |")
    print(f"|{'-' * 8}|{'-' * 28}|{'-' * 12}|{'-' * 12}|")
    rng = np.random.default_rng(0)
    failures, ours_failed = Failures(), False
    for T in map(int, args.seq_lens.split(",")):
        shape_q = (args.batch, T, args.heads, args.head_dim)
        shape_kv = (args.batch, T, args.kv_heads, args.head_dim)
        q, k, v = (jnp.asarray(rng.standard_normal(s, np.float32), args.dtype)
                   for s in (shape_q, shape_kv, shape_kv))
        best = (0.0, "")
        for name, impl in impls.items():
            fwd, fwd_bwd = measure(impl, q, k, v, args.warmup, args.iters, name, failures)
            print(f"| {T:>6} | {name:<26} | {fwd:>10} | {fwd_bwd:>10} |", flush=True)
            if is_number(fwd_bwd):
                best = max(best, (float(fwd_bwd), name))
            ours_failed |= name.startswith("jaxllm") and not is_number(fwd_bwd)
        print(f"| {T:>6} | {'fastest fwd+bwd: ' + (best[1] or 'none ran'):<52} |", flush=True)
        del q, k, v
    failures.print()
    sys.exit(1 if ours_failed else 0)


if __name__ == "__main__":
    main()
