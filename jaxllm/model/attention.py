"""Grouped-query self-attention with RoPE, causal and document (segment id) masking.

Dimension letters: B batch, T query length, S key length, D model dim, N query heads,
K kv heads, G = N / K query heads per kv head, H head dim.
Query head n uses kv head n // G, the Hugging Face `repeat_kv` order. The score computation
is chosen by `model.attention_impl` (auto, xla, chunked, pallas; see jaxllm/kernels).
"""

from __future__ import annotations

import jax
import ml_collections as mc
from flax import linen as nn

from jaxllm.kernels import attention
from jaxllm.model.layers import Linear, apply_rope


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          segment_ids_BxT: jax.Array, impl: str = "xla") -> jax.Array:
    """Causal, same-document attention by `impl` (see jaxllm/kernels/attention.py);
    'xla' is the plain float32 softmax over a T×S score matrix."""
    return attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, impl=impl, causal=True)


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
        out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT,
                                            cfg.attention_impl)
        return Linear((cfg.hidden_size,), ("heads", "head_dim", "embed"), cfg, n_in=2,
                      name="o_proj")(out_BxTxNxH)
