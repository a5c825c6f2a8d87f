"""Flash attention forward and backward as Pallas kernels for TPU (Mosaic).

Dimension letters (docs/glossary.md): B batch, T query length, S key length (both padded to the
blocks, which are multiples of 128), N query heads, K kv heads, G = N / K, H head dim; Q and C
are query and key block sizes; 128 the lanes of a vector register (`LANES`).

Kernels see [B, N, T, H] / [B, K, S, H] (the caller's layout, transposed here) because a
TPU block's last two dims must be (8, 128)-tiled. The key-block axis is the innermost,
sequential grid axis: running max, sum and output live in VMEM scratch across it, and
`pl.when` skips blocks that causality or the local window masks entirely (their index map
also repeats the last useful block so no DMA is issued). Grouped-query attention is an index
map (query head n reads kv head n // G); the dK/dV kernel of kv head k iterates over (its G
query heads × query blocks) on its sequential axis. Per-row statistics are kept broadcast over
the 128 lanes, and segment ids arrive lane- (queries) and sublane- (keys) broadcast, the
layouts Mosaic handles natively.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxllm.kernels.cost import attention_cost
from jaxllm.kernels.mask import MASK_VALUE
from jaxllm.kernels.platform import mxu_dot

LANES = 128  # of a TPU vector register
TRANS_B = (((1,), (1,)), ((), ()))


def _lanes(x_Qx128, width: int):
    """Widens a lane-broadcast [Q, 128] statistic to [Q, width]."""
    return jnp.tile(x_Qx128, (1, width // LANES)) if width >= LANES else x_Qx128[:, :width]


def _scores(cfg, q_QxH, k_CxH, i, j, q_seg_ref, kv_seg_ref):
    """Masked, scaled float32 scores of query block i against key block j."""
    bq, bk = q_QxH.shape[0], k_CxH.shape[0]
    s_QxC = mxu_dot(q_QxH, k_CxH, TRANS_B)
    s_QxC = s_QxC * cfg.scale
    q_index = i * bq + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 0)
    k_index = j * bk + jax.lax.broadcasted_iota(jnp.int32, (bq, bk), 1)
    q_seg = kv_seg = None
    if q_seg_ref is not None:
        q_seg, kv_seg = _lanes(q_seg_ref[...], bk), kv_seg_ref[:1, :]
    mask = cfg.mask.visible(q_index, k_index, q_seg, kv_seg)
    return s_QxC if mask is None else jnp.where(mask, s_QxC, MASK_VALUE)


def _unpack(refs, n_in: int, has_segments: bool):
    ins = list(refs[:n_in])
    segs = (ins[-2], ins[-1]) if has_segments else (None, None)
    return ins[: n_in - 2 * has_segments], segs, refs[n_in:]


def _forward_kernel(*refs, cfg, num_k_blocks, has_segments):
    (q_ref, k_ref, v_ref), (q_seg_ref, kv_seg_ref), rest = _unpack(
        refs, 3 + 2 * has_segments, has_segments)
    o_ref, lse_ref, m_ref, l_ref, acc_ref = rest
    bq, bk, H = q_ref.shape[0], k_ref.shape[0], q_ref.shape[1]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        m_ref[...] = jnp.full(m_ref.shape, MASK_VALUE, jnp.float32)
        l_ref[...] = jnp.zeros(l_ref.shape, jnp.float32)
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = cfg.mask.kv_block_range(i, bq, bk, num_k_blocks)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        s_QxC = _scores(cfg, q_ref[...], k_ref[...], i, j, q_seg_ref, kv_seg_ref)
        m_prev = m_ref[...]
        m_next = jnp.maximum(m_prev, jnp.max(s_QxC, axis=1, keepdims=True))
        alpha = jnp.exp(m_prev - m_next)
        p_QxC = jnp.exp(s_QxC - _lanes(m_next, bk))
        m_ref[...] = m_next
        l_ref[...] = alpha * l_ref[...] + jnp.sum(p_QxC, axis=1, keepdims=True)
        pv = mxu_dot(p_QxC.astype(v_ref.dtype), v_ref[...])
        acc_ref[...] = acc_ref[...] * _lanes(alpha, H) + pv

    @pl.when(j == num_k_blocks - 1)
    def _finish():
        m, l = m_ref[...], l_ref[...]
        seen = m > 0.5 * MASK_VALUE  # rows that saw no key keep the initial max
        l_safe = jnp.where(seen, l, 1.0)
        o_ref[...] = jnp.where(_lanes(seen, H), acc_ref[...] / _lanes(l_safe, H),
                               0.0).astype(o_ref.dtype)
        lse_ref[...] = jnp.where(seen, m + jnp.log(l_safe), -jnp.inf)


def _segment_args(q_seg_BxT, kv_seg_BxS, bq, bk, q_map, kv_map):
    """Lane-broadcast query ids [B, T, 128] and sublane-broadcast key ids [B, 8, S]."""
    B, T = q_seg_BxT.shape
    S = kv_seg_BxS.shape[1]
    args = [jax.lax.broadcast_in_dim(q_seg_BxT, (B, T, LANES), (0, 1)),
            jax.lax.broadcast_in_dim(kv_seg_BxS, (B, 8, S), (0, 2))]
    specs = [pl.BlockSpec((None, bq, LANES), lambda *g: (q_map(*g)[0], q_map(*g)[2], 0)),
             pl.BlockSpec((None, 8, bk), lambda *g: (kv_map(*g)[0], 0, kv_map(*g)[2]))]
    return args, specs


def _params(interpret: bool, semantics: tuple[str, ...]) -> dict:
    return dict(compiler_params=pltpu.CompilerParams(dimension_semantics=semantics),
                interpret=pltpu.InterpretParams() if interpret else False)


def forward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_seg_BxT, kv_seg_BxS, cfg, blocks, interpret):
    """Returns out [B, T, N, H] and lse [B, N, T] (float32, natural log)."""
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    G, bq, bk, nk = N // K, blocks.block_q, blocks.block_k, S // blocks.block_k
    q, k, v = (x.transpose(0, 2, 1, 3) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))

    def kv_map(b, n, i, j):  # skipped blocks repeat a visible one: no new DMA
        lo, hi = cfg.mask.kv_block_range(i, bq, bk, nk)
        return b, n // G, jnp.clip(j, lo, jnp.maximum(hi - 1, lo)), 0

    q_map = lambda b, n, i, j: (b, n, i, 0)
    in_specs = [pl.BlockSpec((None, None, bq, H), q_map),
                pl.BlockSpec((None, None, bk, H), kv_map),
                pl.BlockSpec((None, None, bk, H), kv_map)]
    args = [q, k, v]
    has_segments = q_seg_BxT is not None
    if has_segments:
        seg_args, seg_specs = _segment_args(q_seg_BxT, kv_seg_BxS, bq, bk, q_map, kv_map)
        args, in_specs = args + seg_args, in_specs + seg_specs
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg, num_k_blocks=nk,
                          has_segments=has_segments),
        grid=(B, N, T // bq, nk), in_specs=in_specs,
        out_specs=[pl.BlockSpec((None, None, bq, H), q_map),
                   pl.BlockSpec((None, None, bq, LANES), q_map)],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype),
                   jax.ShapeDtypeStruct((B, N, T, LANES), jnp.float32)],
        scratch_shapes=[pltpu.VMEM((bq, LANES), jnp.float32), pltpu.VMEM((bq, LANES), jnp.float32),
                        pltpu.VMEM((bq, H), jnp.float32)],
        **_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=attention_cost(q_BxTxNxH, k_BxSxKxH, 2, *args),
        name="flash_attention_fwd_tpu")(*args)
    return out.transpose(0, 2, 1, 3), lse[..., 0]


def _dq_kernel(*refs, cfg, num_k_blocks, has_segments):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (q_seg_ref, kv_seg_ref), rest = _unpack(
        refs, 6 + 2 * has_segments, has_segments)
    dq_ref, acc_ref = rest
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    i, j = pl.program_id(2), pl.program_id(3)

    @pl.when(j == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    lo, hi = cfg.mask.kv_block_range(i, bq, bk, num_k_blocks)

    @pl.when((j >= lo) & (j < hi))
    def _step():
        k_CxH = k_ref[...]
        s_QxC = _scores(cfg, q_ref[...], k_CxH, i, j, q_seg_ref, kv_seg_ref)
        p_QxC = jnp.exp(s_QxC - _lanes(lse_ref[...], bk))
        dp_QxC = mxu_dot(do_ref[...], v_ref[...], TRANS_B)
        ds_QxC = p_QxC * (dp_QxC - _lanes(delta_ref[...], bk))
        acc_ref[...] += mxu_dot(ds_QxC.astype(k_CxH.dtype), k_CxH)

    @pl.when(j == num_k_blocks - 1)
    def _finish():
        dq_ref[...] = (acc_ref[...] * cfg.scale).astype(dq_ref.dtype)


def _dkv_kernel(*refs, cfg, num_q_blocks, groups, has_segments):
    (q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref), (q_seg_ref, kv_seg_ref), rest = _unpack(
        refs, 6 + 2 * has_segments, has_segments)
    dk_ref, dv_ref, dk_acc_ref, dv_acc_ref = rest
    bq, bk = q_ref.shape[0], k_ref.shape[0]
    j, step = pl.program_id(2), pl.program_id(3)
    i = jax.lax.rem(step, num_q_blocks)

    @pl.when(step == 0)
    def _init():
        dk_acc_ref[...] = jnp.zeros(dk_acc_ref.shape, jnp.float32)
        dv_acc_ref[...] = jnp.zeros(dv_acc_ref.shape, jnp.float32)

    lo, hi = cfg.mask.q_block_range(j, bk, bq, num_q_blocks)

    @pl.when((i >= lo) & (i < hi))
    def _step():
        q_QxH, do_QxH = q_ref[...], do_ref[...]
        s_QxC = _scores(cfg, q_QxH, k_ref[...], i, j, q_seg_ref, kv_seg_ref)
        p_QxC = jnp.exp(s_QxC - _lanes(lse_ref[...], bk))
        dv_acc_ref[...] += mxu_dot(p_QxC.T.astype(do_QxH.dtype), do_QxH)
        dp_QxC = mxu_dot(do_QxH, v_ref[...], TRANS_B)
        ds_QxC = p_QxC * (dp_QxC - _lanes(delta_ref[...], bk))
        dk_acc_ref[...] += mxu_dot(ds_QxC.T.astype(q_QxH.dtype), q_QxH)

    @pl.when(step == groups * num_q_blocks - 1)
    def _finish():
        dk_ref[...] = (dk_acc_ref[...] * cfg.scale).astype(dk_ref.dtype)
        dv_ref[...] = dv_acc_ref[...].astype(dv_ref.dtype)


def backward(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_seg_BxT, kv_seg_BxS, do_BxTxNxH, lse_BxNxT,
             delta_BxNxT, cfg, blocks, interpret):
    """dq, dk, dv; `lse` is +inf on rows that saw no key, `delta` = rowsum(do·o) - d lse."""
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    G = N // K
    q, k, v, do = (x.transpose(0, 2, 1, 3) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH,
                                                     do_BxTxNxH))
    lse, delta = (jax.lax.broadcast_in_dim(x, (B, N, T, LANES), (0, 1, 2))
                  for x in (lse_BxNxT, delta_BxNxT))
    has_segments = q_seg_BxT is not None

    def inputs(bq: int, bk: int, q_map, kv_map) -> tuple[list, list, pl.BlockSpec,
                                                         pl.BlockSpec]:
        """Both backward kernels read q, k, v, do, lse, delta (and segment ids) the same way;
        they differ in their grids, so in the index maps."""
        q_spec = pl.BlockSpec((None, None, bq, H), q_map)
        kv_spec = pl.BlockSpec((None, None, bk, H), kv_map)
        row_spec = pl.BlockSpec((None, None, bq, LANES), q_map)
        args = [q, k, v, do, lse, delta]
        in_specs = [q_spec, kv_spec, kv_spec, q_spec, row_spec, row_spec]
        if has_segments:
            seg_args, seg_specs = _segment_args(q_seg_BxT, kv_seg_BxS, bq, bk, q_map, kv_map)
            args, in_specs = args + seg_args, in_specs + seg_specs
        return args, in_specs, q_spec, kv_spec

    bq, bk, nk = blocks.block_q_dq, blocks.block_k_dq, S // blocks.block_k_dq

    def kv_map(b, n, i, j):
        lo, hi = cfg.mask.kv_block_range(i, bq, bk, nk)
        return b, n // G, jnp.clip(j, lo, jnp.maximum(hi - 1, lo)), 0

    q_map = lambda b, n, i, j: (b, n, i, 0)
    args, in_specs, q_spec, kv_spec = inputs(bq, bk, q_map, kv_map)
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg=cfg, num_k_blocks=nk, has_segments=has_segments),
        grid=(B, N, T // bq, nk), in_specs=in_specs, out_specs=q_spec,
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, H), jnp.float32)],
        **_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=attention_cost(q_BxTxNxH, k_BxSxKxH, 3, *args),
        name="flash_attention_dq_tpu")(*args)

    bq, bk, nq = blocks.block_q_dkv, blocks.block_k_dkv, T // blocks.block_q_dkv

    def q_map(b, k, j, step):  # step walks (query head g of this kv head, query block i)
        lo, hi = cfg.mask.q_block_range(j, bk, bq, nq)
        i = jnp.clip(jax.lax.rem(step, nq), lo, jnp.maximum(hi - 1, lo))
        return b, k * G + jax.lax.div(step, nq), i, 0

    kv_map = lambda b, k, j, step: (b, k, j, 0)
    args, in_specs, q_spec, kv_spec = inputs(bq, bk, q_map, kv_map)
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg=cfg, num_q_blocks=nq, groups=G,
                          has_segments=has_segments),
        grid=(B, K, S // bk, G * nq), in_specs=in_specs, out_specs=[kv_spec, kv_spec],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, H), jnp.float32), pltpu.VMEM((bk, H), jnp.float32)],
        **_params(interpret, ("parallel", "parallel", "parallel", "arbitrary")),
        cost_estimate=attention_cost(q_BxTxNxH, k_BxSxKxH, 4, *args),
        name="flash_attention_dkv_tpu")(*args)
    return dq.transpose(0, 2, 1, 3), dk.transpose(0, 2, 1, 3), dv.transpose(0, 2, 1, 3)
