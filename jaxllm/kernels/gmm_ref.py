"""References for the grouped matmul of mixture-of-experts layers.

Dimension letters (docs/glossary.md): M rows (tokens sorted by expert), I contracted
dim, O output dim, E groups (experts). Rows [start_e, end_e) of lhs, with end_e the running
sum of group_sizes, belong to group e; rows past the last group produce zeros.

`gmm_loop` / `tgmm_loop` are the obvious per-group loops (each group's product computed on
all rows, then masked), `gmm_ragged_dot` / `tgmm_ragged_dot` are XLA's `jax.lax.ragged_dot`
(what `moe_impl='xla'` runs); the Pallas kernels in gmm.py are tested against both.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def group_bounds(group_sizes_E: jax.Array, M: int) -> tuple[jax.Array, jax.Array]:
    """[start, end) row range of each group, clipped to M rows."""
    ends_E = jnp.minimum(jnp.cumsum(group_sizes_E.astype(jnp.int32)), M)
    starts_E = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends_E[:-1]])
    return starts_E, ends_E


def _rows_of(group_sizes_E: jax.Array, M: int) -> jax.Array:
    """[E, M] bool: row m belongs to group e."""
    starts_E, ends_E = group_bounds(group_sizes_E, M)
    rows_M = jnp.arange(M)
    return (rows_M[None, :] >= starts_E[:, None]) & (rows_M[None, :] < ends_E[:, None])


def gmm_loop(lhs_MxI: jax.Array, rhs_ExIxO: jax.Array, group_sizes_E: jax.Array,
             transpose_rhs: bool = False) -> jax.Array:
    """out[m] = lhs[m] @ rhs[group(m)] (rhs[e] transposed when `transpose_rhs`)."""
    if transpose_rhs:
        rhs_ExIxO = rhs_ExIxO.swapaxes(1, 2)
    in_group_ExM = _rows_of(group_sizes_E, lhs_MxI.shape[0])
    out_MxO = jnp.zeros((lhs_MxI.shape[0], rhs_ExIxO.shape[2]), jnp.float32)
    for e in range(rhs_ExIxO.shape[0]):
        product_MxO = jnp.dot(lhs_MxI, rhs_ExIxO[e], preferred_element_type=jnp.float32)
        out_MxO = jnp.where(in_group_ExM[e][:, None], product_MxO, out_MxO)
    return out_MxO.astype(lhs_MxI.dtype)


def tgmm_loop(lhs_MxI: jax.Array, rhs_MxO: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """out[e] = lhs[rows of e]ᵀ @ rhs[rows of e]: the weight gradient of gmm."""
    in_group_ExM = _rows_of(group_sizes_E, lhs_MxI.shape[0])
    outs = [jnp.dot(jnp.where(in_group_ExM[e][:, None], lhs_MxI, 0).T, rhs_MxO,
                    preferred_element_type=jnp.float32) for e in range(in_group_ExM.shape[0])]
    return jnp.stack(outs).astype(lhs_MxI.dtype)


def gmm_ragged_dot(lhs_MxI: jax.Array, rhs_ExIxO: jax.Array, group_sizes_E: jax.Array,
                   transpose_rhs: bool = False) -> jax.Array:
    if transpose_rhs:
        rhs_ExIxO = rhs_ExIxO.swapaxes(1, 2)
    out_MxO = jax.lax.ragged_dot(lhs_MxI, rhs_ExIxO, group_sizes_E.astype(jnp.int32),
                                 preferred_element_type=jnp.float32)
    return out_MxO.astype(lhs_MxI.dtype)


def tgmm_ragged_dot(lhs_MxI: jax.Array, rhs_MxO: jax.Array, group_sizes_E: jax.Array
                    ) -> jax.Array:
    """The transposed product as XLA computes ragged_dot's weight gradient."""
    E = group_sizes_E.shape[0]

    def forward(rhs_ExIxO):
        return jax.lax.ragged_dot(lhs_MxI, rhs_ExIxO, group_sizes_E.astype(jnp.int32),
                                  preferred_element_type=jnp.float32)

    zeros = jnp.zeros((E, lhs_MxI.shape[1], rhs_MxO.shape[1]), jnp.float32)
    _, vjp = jax.vjp(forward, zeros)
    return vjp(rhs_MxO.astype(jnp.float32))[0].astype(lhs_MxI.dtype)
