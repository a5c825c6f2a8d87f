"""Reference attention in plain jnp: the whole [T, S] score matrix, float32 softmax.

Dimension letters (docs/glossary.md): B batch, T query length, S key length, N query heads, K kv
heads, G = N / K query heads per kv head, H head dim. Query head n uses kv head n // G.

This is the definition every fast path (chunked jnp, Pallas GPU, Pallas TPU) is tested
against, and it is what `attention_impl='xla'` runs. Memory is O(B·N·T·S): at T = 32K that is
4 GiB per head, so long sequences must use another implementation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.kernels.mask import MaskSpec


def attention_ref(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                  segment_ids_BxT: jax.Array | None = None,
                  kv_segment_ids_BxS: jax.Array | None = None, *, causal: bool = True,
                  local_window: int | None = None, scale: float | None = None,
                  return_lse: bool = False):
    """Softmax(q·kᵀ·scale + mask)·v; returns out [B,T,N,H] (q's dtype), and lse [B,T,N]
    (float32, natural log) when `return_lse`. Fully masked rows give 0 and lse -inf."""
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    scale = H ** -0.5 if scale is None else scale
    if segment_ids_BxT is not None and kv_segment_ids_BxS is None:
        kv_segment_ids_BxS = segment_ids_BxT
    spec = MaskSpec(causal=causal, local_window=local_window, q_offset=S - T)

    # [B, K, G, T, H] first: the einsums' natural output order, so no T×S transpose.
    q_BxKxGxTxH = q_BxTxNxH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)
    s_BxKxGxTxS = jnp.einsum("bkgth,bskh->bkgts", q_BxKxGxTxH, k_BxSxKxH,
                             preferred_element_type=jnp.float32) * jnp.float32(scale)
    q_seg = None if segment_ids_BxT is None else segment_ids_BxT[:, None, None, :, None]
    kv_seg = None if kv_segment_ids_BxS is None else kv_segment_ids_BxS[:, None, None, None, :]
    mask = spec.visible(jnp.arange(T)[:, None], jnp.arange(S)[None, :], q_seg, kv_seg)
    if mask is not None:
        s_BxKxGxTxS = jnp.where(mask, s_BxKxGxTxS, -jnp.inf)
    # The softmax does not depend on the shift, so it carries no gradient.
    m_BxKxGxT = jax.lax.stop_gradient(jnp.max(s_BxKxGxTxS, axis=-1))
    m_BxKxGxT = jnp.where(jnp.isfinite(m_BxKxGxT), m_BxKxGxT, 0.0)
    p_BxKxGxTxS = jnp.exp(s_BxKxGxTxS - m_BxKxGxT[..., None])
    l_BxKxGxT = jnp.sum(p_BxKxGxTxS, axis=-1)
    p_BxKxGxTxS = p_BxKxGxTxS / jnp.where(l_BxKxGxT == 0, 1.0, l_BxKxGxT)[..., None]
    out_BxKxGxTxH = jnp.einsum("bkgts,bskh->bkgth", p_BxKxGxTxS,
                               v_BxSxKxH.astype(jnp.float32))
    out_BxTxNxH = out_BxKxGxTxH.transpose(0, 3, 1, 2, 4).reshape(B, T, N, H)
    out_BxTxNxH = out_BxTxNxH.astype(q_BxTxNxH.dtype)
    if not return_lse:
        return out_BxTxNxH
    lse_BxKxGxT = m_BxKxGxT + jnp.log(l_BxKxGxT)
    return out_BxTxNxH, lse_BxKxGxT.reshape(B, N, T).transpose(0, 2, 1)
