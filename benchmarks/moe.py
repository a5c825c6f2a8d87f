"""MoE layer throughput: jaxllm.parallel.experts dispatch (dropless by gmm, with capacity) vs a
dense SwiGLU with the same active parameters.

    python -m benchmarks.moe [--tokens=4096] [--hidden=256] [--experts=8] [--top_k=2]
                             [--moe_dim=256] [--capacity_factor=1.25] [--dtype=float32]

One layer, forward and backward (gradients of x, the router and the expert weights) of
sum(y²): the router (x @ router, `experts.route`) then `experts.experts_ffn`. Rows:

  dropless pallas     sorted copies through jaxllm's grouped-matmul kernel (interpreted on CPU)
  dropless xla        the same with jax.lax.ragged_dot
  capacity            capacity_factor slots per expert, dense einsums over [E, Ec, D] (the path
                      experts.py takes)
  capacity gmm        the same slots through the Pallas gmm instead (the choice experts.py
                      did not make; here to show why)
  dense               SwiGLU of width top_k · moe_dim: the FLOPs of the active experts, no dispatch

Prints the machine and one markdown table: median ms per step, tokens per second and the
ratio of tokens per second to the dense layer's. A variant that fails gets a row saying why
and the reasons follow the table; the exit status is then 1.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.timing import Failures, is_number, median_seconds
from jaxllm.parallel import experts


def moe_loss(impl: str, capacity_factor: float, top_k: int):
    def loss(x_BTxD, params):
        router_DxE, gate_ExDxFe, up_ExDxFe, down_ExFexD = params
        x_1xBTxD = x_BTxD[None]
        _, weights_1xBTxk, experts_1xBTxk = experts.route(x_1xBTxD @ router_DxE, top_k, True)
        y_1xBTxD, _ = experts.experts_ffn(x_1xBTxD, weights_1xBTxk, experts_1xBTxk, gate_ExDxFe,
                                          up_ExDxFe, down_ExFexD, impl=impl,
                                          capacity_factor=capacity_factor)
        return jnp.sum(jnp.square(y_1xBTxD.astype(jnp.float32)))
    return loss


def dense_loss(x_BTxD, params):
    gate_DxF, up_DxF, down_FxD = params
    h_BTxF = jax.nn.silu(x_BTxD @ gate_DxF) * (x_BTxD @ up_DxF)
    return jnp.sum(jnp.square((h_BTxF @ down_FxD).astype(jnp.float32)))


def slots_by_gmm(x_ExEcxD, gate_ExDxFe, up_ExDxFe, down_ExFexD):
    """experts.batched_ffn through the Pallas gmm: E groups of Ec rows each."""
    E, Ec, D = x_ExEcxD.shape
    sizes_E = jnp.full((E,), Ec, jnp.int32)
    y_MxD = experts.grouped_ffn(x_ExEcxD.reshape(E * Ec, D), sizes_E, gate_ExDxFe, up_ExDxFe,
                                down_ExFexD, "pallas")
    return y_MxD.reshape(E, Ec, D)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top_k", type=int, default=2)
    parser.add_argument("--moe_dim", type=int, default=256)
    parser.add_argument("--capacity_factor", type=float, default=1.25)
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--iters", type=int, default=3)
    args = parser.parse_args()

    BT, D, E, k, Fe = args.tokens, args.hidden, args.experts, args.top_k, args.moe_dim
    rng = np.random.default_rng(0)
    normal = lambda *shape: jnp.asarray(  # noqa: E731
        rng.standard_normal(shape, np.float32) / np.sqrt(shape[-2]), args.dtype)
    x_BTxD = jnp.asarray(rng.standard_normal((BT, D), np.float32), args.dtype)
    moe_params = (normal(D, E), normal(E, D, Fe), normal(E, D, Fe), normal(E, Fe, D))
    dense_params = (normal(D, k * Fe), normal(D, k * Fe), normal(k * Fe, D))
    cf = args.capacity_factor
    variants = {
        "dense SwiGLU (F=k·Fe)": (dense_loss, dense_params, None),
        "dropless pallas": (moe_loss("pallas", 0.0, k), moe_params, None),
        "dropless xla": (moe_loss("xla", 0.0, k), moe_params, None),
        f"capacity {cf} (einsum)": (moe_loss("auto", cf, k), moe_params, None),
        f"capacity {cf} (gmm)": (moe_loss("auto", cf, k), moe_params, slots_by_gmm),
    }

    device = jax.devices()[0]
    print(f"\n{device.platform} {device.device_kind} / {platform.processor() or platform.machine()}"
          f" x {os.cpu_count()} cores, jax {jax.__version__}; BT={BT} D={D} E={E} k={k} Fe={Fe}, "
          f"{args.dtype}; forward+backward, median of {args.iters}")
    print(f"| {'variant':<24} | {'ms/step':>9} | {'tokens/s':>9} | {'vs dense':>8} |")
    print(f"|{'-' * 26}|{'-' * 11}|{'-' * 11}|{'-' * 10}|", flush=True)
    failures, dense_tps, failed = Failures(), None, False
    for name, (loss, params, batched) in variants.items():
        step = jax.jit(jax.grad(loss, argnums=(0, 1)))
        try:
            with mock.patch.object(experts, "batched_ffn", batched or experts.batched_ffn):
                seconds = median_seconds(step, x_BTxD, params, warmup=args.warmup,
                                         iters=args.iters)
            ms, tps = f"{seconds * 1e3:.1f}", BT / seconds
            dense_tps = dense_tps or tps
            cells = (ms, f"{tps:.0f}", f"{tps / dense_tps:.2f}")
        except Exception as e:  # noqa: BLE001  say why, then go on
            cells = (failures.cell(name, e),) * 3
        failed |= not is_number(cells[0])
        print(f"| {name:<24} | {cells[0]:>9} | {cells[1]:>9} | {cells[2]:>8} |", flush=True)
    failures.print()
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
