"""Grouped-query self-attention with RoPE, causal and document (segment id) masking.

Dimension letters: B batch, T query length, S key length, D model dim, N query heads,
K kv heads, G = N / K query heads per kv head, H head dim.
Query head n uses kv head n // G, the Hugging Face `repeat_kv` order.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mc
from flax import linen as nn

from jaxllm.model.layers import Linear, apply_rope

_MASKED = -1e30  # finite, so a fully masked row cannot produce NaN


def attention_mask(segment_ids_BxT: jax.Array) -> jax.Array:
    """[B, 1, 1, T, S] bool: causal and within one packed document."""
    T = segment_ids_BxT.shape[1]
    causal_TxS = jnp.arange(T)[:, None] >= jnp.arange(T)[None, :]
    same_doc_BxTxS = segment_ids_BxT[:, :, None] == segment_ids_BxT[:, None, :]
    return (causal_TxS[None] & same_doc_BxTxS)[:, None, None]


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          segment_ids_BxT: jax.Array) -> jax.Array:
    """Plain softmax attention in float32 with a T×S score matrix (attention_impl='xla')."""
    B, T, N, H = q_BxTxNxH.shape
    K = k_BxSxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(B, T, K, N // K, H)
    scores_BxKxGxTxS = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH, k_BxSxKxH,
                                  preferred_element_type=jnp.float32) / jnp.sqrt(jnp.float32(H))
    scores_BxKxGxTxS = jnp.where(attention_mask(segment_ids_BxT), scores_BxKxGxTxS, _MASKED)
    probs_BxKxGxTxS = jax.nn.softmax(scores_BxKxGxTxS, axis=-1).astype(v_BxSxKxH.dtype)
    out_BxTxKxGxH = jnp.einsum("bkgts,bskh->btkgh", probs_BxKxGxTxS, v_BxSxKxH)
    return out_BxTxKxGxH.reshape(B, T, N, H)


class Attention(nn.Module):
    cfg: mc.FrozenConfigDict

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array,
                 segment_ids_BxT: jax.Array) -> jax.Array:
        cfg = self.cfg

        def project(heads: int, head_axis: str, name: str) -> jax.Array:
            return Linear((heads, cfg.head_dim), ("embed", head_axis, "head_dim"), cfg,
                          use_bias=cfg.qkv_bias, name=name)(x_BxTxD)

        q_BxTxNxH = project(cfg.num_heads, "heads", "q_proj")
        k_BxTxKxH = project(cfg.num_kv_heads, "kv_heads", "k_proj")
        v_BxTxKxH = project(cfg.num_kv_heads, "kv_heads", "v_proj")
        q_BxTxNxH = apply_rope(q_BxTxNxH, positions_BxT, cfg.rope_theta)
        k_BxTxKxH = apply_rope(k_BxTxKxH, positions_BxT, cfg.rope_theta)
        q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, ("batch", "length", "heads", "head_dim"))
        out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
        return Linear((cfg.hidden_size,), ("heads", "head_dim", "embed"), cfg, n_in=2,
                      name="o_proj")(out_BxTxNxH)
