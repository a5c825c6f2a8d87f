"""Grouped matmul (gmm) and its transposed product (tgmm) as Pallas kernels for TPU (Mosaic).

Dimension letters (docs/glossary.md): M rows, I contracted dim, O output dim, E groups, W work
items; tm, ti, to tile sizes (multiples of 128). Inputs arrive padded to whole tiles.

A work item is one (row tile, group) pair with a non-empty overlap, in row order, so a row
tile that straddles a group boundary is visited once per group it meets (W ≤ M/tm + E - 1).
The work list is computed on device from group_sizes and reaches the index maps through
scalar prefetch, which is how a block's position can depend on data on TPU. gmm: grid
(O tiles, W, I tiles); consecutive items of one row tile keep the output block resident, the
first zeroes it and each adds its own group's rows. tgmm: grid (I tiles, O tiles, W); the
items of one group are consecutive, so its weight-gradient block is accumulated in VMEM and
written after its last item. Padding items past the real W add nothing (inactive).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from jaxllm.kernels.cost import matmul_cost
from jaxllm.kernels.platform import mxu_dot

TRANS_A = (((0,), (0,)), ((), ()))
TRANS_B = (((1,), (1,)), ((), ()))


def work_items(starts_E, ends_E, tm: int, tiles_m: int):
    """(group id, row tile, active) per work item, each [W] int32, W = tiles_m + E - 1."""
    E = starts_E.shape[0]
    W = tiles_m + E - 1
    nonempty = ends_E > starts_E
    first_tile = starts_E // tm
    count_E = jnp.where(nonempty, (ends_E - 1) // tm - first_tile + 1, 0)
    cum_E = jnp.cumsum(count_E)
    item = jnp.arange(W, dtype=jnp.int32)
    group = jnp.minimum(jnp.searchsorted(cum_E, item, side="right"), E - 1).astype(jnp.int32)
    tile = first_tile[group] + item - (cum_E - count_E)[group]
    active = item < cum_E[-1]
    # Padding items repeat the last real one, so they neither move the output block nor
    # start a new group; `active` = 0 makes them add zeros.
    last = jnp.maximum(cum_E[-1] - 1, 0)
    group = jnp.where(active, group, group[last])
    tile = jnp.clip(jnp.where(active, tile, tile[last]), 0, tiles_m - 1).astype(jnp.int32)
    return group, tile, active.astype(jnp.int32)


def _rows_in_group(w, group_ref, tile_ref, active_ref, starts_ref, ends_ref, tm):
    g = group_ref[w]
    rows = tile_ref[w] * tm + jax.lax.broadcasted_iota(jnp.int32, (tm, 1), 0)
    return (rows >= starts_ref[g]) & (rows < ends_ref[g]) & (active_ref[w] > 0)


def _gmm_kernel(group_ref, tile_ref, active_ref, starts_ref, ends_ref, lhs_ref, rhs_ref,
                out_ref, acc_ref, *, tm, transpose_rhs):
    w, it = pl.program_id(1), pl.program_id(2)

    @pl.when(it == 0)
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    dims = TRANS_B if transpose_rhs else (((1,), (0,)), ((), ()))
    acc_ref[...] += mxu_dot(lhs_ref[...], rhs_ref[...], dims)

    @pl.when(it == pl.num_programs(2) - 1)
    def _store():
        mask = _rows_in_group(w, group_ref, tile_ref, active_ref, starts_ref, ends_ref, tm)
        mine = jnp.where(mask, acc_ref[...], 0.0)
        first_visit = (w == 0) | (tile_ref[jnp.maximum(w - 1, 0)] != tile_ref[w])

        @pl.when(first_visit)
        def _():
            out_ref[...] = mine.astype(out_ref.dtype)

        @pl.when(jnp.logical_not(first_visit))
        def _():
            out_ref[...] = (out_ref[...].astype(jnp.float32) + mine).astype(out_ref.dtype)


def gmm(lhs_MxI, rhs_ExIxO, starts_E, ends_E, *, tiling, transpose_rhs, out_dtype, interpret):
    M, I = lhs_MxI.shape
    O = rhs_ExIxO.shape[1] if transpose_rhs else rhs_ExIxO.shape[2]
    tm, ti, to = tiling
    group, tile, active = work_items(starts_E, ends_E, tm, M // tm)
    if transpose_rhs:
        rhs_spec = pl.BlockSpec((None, to, ti), lambda n, w, it, g, t, *_: (g[w], n, it))
    else:
        rhs_spec = pl.BlockSpec((None, ti, to), lambda n, w, it, g, t, *_: (g[w], it, n))
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5, grid=(O // to, group.shape[0], I // ti),
        in_specs=[pl.BlockSpec((tm, ti), lambda n, w, it, g, t, *_: (t[w], it)), rhs_spec],
        out_specs=pl.BlockSpec((tm, to), lambda n, w, it, g, t, *_: (t[w], n)),
        scratch_shapes=[pltpu.VMEM((tm, to), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_gmm_kernel, tm=tm, transpose_rhs=transpose_rhs),
        grid_spec=grid_spec, out_shape=jax.ShapeDtypeStruct((M, O), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "arbitrary", "arbitrary")),
        cost_estimate=matmul_cost(M, I, O, lhs_MxI, rhs_ExIxO),
        interpret=pltpu.InterpretParams() if interpret else False, name="gmm_tpu",
    )(group, tile, active, starts_E, ends_E, lhs_MxI, rhs_ExIxO)


def _tgmm_kernel(group_ref, tile_ref, active_ref, starts_ref, ends_ref, lhs_ref, rhs_ref,
                 out_ref, acc_ref, *, tm):
    w, num_w = pl.program_id(2), pl.num_programs(2)
    g = group_ref[w]

    @pl.when((w == 0) | (group_ref[jnp.maximum(w - 1, 0)] != g))
    def _init():
        acc_ref[...] = jnp.zeros(acc_ref.shape, jnp.float32)

    mask = _rows_in_group(w, group_ref, tile_ref, active_ref, starts_ref, ends_ref, tm)
    lhs = jnp.where(mask, lhs_ref[...], jnp.zeros_like(lhs_ref[...]))
    acc_ref[...] += mxu_dot(lhs, rhs_ref[...], TRANS_A)

    @pl.when((w == num_w - 1) | (group_ref[jnp.minimum(w + 1, num_w - 1)] != g))
    def _store():
        out_ref[...] = acc_ref[...].astype(out_ref.dtype)


def tgmm(lhs_MxI, rhs_MxO, starts_E, ends_E, *, tiling, out_dtype, interpret):
    """Groups with no rows are never visited: the caller zeroes them."""
    M, I = lhs_MxI.shape
    O, E = rhs_MxO.shape[1], starts_E.shape[0]
    tm, ti, to = tiling
    group, tile, active = work_items(starts_E, ends_E, tm, M // tm)
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=5, grid=(I // ti, O // to, group.shape[0]),
        in_specs=[pl.BlockSpec((tm, ti), lambda it, n, w, g, t, *_: (t[w], it)),
                  pl.BlockSpec((tm, to), lambda it, n, w, g, t, *_: (t[w], n))],
        out_specs=pl.BlockSpec((None, ti, to), lambda it, n, w, g, t, *_: (g[w], it, n)),
        scratch_shapes=[pltpu.VMEM((ti, to), jnp.float32)])
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm), grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct((E, I, O), out_dtype),
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "arbitrary")),
        cost_estimate=matmul_cost(M, I, O, lhs_MxI, rhs_MxO),
        interpret=pltpu.InterpretParams() if interpret else False, name="tgmm_tpu",
    )(group, tile, active, starts_E, ends_E, lhs_MxI, rhs_MxO)
