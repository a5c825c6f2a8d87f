"""Which keys a query may see, shared by every attention implementation.

Dimension letters (docs/glossary.md): B batch, T query length, S key length.
A query at index t sits at key position t + (S - T) (queries are the last T positions, as in
decoding with a cache; for self-attention T == S and the offset is 0). Key s is visible to
query t when all of these hold:
  - same segment: q_segment_ids[t] == kv_segment_ids[s] (packed documents);
  - causal: s <= t + (S - T);
  - local window W: t + (S - T) - s < W, and when not causal also s - (t + S - T) < W.
A query that sees no key gets output 0 and log-sum-exp -inf.

The block-bound helpers return the half-open range of blocks that can hold a visible pair, so
loops skip blocks that causality or the window mask entirely; they take Python or traced ints.
Within that range, `ranges_overlap` skips pairs of blocks from different documents.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

# Finite, so a block with every score masked cannot produce NaN (inf - inf); exp of it
# minus any real row maximum underflows to exactly 0.
MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


@dataclasses.dataclass(frozen=True)
class MaskSpec:
    """Static description of the mask: hashable, so it can be a jit/custom_vjp static arg."""

    causal: bool = True
    local_window: int | None = None
    q_offset: int = 0  # S - T
    kv_len: int | None = None  # real key length when keys are padded to a block multiple

    def visible(self, q_index, k_index, q_segment=None, kv_segment=None):
        """Boolean mask broadcast from index/segment arrays; None when everything is visible."""
        q_pos = q_index + self.q_offset
        conditions = []
        if q_segment is not None:
            conditions.append(q_segment == kv_segment)
        if self.causal:
            conditions.append(k_index <= q_pos)
        if self.local_window is not None:
            conditions.append(q_pos - k_index < self.local_window)
            if not self.causal:
                conditions.append(k_index - q_pos < self.local_window)
        if self.kv_len is not None:
            conditions.append(k_index < self.kv_len)
        if not conditions:
            return None
        mask = conditions[0]
        for c in conditions[1:]:
            mask = jnp.logical_and(mask, c)
        return mask

    def kv_block_range(self, q_block, block_q: int, block_k: int, num_k_blocks: int):
        """Key blocks [lo, hi) that query block `q_block` can see."""
        first_pos = q_block * block_q + self.q_offset
        last_pos = first_pos + block_q - 1
        hi = num_k_blocks
        if self.causal:
            hi = _min(hi, _cdiv_nonneg(last_pos + 1, block_k))
        elif self.local_window is not None:
            hi = _min(hi, _cdiv_nonneg(last_pos + self.local_window, block_k))
        lo = 0
        if self.local_window is not None:
            lo = _div(_max(first_pos - self.local_window + 1, 0), block_k)
        lo = _min(lo, num_k_blocks)
        return lo, _max(hi, lo)

    def q_block_range(self, k_block, block_k: int, block_q: int, num_q_blocks: int):
        """Query blocks [lo, hi) that can see key block `k_block`."""
        first_key = k_block * block_k
        last_key = first_key + block_k - 1
        lo = 0
        if self.causal:
            lo = _div(_max(first_key - self.q_offset, 0), block_q)
        elif self.local_window is not None:
            lo = _div(_max(first_key - self.local_window + 1 - self.q_offset, 0), block_q)
        hi = num_q_blocks
        if self.local_window is not None:
            last_q = last_key + self.local_window - 1 - self.q_offset
            hi = _min(hi, _cdiv_nonneg(last_q + 1, block_q))
        lo = _min(lo, num_q_blocks)
        return lo, _max(hi, lo)


def segment_range(segment_ids_BxT: jax.Array, block: int) -> tuple[jax.Array, jax.Array]:
    """Smallest and largest segment id of each block, [B, T / block] each."""
    B, T = segment_ids_BxT.shape
    blocks = segment_ids_BxT.reshape(B, T // block, block)
    return jnp.min(blocks, axis=-1), jnp.max(blocks, axis=-1)


def ranges_overlap(lo_a, hi_a, lo_b, hi_b):
    """Whether two blocks can share a segment id: if their [min, max] id ranges are disjoint,
    no pair matches and the block pair is skipped (packed documents make most pairs so)."""
    return jnp.any((lo_a <= hi_b) & (lo_b <= hi_a))


def _div(a, b: int):
    """a // b for a >= 0; lax.div because `//` on traced ints does not lower in Triton."""
    return a // b if isinstance(a, int) else jax.lax.div(a, jnp.asarray(b, a.dtype))


def _cdiv_nonneg(a, b: int):
    """ceil(a / b), and 0 for a <= 0."""
    return _div(_max(a, 0) + b - 1, b)


def _max(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return max(a, b)
    return jnp.maximum(a, b)


def _min(a, b):
    if isinstance(a, int) and isinstance(b, int):
        return min(a, b)
    return jnp.minimum(a, b)


def pad_to(x: jax.Array, axis: int, multiple: int, value=0) -> jax.Array:
    """Pads `axis` up to a multiple of `multiple` (kernels need whole blocks)."""
    extra = -x.shape[axis] % multiple
    if not extra:
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, extra)
    return jnp.pad(x, widths, constant_values=value)
