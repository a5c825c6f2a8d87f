"""Attention and grouped-matmul kernels: Pallas for GPU/TPU, each with a pure-jnp reference.

See attention.py for `attention_impl` and gmm.py for `moe_impl`.
"""

from jaxllm.kernels.attention import ATTENTION_IMPLS, attention, resolve_attention_impl
from jaxllm.kernels.gmm import MOE_IMPLS, gmm, resolve_moe_impl, tgmm

__all__ = ["ATTENTION_IMPLS", "MOE_IMPLS", "attention", "gmm", "resolve_attention_impl",
           "resolve_moe_impl", "tgmm"]
