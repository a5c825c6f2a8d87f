"""Flash attention forward and backward as Pallas kernels for NVIDIA GPUs (Triton lowering).

Dimension letters (docs/glossary.md): B batch, T query length (padded to the query block), S key
length (padded to the key block), N query heads, K kv heads, G = N / K, H head dim (a power of
two ≥ 16, padded by the caller); Q and C are query and key block sizes.

Layout is the model's [B, T, N, H] / [B, S, K, H]: no transposes. Grouped-query attention is
an index map: the forward and dQ programs of query head n take kv head n // G as their K/V
block, and the dK/dV program of kv head k walks its G query heads itself, so K and V are
never repeated in memory and dK/dV need no reduction afterwards. Scores are float32 in the
log2 domain (exp2 is the native instruction); bf16 operands feed the tensor cores with
float32 accumulation. Causal and local-window masks bound the block loops
(MaskSpec.kv_block_range / q_block_range), so fully masked blocks are never loaded, and a
cond skips block pairs from different packed documents (disjoint segment-id ranges).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.kernels.cost import attention_cost
from jaxllm.kernels.mask import MASK_VALUE

LOG2E = math.log2(math.e)


def _masked_scores(cfg, q_QxH, k_CxH, i, j, block_q, block_k, q_seg_Q, kv_seg_ref):
    """float32 scores of query block i against key block j, in the log2 domain."""
    s_QxC = plgpu.dot(q_QxH, k_CxH, trans_b=True) * (cfg.scale * LOG2E)
    q_index = i * block_q + jnp.arange(block_q)
    k_index = j * block_k + jnp.arange(block_k)
    q_seg = kv_seg = None
    if q_seg_Q is not None:
        q_seg, kv_seg = q_seg_Q[:, None], kv_seg_ref[pl.ds(j * block_k, block_k)][None, :]
    mask = cfg.mask.visible(q_index[:, None], k_index[None, :], q_seg, kv_seg)
    return s_QxC if mask is None else jnp.where(mask, s_QxC, MASK_VALUE)


def _unless_other_document(q_seg_Q, kv_seg_C, visit, carry):
    """visit(carry), skipped when the two blocks' segment-id ranges are disjoint (packed
    documents: most block pairs of a long row belong to different documents)."""
    if q_seg_Q is None:
        return visit(carry)
    overlap = ((jnp.min(q_seg_Q) <= jnp.max(kv_seg_C)) & (jnp.min(kv_seg_C) <= jnp.max(q_seg_Q)))
    return jax.lax.cond(overlap, visit, lambda c: c, carry)


def _split_refs(refs, n_in: int, has_segments: bool):
    ins, outs = list(refs[:n_in]), refs[n_in:]
    segs = (ins.pop(), ins.pop())[::-1] if has_segments else (None, None)
    return ins, segs, outs


def _forward_kernel(*refs, cfg, block_q, block_k, num_k_blocks, has_segments):
    (q_ref, k_ref, v_ref), (q_seg_ref, kv_seg_ref), (o_ref, lse_ref) = _split_refs(
        refs, 3 + 2 * has_segments, has_segments)
    i = pl.program_id(0)
    q_QxH = q_ref[...]
    q_seg_Q = q_seg_ref[...] if has_segments else None

    def visit(j, carry):
        acc_QxH, m_Q, l_Q = carry
        k_slice = pl.ds(j * block_k, block_k)
        s_QxC = _masked_scores(cfg, q_QxH, k_ref[k_slice, :], i, j, block_q, block_k,
                               q_seg_Q, kv_seg_ref)
        m_new = jnp.maximum(m_Q, jnp.max(s_QxC, axis=1))
        alpha = jnp.exp2(m_Q - m_new)
        p_QxC = jnp.exp2(s_QxC - m_new[:, None])
        v_CxH = v_ref[k_slice, :]
        acc_QxH = acc_QxH * alpha[:, None] + plgpu.dot(p_QxC.astype(v_CxH.dtype), v_CxH)
        return acc_QxH, m_new, l_Q * alpha + jnp.sum(p_QxC, axis=1)

    def body(j, carry):
        kv_seg_C = kv_seg_ref[pl.ds(j * block_k, block_k)] if has_segments else None
        return _unless_other_document(q_seg_Q, kv_seg_C, functools.partial(visit, j), carry)

    init = (jnp.zeros(q_QxH.shape, jnp.float32), jnp.full((block_q,), MASK_VALUE, jnp.float32),
            jnp.zeros((block_q,), jnp.float32))
    lo, hi = cfg.mask.kv_block_range(i, block_q, block_k, num_k_blocks)
    acc_QxH, m_Q, l_Q = jax.lax.fori_loop(lo, hi, body, init)
    seen = m_Q > 0.5 * MASK_VALUE  # rows that saw no key keep the initial max
    l_safe = jnp.where(seen, l_Q, 1.0)
    o_ref[...] = jnp.where(seen[:, None], acc_QxH / l_safe[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m_Q + jnp.log2(l_safe)) / LOG2E, -jnp.inf)


def forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_seg_BxT, kv_seg_BxS, cfg, blocks, interpret):
    """Returns out [B, T, N, H] and lse [B, N, T] (float32, natural log)."""
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    G, bq, bk = N // K, blocks.block_q, blocks.block_k
    has_segments = q_seg_BxT is not None
    in_specs = [pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0)),
                pl.BlockSpec((None, S, None, H), lambda i, b, n: (b, 0, n // G, 0)),
                pl.BlockSpec((None, S, None, H), lambda i, b, n: (b, 0, n // G, 0))]
    args = [q_BxTxNxH, k_BxSxKxH, v_BxSxKxH]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, n: (b, i)),
                     pl.BlockSpec((None, S), lambda i, b, n: (b, 0))]
        args += [q_seg_BxT, kv_seg_BxS]
    kernel = functools.partial(_forward_kernel, cfg=cfg, block_q=bq, block_k=bk,
                               num_k_blocks=S // bk, has_segments=has_segments)
    return pl.pallas_call(
        kernel, grid=(T // bq, B, N), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0)),
                   pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))],
        out_shape=[jax.ShapeDtypeStruct(q_BxTxNxH.shape, q_BxTxNxH.dtype),
                   jax.ShapeDtypeStruct((B, N, T), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=blocks.num_warps,
                                             num_stages=blocks.num_stages),
        cost_estimate=attention_cost(q_BxTxNxH, k_BxSxKxH, 2, *args),
        interpret=interpret, name="flash_attention_fwd")(*args)


def _dq_kernel(*refs, cfg, block_q, block_k, num_k_blocks, has_segments):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (q_seg_ref, kv_seg_ref), (dq_ref,) = (
        _split_refs(refs, 6 + 2 * has_segments, has_segments))
    i = pl.program_id(0)
    q_QxH, do_QxH = q_ref[...], do_ref[...]
    lse2_Q, delta_Q = lse_ref[...] * LOG2E, delta_ref[...]
    q_seg_Q = q_seg_ref[...] if has_segments else None

    def visit(j, dq_QxH):
        k_slice = pl.ds(j * block_k, block_k)
        k_CxH, v_CxH = k_ref[k_slice, :], v_ref[k_slice, :]
        s_QxC = _masked_scores(cfg, q_QxH, k_CxH, i, j, block_q, block_k, q_seg_Q, kv_seg_ref)
        p_QxC = jnp.exp2(s_QxC - lse2_Q[:, None])
        ds_QxC = p_QxC * (plgpu.dot(do_QxH, v_CxH, trans_b=True) - delta_Q[:, None])
        return dq_QxH + plgpu.dot(ds_QxC.astype(k_CxH.dtype), k_CxH)

    def body(j, dq_QxH):
        kv_seg_C = kv_seg_ref[pl.ds(j * block_k, block_k)] if has_segments else None
        return _unless_other_document(q_seg_Q, kv_seg_C, functools.partial(visit, j), dq_QxH)

    lo, hi = cfg.mask.kv_block_range(i, block_q, block_k, num_k_blocks)
    dq_QxH = jax.lax.fori_loop(lo, hi, body, jnp.zeros(q_QxH.shape, jnp.float32))
    dq_ref[...] = (dq_QxH * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg, block_q, block_k, num_q_blocks, groups, has_segments):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (q_seg_ref, kv_seg_ref), outs = (
        _split_refs(refs, 6 + 2 * has_segments, has_segments))
    dk_ref, dv_ref = outs
    j = pl.program_id(0)
    k_CxH, v_CxH = k_ref[...], v_ref[...]
    kv_seg_C = kv_seg_ref[pl.ds(j * block_k, block_k)] if has_segments else None
    lo, hi = cfg.mask.q_block_range(j, block_k, block_q, num_q_blocks)
    dk_CxH = jnp.zeros(k_CxH.shape, jnp.float32)
    dv_CxH = jnp.zeros(v_CxH.shape, jnp.float32)
    for g in range(groups):  # this kv head's G query heads, read in turn

        def visit(i, carry, g=g):
            dk_CxH, dv_CxH = carry
            q_slice = pl.ds(i * block_q, block_q)
            q_QxH, do_QxH = q_ref[q_slice, g, :], do_ref[q_slice, g, :]
            q_seg_Q = q_seg_ref[q_slice] if has_segments else None
            s_QxC = _masked_scores(cfg, q_QxH, k_CxH, i, j, block_q, block_k, q_seg_Q,
                                   kv_seg_ref)
            p_QxC = jnp.exp2(s_QxC - lse_ref[g, q_slice][:, None] * LOG2E)
            dv_CxH = dv_CxH + plgpu.dot(p_QxC.astype(do_QxH.dtype), do_QxH, trans_a=True)
            dp_QxC = plgpu.dot(do_QxH, v_CxH, trans_b=True)
            ds_QxC = p_QxC * (dp_QxC - delta_ref[g, q_slice][:, None])
            dk_CxH = dk_CxH + plgpu.dot(ds_QxC.astype(q_QxH.dtype), q_QxH, trans_a=True)
            return dk_CxH, dv_CxH

        def body(i, carry, visit=visit):
            q_seg_Q = q_seg_ref[pl.ds(i * block_q, block_q)] if has_segments else None
            return _unless_other_document(q_seg_Q, kv_seg_C, functools.partial(visit, i), carry)

        dk_CxH, dv_CxH = jax.lax.fori_loop(lo, hi, body, (dk_CxH, dv_CxH))
    dk_ref[...] = (dk_CxH * cfg.scale).astype(dk_ref.dtype)
    dv_ref[...] = dv_CxH.astype(dv_ref.dtype)


def backward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_seg_BxT, kv_seg_BxS, do_BxTxNxH, lse_BxNxT,
             delta_BxNxT, cfg, blocks, interpret):
    """dq, dk, dv; `lse` is +inf on rows that saw no key, `delta` = rowsum(do·o) - d lse."""
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    G = N // K
    has_segments = q_seg_BxT is not None
    params = plgpu.CompilerParams(num_warps=blocks.num_warps, num_stages=blocks.num_stages)
    args = [q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, do_BxTxNxH, lse_BxNxT, delta_BxNxT]
    if has_segments:
        args += [q_seg_BxT, kv_seg_BxS]

    bq, bk = blocks.block_q_dq, blocks.block_k_dq
    q_spec = pl.BlockSpec((None, bq, None, H), lambda i, b, n: (b, i, n, 0))
    kv_spec = pl.BlockSpec((None, S, None, H), lambda i, b, n: (b, 0, n // G, 0))
    row_spec = pl.BlockSpec((None, None, bq), lambda i, b, n: (b, n, i))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    if has_segments:
        in_specs += [pl.BlockSpec((None, bq), lambda i, b, n: (b, i)),
                     pl.BlockSpec((None, S), lambda i, b, n: (b, 0))]
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, block_q=bq, block_k=bk, num_k_blocks=S // bk,
                          has_segments=has_segments),
        grid=(T // bq, B, N), in_specs=in_specs, out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q_BxTxNxH.shape, q_BxTxNxH.dtype),
        compiler_params=params, cost_estimate=attention_cost(q_BxTxNxH, k_BxSxKxH, 3, *args),
        interpret=interpret, name="flash_attention_dq")(*args)

    bq, bk = blocks.block_q_dkv, blocks.block_k_dkv
    # One program per (key block, batch, kv head); its G query heads are one block of G.
    q_spec = pl.BlockSpec((None, T, G, H), lambda j, b, k: (b, 0, k, 0))
    kv_spec = pl.BlockSpec((None, bk, None, H), lambda j, b, k: (b, j, k, 0))
    row_spec = pl.BlockSpec((None, G, T), lambda j, b, k: (b, k, 0))
    in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
    if has_segments:
        in_specs += [pl.BlockSpec((None, T), lambda j, b, k: (b, 0)),
                     pl.BlockSpec((None, S), lambda j, b, k: (b, 0))]
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, block_q=bq, block_k=bk, num_q_blocks=T // bq,
                          groups=G, has_segments=has_segments),
        grid=(S // bk, B, K), in_specs=in_specs, out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k_BxSxKxH.shape, k_BxSxKxH.dtype),
                   jax.ShapeDtypeStruct(v_BxSxKxH.shape, v_BxSxKxH.dtype)],
        compiler_params=params, cost_estimate=attention_cost(q_BxTxNxH, k_BxSxKxH, 4, *args),
        interpret=interpret, name="flash_attention_dkv")(*args)
    return dq, dk, dv
