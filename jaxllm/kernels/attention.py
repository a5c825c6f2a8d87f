"""`attention`: one entry point for every attention implementation, picked by name.

Dimension letters (docs/glossary.md): B batch, T query length, S key length, N query heads, K kv
heads, G = N / K, H head dim.

| impl    | what runs                                              | memory      |
|---------|--------------------------------------------------------|-------------|
| xla     | flash_attention_ref: full [T, S] float32 scores         | O(N·T·S)    |
| chunked | chunked_attention: jnp blocks, online softmax          | O(N·T)      |
| pallas  | flash_attention: Pallas kernel for the backend (Triton | O(N·T)      |
|         | on NVIDIA GPU, Mosaic on TPU; interpreted on CPU)      |             |
| auto    | pallas on GPU and TPU, chunked on CPU (the platform of |             |
|         | the mesh being compiled for: kernels/platform.py)      |             |

These functions see whatever arrays they are given. On a mesh, call them through
jaxllm/parallel/blocks.py (the model does): XLA cannot partition a Pallas call, so without
that wrapper every device would run the kernel on the gathered global batch.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp

from jaxllm.kernels.chunked_attention import chunked_attention
from jaxllm.kernels.flash_attention_ref import attention_ref
from jaxllm.kernels.platform import traced_platform

ATTENTION_IMPLS = ("auto", "xla", "chunked", "pallas")
# `xla` materialises B·N·T·S float32 scores; past this it is refused rather than left to
# exhaust memory (a 32K-token row with 4 heads needs 16 GiB of scores alone).
XLA_SCORE_BYTES_LIMIT = 8 * 2**30


def resolve_attention_impl(impl: str, backend: str | None = None) -> str:
    """'auto' → the fastest implementation for `backend` (default: the platform traced for);
    other names pass through."""
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl {impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    if impl != "auto":
        return impl
    backend = backend or traced_platform()
    return "pallas" if backend in ("gpu", "cuda", "tpu") else "chunked"


def attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
              segment_ids_BxT: jax.Array | None = None,
              kv_segment_ids_BxS: jax.Array | None = None, *, impl: str = "auto",
              causal: bool = True, local_window: int | None = None,
              scale: float | None = None, return_lse: bool = False,
              block_sizes: dict | None = None):
    """Grouped-query attention; query head n reads kv head n // G. See mask.py for the mask.

    Returns out [B, T, N, H] in q's dtype, and with `return_lse` also the float32 natural-log
    log-sum-exp [B, T, N] of each row's scaled, masked scores (to merge partial attentions).
    `scale` defaults to H^-0.5; `block_sizes` overrides the implementation's block sizes
    (`block_q`, `block_k`, and for Pallas the backward blocks too).
    """
    impl = resolve_attention_impl(impl)
    kwargs = dict(causal=causal, local_window=local_window, scale=scale, return_lse=return_lse)
    if impl == "xla":
        B, T, N, _ = q_BxTxNxH.shape
        score_bytes = B * N * T * k_BxSxKxH.shape[1] * 4
        if score_bytes > XLA_SCORE_BYTES_LIMIT:
            raise ValueError(
                f"attention_impl='xla' would materialise {score_bytes / 2**30:.0f} GiB of "
                f"float32 scores [B={B}, N={N}, T={T}, S={k_BxSxKxH.shape[1]}] per layer (memory "
                "grows as T²); use attention_impl='auto' or 'chunked'")
        return attention_ref(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT,
                             kv_segment_ids_BxS, **kwargs)
    if impl == "chunked":
        return chunked_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT,
                                 kv_segment_ids_BxS, **kwargs, **(block_sizes or {}))
    from jaxllm.kernels.flash_attention import flash_attention

    return flash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT,
                           kv_segment_ids_BxS, **kwargs, block_sizes=block_sizes)


def merge_partial_attentions(parts: Sequence[tuple[jax.Array, jax.Array]]
                             ) -> tuple[jax.Array, jax.Array]:
    """Partial attentions of the same queries over disjoint keys, (out [B, T, N, H], lse
    [B, T, N]) each, → the attention over all their keys: out float32 and lse.

    A part whose row saw no key (lse -inf) has weight 0; a row no part saw stays out 0, lse
    -inf; every derivative stays finite (the shift m cancels and carries no gradient)."""
    m_BxTxN = jax.lax.stop_gradient(functools.reduce(jnp.maximum, [lse for _, lse in parts]))
    m_BxTxN = jnp.where(jnp.isneginf(m_BxTxN), 0.0, m_BxTxN)
    total_BxTxN = sum(jnp.exp(lse - m_BxTxN) for _, lse in parts)
    seen_BxTxN = total_BxTxN > 0
    lse_BxTxN = jnp.where(seen_BxTxN, m_BxTxN + jnp.log(jnp.where(seen_BxTxN, total_BxTxN, 1.0)),
                          -jnp.inf)
    safe_lse_BxTxN = jnp.where(seen_BxTxN, lse_BxTxN, 0.0)
    out_BxTxNxH = sum(out.astype(jnp.float32) * jnp.exp(lse - safe_lse_BxTxN)[..., None]
                      for out, lse in parts)
    return out_BxTxNxH, lse_BxTxN
