"""Ring attention: context parallelism over one mesh axis, inside `jax.shard_map`.

Dimension letters (docs/glossary.md): Tl the queries of one device (a row has s·Tl tokens), s
the devices on the axis.

K/V blocks travel round the ring by `ppermute` while each device attends its queries to the
block it holds; the s partial outputs merge by their log-sum-exp. Causal rows use the zigzag
layout (`zigzag_order`: device r holds chunks r and 2s-1-r of the row's 2s), so every step is
Tl/2 × Tl scores on every device (`visible_chunk_pairs`). The backward, a custom VJP, sends the
blocks round again with their gradient accumulators and recomputes each step's partial
attention, pulling back through it the cotangents the merge gives it:

    w = exp(lse_j - lse),  d out_j = w · d out,  d lse_j = w · (d out · (out_j - out) + d lse).

Design notes: docs/parallelism.md.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels.attention import attention, merge_partial_attentions


def zigzag_order(length: int, devices: int) -> np.ndarray:
    """Token order of the zigzag layout: device r's Tl = length / devices tokens
    are order[r·Tl : (r + 1)·Tl], chunks r and 2·devices - 1 - r of the row."""
    if length % (2 * devices):
        raise ValueError(f"a row of {length} tokens does not split into 2 × {devices} chunks")
    chunks = np.arange(length).reshape(2 * devices, -1)
    return np.concatenate([np.concatenate([chunks[r], chunks[2 * devices - 1 - r]])
                           for r in range(devices)])


def visible_chunk_pairs(devices: int) -> list[int]:
    """Per device, the (query chunk, key chunk) pairs of a row that causal attention must
    compute under the zigzag layout."""
    held = [(r, 2 * devices - 1 - r) for r in range(devices)]
    return [sum(k <= q for q in mine for k in range(2 * devices)) for mine in held]


def ring_attention(q_BxTlxNxH: jax.Array, k_BxTlxKxH: jax.Array, v_BxTlxKxH: jax.Array,
                   segment_ids_BxTl: jax.Array, *, axis_name: str, causal: bool = True,
                   impl: str = "auto", scale: float | None = None, return_lse: bool = False):
    """Attention of this device's queries over the keys of every device on `axis_name`; call
    inside `jax.shard_map` with the row split over that axis, in the zigzag layout when
    `causal`. Same results as `jaxllm.kernels.attention` on the whole row (in that order)."""
    if causal and q_BxTlxNxH.shape[1] % 2:
        raise ValueError(f"{q_BxTlxNxH.shape[1]} tokens per device do not split into the "
                         "zigzag's two chunks")
    out, lse = _ring(q_BxTlxNxH, k_BxTlxKxH, v_BxTlxKxH, segment_ids_BxTl,
                     _Ring(axis_name, causal, impl, scale))
    out = out.astype(q_BxTlxNxH.dtype)
    return (out, lse) if return_lse else out


class _Ring(NamedTuple):
    axis_name: str
    causal: bool
    impl: str
    scale: float | None


def _step(cfg: _Ring, j: int | jax.Array, q_BxTlxNxH, segment_ids_BxTl, k, v, kv_seg):
    """Partial attention (out float32, lse) of the local queries over the block that step j
    holds: device (r - j) mod s's keys. j is the int 0 or a traced step of the loop."""
    kernel = lambda q, k, v, qs, ks, causal: attention(
        q, k, v, qs, ks, impl=cfg.impl, causal=causal, scale=cfg.scale, return_lse=True)
    if not cfg.causal or isinstance(j, int):
        out, lse = kernel(q_BxTlxNxH, k, v, segment_ids_BxTl, kv_seg, cfg.causal)
        return out.astype(jnp.float32), lse
    s = jax.lax.axis_size(cfg.axis_name)
    r = jax.lax.axis_index(cfg.axis_name)
    half = q_BxTlxNxH.shape[1] // 2
    # Two half × half calls whose operands a select picks: a lax.cond around the kernels would
    # make autodiff store every block's scores (its partial evaluation of both branches
    # sees through the kernels' custom VJPs).
    earlier = (r - j) % s < r
    pick = lambda a, b: jnp.where(earlier, a, b)
    halves = lambda x: (x[:, :half], x[:, half:])
    (q1, q2), (s1, s2) = halves(q_BxTlxNxH), halves(segment_ids_BxTl)
    (k1, k2), (v1, v2), (t1, t2) = halves(k), halves(v), halves(kv_seg)
    # earlier (src < r): first chunk of queries and second, each over src's first chunk;
    # later (src > r): second chunk of queries over src's first chunk and its second.
    a = kernel(pick(q1, q2), k1, v1, pick(s1, s2), t1, False)
    b = kernel(q2, pick(k1, k2), pick(v1, v2), s2, pick(t1, t2), False)
    later_out, later_lse = merge_partial_attentions([a, b])
    first = (pick(a[0].astype(jnp.float32), 0.0), pick(a[1], -jnp.inf))
    second = (pick(b[0].astype(jnp.float32), later_out), pick(b[1], later_lse))
    return (jnp.concatenate([first[0], second[0]], axis=1),
            jnp.concatenate([first[1], second[1]], axis=1))


def _pass(cfg: _Ring, x):
    """One hop round the ring: device i's `x` goes to device i + 1."""
    s = jax.lax.axis_size(cfg.axis_name)
    return jax.lax.ppermute(x, cfg.axis_name, [(i, (i + 1) % s) for i in range(s)])


def _ring_steps(cfg: _Ring, kv, carry, body):
    """carry = body(j, kv_j, carry) for j = 0 .. s-1, where kv_j is the block that device
    r - j sent. Step 0 is unrolled (causal, it is the only one with a causal mask); the rest
    is one loop, so memory does not grow with s. Each step sends its block on before it
    computes, so the transfer overlaps the compute (the last send is spare: s hops, not s-1)."""
    s = jax.lax.axis_size(cfg.axis_name)
    nxt = _pass(cfg, kv)
    carry = body(0, kv, carry)

    def later(j, state):
        kv, carry = state
        nxt = _pass(cfg, kv)
        return nxt, body(j, kv, carry)

    return jax.lax.fori_loop(1, s, later, (nxt, carry))[1]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _ring(q, k, v, seg, cfg: _Ring):
    return _ring_fwd(q, k, v, seg, cfg)[0]


def _ring_fwd(q, k, v, seg, cfg: _Ring):
    B, Tl, N, _ = q.shape
    acc = (jnp.zeros(q.shape, jnp.float32), jnp.full((B, Tl, N), -jnp.inf, jnp.float32))
    step = lambda j, kv, acc: merge_partial_attentions([acc, _step(cfg, j, q, seg, *kv)])  # noqa: E731
    out, lse = _ring_steps(cfg, (k, v, seg), acc, step)
    return (out, lse), (q, k, v, seg, out, lse)


def _ring_bwd(cfg: _Ring, residuals, cotangents):
    q, k, v, seg, out, lse = residuals
    d_out, d_lse = cotangents
    d_out = d_out.astype(jnp.float32)
    d_out_dot_out = jnp.einsum("btnh,btnh->btn", d_out, out)
    # Rows that saw nothing (lse -inf) get no gradient: their weights are 0.
    safe_lse = jnp.where(jnp.isneginf(lse), jnp.inf, lse)

    def body(j, kv, carry):
        dq, dk, dv = carry
        (out_j, lse_j), pull = jax.vjp(
            lambda q, k, v: _step(cfg, j, q, seg, k, v, kv[2]), q, kv[0], kv[1])
        w = jnp.exp(lse_j - safe_lse)
        d_lse_j = w * (jnp.einsum("btnh,btnh->btn", d_out, out_j) - d_out_dot_out + d_lse)
        dq_j, dk_j, dv_j = pull((w[..., None] * d_out, d_lse_j))
        # The block's gradient travels with it; after step s - 1 one more hop takes it home.
        dk, dv = _pass(cfg, (dk + dk_j.astype(jnp.float32), dv + dv_j.astype(jnp.float32)))
        return dq + dq_j.astype(jnp.float32), dk, dv

    zeros = lambda x: jnp.zeros(x.shape, jnp.float32)
    dq, dk, dv = _ring_steps(cfg, (k, v, seg), (zeros(q), zeros(k), zeros(v)), body)
    return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype), None


_ring.defvjp(_ring_fwd, _ring_bwd)
