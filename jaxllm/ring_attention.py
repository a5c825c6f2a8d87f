"""Ring attention: context parallelism over one mesh axis, inside `jax.shard_map`.

Dimension letters: B batch, T query length of one device, N query heads, K kv heads, H head
dim, s devices on the axis, c = T / 2 tokens of one chunk.

Each of the s devices holds T of a row's s·T tokens. The keys and values travel round the
ring with `ppermute`, one hop a step, while each device attends its queries to the block it
holds; the s partial outputs merge by their log-sum-exp. A step's send does not depend on its
attention, so the transfer of the next block overlaps the compute of this one.

Load balance (causal). In order, a row is 2s chunks; device r holds chunks r and 2s-1-r (the
"zigzag" layout: `zigzag_order`). Its own two chunks are in order, so step 0 is ordinary causal
attention over them. At later steps the block comes from device src: when src < r, both of
r's chunks see all of src's first chunk and none of its second; when src > r, r's second
chunk sees both of src's chunks and r's first sees neither. Either way a step is c × 2c
scores on every device, so no device waits for another: each computes 2s + 1 of the (2s)²
chunk pairs (`visible_chunk_pairs`). Documents (segment ids) need no layout: a row's segment
ids are global, so equal ids mean the same document on any two devices.

Without causality every step is all of T × T, with any layout.

The backward is autodiff through the steps: the kernels' VJPs take the log-sum-exp cotangent
that the merge produces. Every received block is a residual, so keys and values cost s blocks
per layer in the backward, queries and outputs one.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.kernels.attention import attention


def zigzag_order(length: int, devices: int) -> np.ndarray:
    """Token order of the zigzag layout: device r's T = length / devices tokens are
    order[r·T : (r + 1)·T], chunks r and 2·devices - 1 - r of the row."""
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


def _merge(acc, part):
    """Two partial attentions of the same queries (out float32 [B, T, N, H], lse [B, T, N])."""
    (out_a, lse_a), (out_b, lse_b) = acc, part
    # Rows that saw nothing in either part (lse -inf in both) stay 0 with lse -inf, and every
    # derivative stays finite: the shift m cancels, and the log is of a sum made 1 there.
    m = jax.lax.stop_gradient(jnp.maximum(lse_a, lse_b))
    m = jnp.where(jnp.isneginf(m), 0.0, m)
    total = jnp.exp(lse_a - m) + jnp.exp(lse_b - m)
    seen = total > 0
    lse = jnp.where(seen, m + jnp.log(jnp.where(seen, total, 1.0)), -jnp.inf)
    safe = jnp.where(seen, lse, 0.0)
    weight = lambda x: jnp.exp(x - safe)[..., None]
    return out_a * weight(lse_a) + out_b.astype(jnp.float32) * weight(lse_b), lse


def ring_attention(q_BxTxNxH: jax.Array, k_BxTxKxH: jax.Array, v_BxTxKxH: jax.Array,
                   segment_ids_BxT: jax.Array, *, axis_name: str, causal: bool = True,
                   impl: str = "auto", scale: float | None = None, return_lse: bool = False):
    """Attention of this device's queries over the keys of every device on `axis_name`; call
    inside `jax.shard_map` with the row split over that axis, in the zigzag layout when
    `causal`. Same results as `jaxllm.kernels.attention` on the whole row (in that order)."""
    s = jax.lax.axis_size(axis_name)
    r = jax.lax.axis_index(axis_name)
    T = q_BxTxNxH.shape[1]
    if causal and T % 2:
        raise ValueError(f"{T} tokens per device do not split into the zigzag's two chunks")
    c = T // 2
    kernel = lambda q, k, v, qs, ks, causal: attention(
        q, k, v, qs, ks, impl=impl, causal=causal, scale=scale, return_lse=True)

    def step(j, k, v, kv_seg):
        if not causal:
            return kernel(q_BxTxNxH, k, v, segment_ids_BxT, kv_seg, False)
        if j == 0:
            return kernel(q_BxTxNxH, k, v, segment_ids_BxT, kv_seg, True)
        # Two c × c calls whose operands a select picks: a lax.cond around the kernels would
        # make autodiff store every block's scores (its partial evaluation of both branches
        # sees through the kernels' custom VJPs).
        earlier = (r - j) % s < r
        pick = lambda a, b: jnp.where(earlier, a, b)
        halves = lambda x: (x[:, :c], x[:, c:])
        (q1, q2), (s1, s2) = halves(q_BxTxNxH), halves(segment_ids_BxT)
        (k1, k2), (v1, v2), (t1, t2) = halves(k), halves(v), halves(kv_seg)
        # earlier (src < r): first chunk of queries and second, each over src's first chunk;
        # later (src > r): second chunk of queries over src's first chunk and its second.
        a = kernel(pick(q1, q2), k1, v1, pick(s1, s2), t1, False)
        b = kernel(q2, pick(k1, k2), pick(v1, v2), s2, pick(t1, t2), False)
        later_out, later_lse = _merge((a[0].astype(jnp.float32), a[1]), b)
        first = (pick(a[0].astype(jnp.float32), 0.0), pick(a[1], -jnp.inf))
        second = (pick(b[0].astype(jnp.float32), later_out), pick(b[1], later_lse))
        return (jnp.concatenate([first[0], second[0]], axis=1),
                jnp.concatenate([first[1], second[1]], axis=1))

    ring = [(i, (i + 1) % s) for i in range(s)]
    kv = (k_BxTxKxH, v_BxTxKxH, segment_ids_BxT)
    acc = None
    for j in range(s):
        nxt = jax.lax.ppermute(kv, axis_name, ring) if j + 1 < s else None  # overlaps the step
        out, lse = step(j, *kv)
        acc = (out.astype(jnp.float32), lse) if acc is None else _merge(acc, (out, lse))
        kv = nxt
    out, lse = acc
    out = out.astype(q_BxTxNxH.dtype)
    return (out, lse) if return_lse else out
