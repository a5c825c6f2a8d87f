"""References for the grouped matmul of mixture-of-experts layers.

Dimension letters (this module and gmm*.py): M rows (tokens sorted by expert), K contracted
dim, N output dim, E groups (experts). Rows [start_e, end_e) of lhs, with end_e the running
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


def gmm_loop(lhs_MxK: jax.Array, rhs_ExKxN: jax.Array, group_sizes_E: jax.Array,
             transpose_rhs: bool = False) -> jax.Array:
    """out[m] = lhs[m] @ rhs[group(m)] (rhs[e] transposed when `transpose_rhs`)."""
    if transpose_rhs:
        rhs_ExKxN = rhs_ExKxN.swapaxes(1, 2)
    in_group_ExM = _rows_of(group_sizes_E, lhs_MxK.shape[0])
    out_MxN = jnp.zeros((lhs_MxK.shape[0], rhs_ExKxN.shape[2]), jnp.float32)
    for e in range(rhs_ExKxN.shape[0]):
        product_MxN = jnp.dot(lhs_MxK, rhs_ExKxN[e], preferred_element_type=jnp.float32)
        out_MxN = jnp.where(in_group_ExM[e][:, None], product_MxN, out_MxN)
    return out_MxN.astype(lhs_MxK.dtype)


def tgmm_loop(lhs_MxK: jax.Array, rhs_MxN: jax.Array, group_sizes_E: jax.Array) -> jax.Array:
    """out[e] = lhs[rows of e]ᵀ @ rhs[rows of e]: the weight gradient of gmm."""
    in_group_ExM = _rows_of(group_sizes_E, lhs_MxK.shape[0])
    outs = [jnp.dot(jnp.where(in_group_ExM[e][:, None], lhs_MxK, 0).T, rhs_MxN,
                    preferred_element_type=jnp.float32) for e in range(in_group_ExM.shape[0])]
    return jnp.stack(outs).astype(lhs_MxK.dtype)


def gmm_ragged_dot(lhs_MxK: jax.Array, rhs_ExKxN: jax.Array, group_sizes_E: jax.Array,
                   transpose_rhs: bool = False) -> jax.Array:
    if transpose_rhs:
        rhs_ExKxN = rhs_ExKxN.swapaxes(1, 2)
    out_MxN = jax.lax.ragged_dot(lhs_MxK, rhs_ExKxN, group_sizes_E.astype(jnp.int32),
                                 preferred_element_type=jnp.float32)
    return out_MxN.astype(lhs_MxK.dtype)


def tgmm_ragged_dot(lhs_MxK: jax.Array, rhs_MxN: jax.Array, group_sizes_E: jax.Array
                    ) -> jax.Array:
    """The transposed product as XLA computes ragged_dot's weight gradient."""
    E = group_sizes_E.shape[0]

    def forward(rhs_ExKxN):
        return jax.lax.ragged_dot(lhs_MxK, rhs_ExKxN, group_sizes_E.astype(jnp.int32),
                                  preferred_element_type=jnp.float32)

    zeros = jnp.zeros((E, lhs_MxK.shape[1], rhs_MxN.shape[1]), jnp.float32)
    _, vjp = jax.vjp(forward, zeros)
    return vjp(rhs_MxN.astype(jnp.float32))[0].astype(lhs_MxK.dtype)
