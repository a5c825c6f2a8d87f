"""What each Pallas kernel declares it costs (`pl.CostEstimate`): XLA schedules around a
kernel by it, and jaxllm.compile counts a step's FLOPs with it.

Attention counts every (query, key) pair, PaLM's convention and the model's
(metrics.flops_per_token), though causal and document masks let the kernels skip blocks;
each [T, S] × H matmul is 2·B·N·T·S·H FLOPs: the forward does two (scores, p·v), the dQ
kernel three (scores, dp, dq), the dK/dV kernel four (scores, dp, dk, dv).
"""

from __future__ import annotations

import math

import jax
from jax.experimental import pallas as pl


def _bytes(*arrays) -> int:
    return sum(math.prod(x.shape) * x.dtype.itemsize for x in arrays if x is not None)


def attention_cost(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, matmuls: int,
                   *operands) -> pl.CostEstimate:
    B, T, N, H = q_BxTxNxH.shape
    S = k_BxSxKxH.shape[1]
    return pl.CostEstimate(flops=2 * matmuls * B * N * T * S * H,
                           transcendentals=B * N * T * S, bytes_accessed=_bytes(*operands))


def matmul_cost(M: int, K: int, N: int, *operands) -> pl.CostEstimate:
    """A grouped matmul: each of M rows meets one group's [K, N] block."""
    return pl.CostEstimate(flops=2 * M * K * N, transcendentals=0,
                           bytes_accessed=_bytes(*operands))
