"""Grouped matmul (gmm) and its transposed product (tgmm) as Pallas kernels for NVIDIA GPUs.

Dimension letters (docs/glossary.md): M rows, I contracted dim, O output dim, E groups; tm, ti,
to tile sizes. Inputs arrive padded to whole tiles (gmm.py pads).

gmm: one program per (row tile, column tile). Groups are contiguous row ranges, so a row tile
meets a contiguous run of groups [first, last]; the program loops over that run, each group's
product over the I tiles with that group's weight tile, keeping only the rows in the group.
Only tiles that straddle a boundary compute more than one product. Every output tile is
written by exactly one program: no atomics, and rows in no group come out 0.
tgmm: one program per (group, I tile, O tile) walks the row tiles of its group and accumulates
lhs_tileᵀ @ rhs_tile with rows outside the group zeroed; an empty group writes 0.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from jaxllm.kernels.cost import matmul_cost


def _div(a, b: int):
    return jax.lax.div(a, jnp.int32(b))  # `//` on traced ints does not lower in Triton


def _gmm_kernel(first_ref, last_ref, starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *,
                tm, ti, to, num_i_tiles, transpose_rhs):
    t, n = pl.program_id(0), pl.program_id(1)
    rows = t * tm + jnp.arange(tm)

    def group(g, acc_MxO):
        start, end = starts_ref[g], ends_ref[g]

        def i_tile(it, acc_g):
            lhs_tile = lhs_ref[pl.ds(t * tm, tm), pl.ds(it * ti, ti)]
            if transpose_rhs:
                rhs_tile = rhs_ref[g, pl.ds(n * to, to), pl.ds(it * ti, ti)]
                return acc_g + plgpu.dot(lhs_tile, rhs_tile, trans_b=True)
            return acc_g + plgpu.dot(lhs_tile, rhs_ref[g, pl.ds(it * ti, ti), pl.ds(n * to, to)])

        # An empty group inside the run costs nothing: its I loop is empty. Bounds both int32:
        # Triton's loop refuses a weakly typed bound beside a strong one.
        num = jnp.where(end > start, jnp.int32(num_i_tiles), jnp.int32(0))
        acc_g = jax.lax.fori_loop(jnp.int32(0), num, i_tile, jnp.zeros((tm, to), jnp.float32))
        in_group = (rows >= start) & (rows < end)
        return acc_MxO + jnp.where(in_group[:, None], acc_g, 0.0)

    acc = jax.lax.fori_loop(first_ref[t], last_ref[t] + 1, group,
                            jnp.zeros((tm, to), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def gmm(lhs_MxI, rhs_ExIxO, starts_E, ends_E, *, tiling, transpose_rhs, out_dtype, interpret):
    M, I = lhs_MxI.shape
    E = rhs_ExIxO.shape[0]
    O = rhs_ExIxO.shape[1] if transpose_rhs else rhs_ExIxO.shape[2]
    tm, ti, to = tiling
    tiles_m = M // tm
    # Run of groups each row tile meets: from the first group ending after its first row to
    # the last group starting before its end.
    tile_start = jnp.arange(tiles_m, dtype=jnp.int32) * tm
    first = jnp.searchsorted(ends_E, tile_start, side="right").astype(jnp.int32)
    last = (jnp.searchsorted(starts_E, tile_start + tm, side="left") - 1).astype(jnp.int32)
    last = jnp.minimum(last, E - 1)
    full = lambda shape: pl.BlockSpec(shape, lambda t, n: (0,) * len(shape))
    kernel = functools.partial(_gmm_kernel, tm=tm, ti=ti, to=to, num_i_tiles=I // ti,
                               transpose_rhs=transpose_rhs)
    return pl.pallas_call(
        kernel, grid=(tiles_m, O // to),
        in_specs=[full((tiles_m,)), full((tiles_m,)), full((E,)), full((E,)), full((M, I)),
                  full(rhs_ExIxO.shape)],
        out_specs=pl.BlockSpec((tm, to), lambda t, n: (t, n)),
        out_shape=jax.ShapeDtypeStruct((M, O), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        cost_estimate=matmul_cost(M, I, O, lhs_MxI, rhs_ExIxO),
        interpret=interpret, name="gmm")(first, last, starts_E, ends_E, lhs_MxI, rhs_ExIxO)


def _tgmm_kernel(starts_ref, ends_ref, lhs_ref, rhs_ref, out_ref, *, tm, ti, to):
    g, it, n = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    start, end = starts_ref[g], ends_ref[g]

    def row_tile(t, acc_IxO):
        rows = t * tm + jnp.arange(tm)
        in_group = (rows >= start) & (rows < end)
        lhs_tile = lhs_ref[pl.ds(t * tm, tm), pl.ds(it * ti, ti)]
        lhs_tile = jnp.where(in_group[:, None], lhs_tile, jnp.zeros_like(lhs_tile))
        return acc_IxO + plgpu.dot(lhs_tile, rhs_ref[pl.ds(t * tm, tm), pl.ds(n * to, to)],
                                   trans_a=True)

    first = _div(start, tm)
    stop = jnp.where(end > start, _div(end + tm - 1, tm), first)
    acc = jax.lax.fori_loop(first, stop, row_tile, jnp.zeros((ti, to), jnp.float32))
    out_ref[...] = acc.astype(out_ref.dtype)


def tgmm(lhs_MxI, rhs_MxO, starts_E, ends_E, *, tiling, out_dtype, interpret):
    M, I = lhs_MxI.shape
    O, E = rhs_MxO.shape[1], starts_E.shape[0]
    tm, ti, to = tiling
    full = lambda shape: pl.BlockSpec(shape, lambda g, it, n: (0,) * len(shape))
    return pl.pallas_call(
        functools.partial(_tgmm_kernel, tm=tm, ti=ti, to=to), grid=(E, I // ti, O // to),
        in_specs=[full((E,)), full((E,)), full((M, I)), full((M, O))],
        out_specs=pl.BlockSpec((None, ti, to), lambda g, it, n: (g, it, n)),
        out_shape=jax.ShapeDtypeStruct((E, I, O), out_dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=2),
        cost_estimate=matmul_cost(M, I, O, lhs_MxI, rhs_MxO),
        interpret=interpret, name="tgmm")(starts_E, ends_E, lhs_MxI, rhs_MxO)
