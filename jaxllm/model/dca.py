"""Dual Chunk Attention (DCA): attention past the trained length with relative positions kept
inside it, as Qwen2 runs 128K-token inputs without training on them.

Dimension letters (docs/glossary.md): c = chunk_size - local_size, DCA's chunk.

A token at position p (counted from its document's first token) is in chunk p // c; keys are
rotated at p mod c. A query attends to the keys of its own document in three parts, each with
its own query position:

| part        | keys (same document)             | query position                    |
|-------------|----------------------------------|-----------------------------------|
| intra-chunk | its own chunk, not after it      | p mod c                           |
| successive  | the chunk just before its own    | min(p mod c + c, chunk_size)      |
| inter-chunk | every chunk before that one      | min(2·c - 1, chunk_size), for all |

The parts merge by their log-sum-exp: exactly one softmax over all their scores. Each part is
kernel calls over the whole row whose segment ids are (document, chunk) for keys and
(document, chunk - d) for queries, d chunks back, one call per d; their number is fixed at
trace time by `max_position` (default S), which positions must stay below.
After vLLM's Qwen2 `DualChunkRotaryEmbedding`. Design notes: docs/long_context.md.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp

from jaxllm.kernels.attention import (
    ATTENTION_IMPLS,
    attention,
    merge_partial_attentions,
    resolve_attention_impl,
)

# Implementations whose `attention(..., return_lse=True)` gives the log-sum-exp DCA merges by.
LSE_IMPLS = ("xla", "chunked", "pallas")

Rope = Callable[[jax.Array, jax.Array], jax.Array]  # (x [B, L, heads, H], positions [B, L])


class DcaIndices(NamedTuple):
    """Rotary position indices of each part, and the chunk of every token."""

    q_intra_BxT: jax.Array
    q_succ_BxT: jax.Array
    q_inter_BxT: jax.Array
    k_BxS: jax.Array
    q_chunk_BxT: jax.Array
    k_chunk_BxS: jax.Array


def check_dca_settings(chunk_size: int, local_size: int, impl: str) -> str:
    """Raises ValueError naming the config key of a bad setting; returns the resolved impl."""
    if not 0 <= local_size < chunk_size:
        raise ValueError(f"model.dca.local_size={local_size} must be >= 0 and below "
                         f"model.dca.chunk_size={chunk_size} (chunks are chunk_size - "
                         "local_size positions long)")
    resolved = resolve_attention_impl(impl) if impl in ATTENTION_IMPLS else impl
    if resolved not in LSE_IMPLS:
        raise ValueError(f"model.attention_impl={impl!r} cannot run dual chunk attention, "
                         "which merges partial attentions by their log-sum-exp; use one of "
                         f"auto, {', '.join(LSE_IMPLS)}")
    return resolved


def dca_indices(q_positions_BxT: jax.Array, k_positions_BxS: jax.Array, *, chunk_size: int,
                local_size: int) -> DcaIndices:
    """The position indices of the module docstring's table, built from token positions."""
    c = chunk_size - local_size
    # Padding may carry negative positions; it is masked, so any index in range will do.
    q_pos_BxT = jnp.maximum(q_positions_BxT.astype(jnp.int32), 0)
    k_pos_BxS = jnp.maximum(k_positions_BxS.astype(jnp.int32), 0)
    q_intra_BxT = q_pos_BxT % c
    return DcaIndices(
        q_intra_BxT=q_intra_BxT,
        q_succ_BxT=jnp.minimum(q_intra_BxT + c, chunk_size),
        q_inter_BxT=jnp.full_like(q_intra_BxT, min(2 * c - 1, chunk_size)),
        k_BxS=k_pos_BxS % c,
        q_chunk_BxT=q_pos_BxT // c,
        k_chunk_BxS=k_pos_BxS // c)


def dca_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                  q_positions_BxT: jax.Array, k_positions_BxS: jax.Array,
                  q_segment_ids_BxT: jax.Array | None = None,
                  kv_segment_ids_BxS: jax.Array | None = None, *, chunk_size: int,
                  local_size: int, rope: Rope, impl: str = "auto", scale: float | None = None,
                  causal: bool = True, max_position: int | None = None,
                  return_lse: bool = False, block_sizes: dict | None = None,
                  attention_fn: Callable = attention):
    """Dual chunk attention of q, k, v given BEFORE rope; `rope(x, positions)` is the model's
    rotary embedding (YaRN or not) and is applied here with the DCA indices.

    Masks as jaxllm/kernels/mask.py, on top of the chunk parts: same segment, and with
    `causal` key index <= query index + S - T (queries are the last T of the S keys). Training
    and prefill: T == S, causal. A decode step of one query against a cache whose unwritten
    slots have segment id 0: causal=False, as jaxllm/model/attention.py does today.
    `attention_fn` is the kernel entry point (jaxllm.parallel.blocks.attention on a mesh).
    Returns out [B, T, N, H] in q's dtype, and with `return_lse` the merged lse [B, T, N].
    """
    impl = check_dca_settings(chunk_size, local_size, impl)
    B, T = q_BxTxNxH.shape[:2]
    S = k_BxSxKxH.shape[1]
    c = chunk_size - local_size
    num_chunks = -(-(max_position or max(S, T)) // c)
    idx = dca_indices(q_positions_BxT, k_positions_BxS, chunk_size=chunk_size,
                      local_size=local_size)
    if q_segment_ids_BxT is None:
        q_segment_ids_BxT = jnp.zeros((B, T), jnp.int32)
    if kv_segment_ids_BxS is None:
        kv_segment_ids_BxS = (q_segment_ids_BxT if T == S and q_segment_ids_BxT is not None
                              else jnp.zeros((B, S), jnp.int32))

    # id = document · stride + chunk: equal exactly when both are. Keys' chunks stay below
    # stride - 1, so chunk slot stride - 1 is free for queries with no chunk d back: their ids
    # match nothing yet stay inside their document's range (block skipping keeps working).
    stride = jnp.maximum(jnp.max(idx.q_chunk_BxT), jnp.max(idx.k_chunk_BxS)) + 2
    kv_ids_BxS = kv_segment_ids_BxS.astype(jnp.int32) * stride + idx.k_chunk_BxS

    def q_ids(d: int) -> jax.Array:
        """Ids that match the keys d chunks before each query's own chunk."""
        chunk_BxT = jnp.where(idx.q_chunk_BxT >= d, idx.q_chunk_BxT - d, stride - 1)
        return q_segment_ids_BxT.astype(jnp.int32) * stride + chunk_BxT

    k_rot_BxSxKxH = rope(k_BxSxKxH, idx.k_BxS)

    def part(q_rot_BxTxNxH: jax.Array, d: int) -> tuple[jax.Array, jax.Array]:
        """Attention of rotated queries to the keys d chunks back (d = 0: their own chunk)."""
        return attention_fn(q_rot_BxTxNxH, k_rot_BxSxKxH, v_BxSxKxH, q_ids(d), kv_ids_BxS,
                            impl=impl, causal=causal, scale=scale, return_lse=True,
                            block_sizes=block_sizes)

    parts = [part(rope(q_BxTxNxH, idx.q_intra_BxT), 0)]
    if num_chunks > 1:
        parts.append(part(rope(q_BxTxNxH, idx.q_succ_BxT), 1))
    if num_chunks > 2:
        # One rotation serves every inter-chunk call: its query index is a constant.
        q_inter_BxTxNxH = rope(q_BxTxNxH, idx.q_inter_BxT)
        parts += [part(q_inter_BxTxNxH, d) for d in range(2, num_chunks)]
    out_BxTxNxH, lse_BxTxN = merge_partial_attentions(parts)
    out_BxTxNxH = out_BxTxNxH.astype(q_BxTxNxH.dtype)
    return (out_BxTxNxH, lse_BxTxN) if return_lse else out_BxTxNxH
