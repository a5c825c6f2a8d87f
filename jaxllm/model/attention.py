"""Grouped-query self-attention with RoPE, causal and document (segment id) masking.

Dimension letters (docs/glossary.md): B batch, T query length, S key length, D model dim, N
query heads, K kv heads, G = N / K query heads per kv head, H head dim. Query head n uses kv
head n // G, the Hugging Face `repeat_kv` order. The score computation is chosen by
`model.attention_impl` (auto, xla, chunked, pallas; see jaxllm/kernels), and runs per device on
a mesh (jaxllm/parallel/blocks.py); this layer only names logical axes.

Decoding (jaxllm/model/decode.py) passes this layer's KV cache, k and v [B, S, K, H], and what all
layers share: the cache's segment ids [B, S] with this call's tokens already written (0 marks
padding and unwritten slots) and the slot `index` the tokens go to. Several tokens are a
prefill of the empty cache: they attend to each other, by `attention_impl`. One token is a
decode step: it attends to every written slot of the same segment, so no causal mask is needed
(later slots are not written yet), and its [1, S] scores are small enough for plain jnp.

With `model.dca.enabled` (dual chunk attention, jaxllm/model/dca.py) rope is applied inside the
attention at DCA's position indices: q and k go in before rope, and the cache holds keys
before rope. A cache slot's position is the number of written slots before it (prompts are
left-padded, one document per row, as jaxllm/model/decode.py lays them out).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import ml_collections as mc
from flax import linen as nn

from jaxllm.model.dca import dca_attention
from jaxllm.model.layers import Linear, rope
from jaxllm.parallel.blocks import attention


def dot_product_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                          segment_ids_BxT: jax.Array, impl: str = "xla") -> jax.Array:
    """Causal, same-document attention by `impl` (see jaxllm/kernels/attention.py);
    'xla' is the plain float32 softmax over a T×S score matrix."""
    return attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, impl=impl, causal=True)


def write_cache(kv: tuple[jax.Array, jax.Array], kv_meta: tuple[jax.Array, jax.Array],
                k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The cache (k, v) [B, S, K, H] with this call's keys and values written at slot
    `index` (kv_meta's second entry)."""
    index = kv_meta[1]
    return tuple(jax.lax.dynamic_update_slice(cache, new.astype(cache.dtype), (0, index, 0, 0))
                 for cache, new in zip(kv, (k_BxTxKxH, v_BxTxKxH), strict=True))


def cached_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                     segment_ids_BxT: jax.Array, kv: tuple[jax.Array, jax.Array],
                     kv_meta: tuple[jax.Array, jax.Array], impl: str
                     ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """Writes k, v into the cache at slot `index`, then attends (see the module docstring).
    Returns out [B, T, N, H] and the cache (k, v) [B, S, K, H]."""
    k_BxSxKxH, v_BxSxKxH = write_cache(kv, kv_meta, k_BxTxKxH, v_BxTxKxH)
    kv_segment_ids_BxS = kv_meta[0]
    if q_BxTxNxH.shape[1] > 1:  # prefill of the empty cache: the prompt attends to itself
        out_BxTxNxH = dot_product_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT,
                                            impl)
    else:
        dtype = q_BxTxNxH.dtype
        out_BxTxNxH = attention(q_BxTxNxH, k_BxSxKxH.astype(dtype), v_BxSxKxH.astype(dtype),
                                segment_ids_BxT, kv_segment_ids_BxS, impl="xla", causal=False)
    return out_BxTxNxH, (k_BxSxKxH, v_BxSxKxH)


def cached_dca_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                         positions_BxT: jax.Array, segment_ids_BxT: jax.Array,
                         kv: tuple[jax.Array, jax.Array], kv_meta: tuple[jax.Array, jax.Array],
                         dca) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """`cached_attention` with dual chunk attention `dca`: q, k and the cache before rope."""
    k_BxSxKxH, v_BxSxKxH = write_cache(kv, kv_meta, k_BxTxKxH, v_BxTxKxH)
    kv_segment_ids_BxS = kv_meta[0]
    if q_BxTxNxH.shape[1] > 1:  # prefill of the empty cache: the prompt attends to itself
        out_BxTxNxH = dca(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, positions_BxT, positions_BxT,
                          segment_ids_BxT, segment_ids_BxT)
    else:
        dtype = q_BxTxNxH.dtype
        k_positions_BxS = jnp.cumsum(kv_segment_ids_BxS > 0, axis=1, dtype=jnp.int32) - 1
        out_BxTxNxH = dca(q_BxTxNxH, k_BxSxKxH.astype(dtype), v_BxSxKxH.astype(dtype),
                          positions_BxT, k_positions_BxS, segment_ids_BxT, kv_segment_ids_BxS,
                          impl="xla", causal=False)
    return out_BxTxNxH, (k_BxSxKxH, v_BxSxKxH)


class Attention(nn.Module):
    cfg: mc.FrozenConfigDict

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array, positions_BxT: jax.Array, segment_ids_BxT: jax.Array,
                 kv: tuple[jax.Array, jax.Array] | None = None,
                 kv_meta: tuple[jax.Array, jax.Array] | None = None
                 ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
        """Returns the output [B, T, D] and, when given a cache `kv`, the updated cache."""
        cfg = self.cfg

        def project(heads: int, head_axis: str, name: str) -> jax.Array:
            return Linear((heads, cfg.head_dim), ("embed", head_axis, "head_dim"), cfg,
                          use_bias=cfg.qkv_bias, name=name)(x_BxTxD)

        q_BxTxNxH = project(cfg.num_heads, "heads", "q_proj")
        k_BxTxKxH = project(cfg.num_kv_heads, "kv_heads", "k_proj")
        v_BxTxKxH = project(cfg.num_kv_heads, "kv_heads", "v_proj")
        rotate = rope(cfg)
        q_BxTxNxH = nn.with_logical_constraint(q_BxTxNxH, ("batch", "length", "heads", "head_dim"))
        if cfg.dca.enabled:  # rope inside, at DCA's indices (config refuses logn, dynamic_ntk)
            dca = functools.partial(
                dca_attention, chunk_size=cfg.dca.chunk_size, local_size=cfg.dca.local_size,
                rope=rotate, impl=cfg.attention_impl,
                attention_fn=attention)
            if kv is None:
                out_BxTxNxH = dca(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, positions_BxT, positions_BxT,
                                  segment_ids_BxT, segment_ids_BxT)
            else:
                out_BxTxNxH, kv = cached_dca_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH,
                                                       positions_BxT, segment_ids_BxT, kv,
                                                       kv_meta, dca)
        elif kv is None:
            out_BxTxNxH = dot_product_attention(
                rotate(q_BxTxNxH, positions_BxT, query=True), rotate(k_BxTxKxH, positions_BxT),
                v_BxTxKxH, segment_ids_BxT, cfg.attention_impl)
        else:
            out_BxTxNxH, kv = cached_attention(
                rotate(q_BxTxNxH, positions_BxT, query=True), rotate(k_BxTxKxH, positions_BxT),
                v_BxTxKxH, segment_ids_BxT, kv, kv_meta, cfg.attention_impl)
        out_BxTxD = Linear((cfg.hidden_size,), ("heads", "head_dim", "embed"), cfg, n_in=2,
                           name="o_proj")(out_BxTxNxH)
        return out_BxTxD, kv
