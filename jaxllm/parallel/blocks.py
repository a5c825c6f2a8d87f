"""Kernels on the mesh: `jax.shard_map` wrappers that hand each device its own block.

Dimension letters (docs/glossary.md): T is the whole row's query length, s the size of the
sequence axes, Tl = T / s the queries of one device.

XLA cannot partition a Pallas call (it gathers sharded operands and runs the whole kernel on
every device), so `attention` runs the kernel inside `jax.shard_map` on per-device blocks of the
mesh found at trace time (`jax.sharding.get_abstract_mesh`), by sharding.LOGICAL_AXIS_RULES:

| operand                       | logical axes              | mesh axes                      |
|-------------------------------|---------------------------|--------------------------------|
| q, out [B, T, N, H]           | batch, length, heads, –   | (data, fsdp), sequence, tensor |
| k, v [B, S, K, H]             | batch, length, kv_heads, –| (data, fsdp), sequence, tensor |
| segment ids [B, T] / [B, S]   | batch, length             | (data, fsdp), sequence         |
| lse [B, T, N]                 | batch, length, heads      | (data, fsdp), sequence, tensor |

Over `sequence`, causal self-attention on rows in the zigzag layout (`zigzag_rows()`) is ring
attention (jaxllm/parallel/ring_attention.py); on rows in order each device keeps its Tl queries and
all-gathers K/V, shifted right by (s-1-i)·Tl on device i (the gap: keys of segment
GAP_SEGMENT), so that the kernels' causal offset is device i's. Anything else keeps T and S
whole. A dimension its mesh axes do not divide stays whole; with no mesh or no split the kernel
runs directly.
Design notes: docs/parallelism.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxllm.kernels.attention import attention as kernel_attention
from jaxllm.parallel import sharding
from jaxllm.parallel.ring_attention import ring_attention, zigzag_order

# Logical name → mesh axes, from the one table in sharding.py.
_MESH_AXES = {name: (axes,) if isinstance(axes, str) else tuple(axes or ())
              for name, axes in sharding.LOGICAL_AXIS_RULES}
# check_vma=True rejects both kernels (jax 0.10): a pallas_call's out_shape would have to name
# its varying axes, and the chunked kernel's lax.cond skip branch returns unvarying constants.
# Off, shard_map's transpose divides by and sums over the axes a spec leaves out, which is the
# right gradient for operands replicated over them (tested against one device).
CHECK_VMA = False
GAP_SEGMENT = -1  # segment id of the keys that fill the shift: real segment ids are >= 0


@dataclasses.dataclass(frozen=True)
class AttentionSplit:
    """Mesh axes of each attention dimension on one mesh; None: whole on every device."""

    batch: tuple[str, ...] | None
    sequence: tuple[str, ...] | None  # queries split, K/V gathered (self-attention only)
    heads: tuple[str, ...] | None

    def q(self) -> P:  # q and out [B, T, N, H]
        return P(self.batch, self.sequence, self.heads, None)

    def rows(self) -> P:  # segment ids [B, T]
        return P(self.batch, self.sequence)

    def lse(self) -> P:  # [B, T, N]
        return P(self.batch, self.sequence, self.heads)


def axes_of_type(mesh, axis_type: AxisType) -> tuple[str, ...]:
    # From the public axis_types rather than AbstractMesh helpers that have moved between
    # jax releases (0.10 here, 0.11 on the GPU machine).
    return tuple(a for a, t in zip(mesh.axis_names, mesh.axis_types, strict=True)
                 if t == axis_type)


def mesh_axes_for(mesh, logical: str, *sizes: int) -> tuple[str, ...] | None:
    """The mesh axes that split dimensions of `sizes` named `logical`, or None (kept whole):
    only axes of the mesh, larger than 1 and not already manual (inside another shard_map);
    None too when their product does not divide every size."""
    manual = axes_of_type(mesh, AxisType.Manual)
    axes = tuple(a for a in _MESH_AXES.get(logical, ())
                 if a in mesh.shape and mesh.shape[a] > 1 and a not in manual)
    ways = math.prod(mesh.shape[a] for a in axes)
    if not axes or any(n % ways for n in sizes):
        return None
    return axes


def attention_split(mesh, B: int, T: int, S: int, N: int, K: int,
                    causal: bool) -> AttentionSplit | None:
    """How attention of these sizes splits over `mesh`; None when nothing splits (call the
    kernel directly)."""
    if mesh.empty:
        return None
    heads = mesh_axes_for(mesh, "heads", N, K)
    if heads != mesh_axes_for(mesh, "kv_heads", N, K):  # GQA groups must stay whole on a device
        heads = None
    # The key shift is a causal offset: only causal self-attention splits its queries.
    sequence = mesh_axes_for(mesh, "length", T) if causal and T == S else None
    split = AttentionSplit(mesh_axes_for(mesh, "batch", B), sequence, heads)
    return None if split == AttentionSplit(None, None, None) else split


_ZIGZAG = contextvars.ContextVar("jaxllm_zigzag_rows", default=False)


@contextlib.contextmanager
def zigzag_rows() -> Iterator[None]:
    """While tracing under it, rows split over `sequence` are in the zigzag layout
    (`row_order`), and causal self-attention runs as ring attention."""
    token = _ZIGZAG.set(True)
    try:
        yield
    finally:
        _ZIGZAG.reset(token)


def row_order(mesh, T: int) -> np.ndarray | None:
    """The token order that rows of T tokens take on `mesh` for ring attention (device r of
    the s on `sequence` holds chunks r and 2s-1-r of 2s), or None when `sequence` does not
    split them (then they stay in order)."""
    axes = mesh_axes_for(mesh, "length", T)
    if axes is None or len(axes) != 1 or T % (2 * mesh.shape[axes[0]]):
        return None
    return zigzag_order(T, mesh.shape[axes[0]])


def traced_in_row_order(fn: Callable, order: np.ndarray | None) -> Callable:
    """`fn`, traced under `zigzag_rows()` when `order` (from `row_order`) is not None: for a
    step function whose batches are laid out in that order."""
    if order is None:
        return fn

    @functools.wraps(fn)
    def in_zigzag(*args, **kwargs):
        with zigzag_rows():
            return fn(*args, **kwargs)

    return in_zigzag


def _shifted_keys(x_BxSx_: jax.Array, sequence: tuple[str, ...], Tl: int, fill):
    """This device's view of the gathered keys: the S keys ending at its last query (device i
    of s sees keys [(i+1)·Tl - S, (i+1)·Tl), those before 0 being `fill`)."""
    x_BxSx_ = jax.lax.all_gather(x_BxSx_, sequence, axis=1, tiled=True)
    S = x_BxSx_.shape[1]
    gap = jnp.full((x_BxSx_.shape[0], S - Tl, *x_BxSx_.shape[2:]), fill, x_BxSx_.dtype)
    start = jax.lax.axis_index(sequence) * Tl
    return jax.lax.dynamic_slice_in_dim(jnp.concatenate([gap, x_BxSx_], axis=1), start, S,
                                        axis=1)


def _sequence_local(call, sequence: tuple[str, ...], q, k, v, q_seg, kv_seg):
    """Per-device body when queries split over `sequence` (see the module docstring)."""
    B, Tl = q.shape[:2]
    if q_seg is None:  # the gap needs segment ids to be masked
        q_seg = jnp.ones((B, Tl), jnp.int32)
    kv_seg = q_seg if kv_seg is None else kv_seg
    k, v = (_shifted_keys(x, sequence, Tl, 0) for x in (k, v))
    kv_seg = _shifted_keys(kv_seg.astype(jnp.int32), sequence, Tl, GAP_SEGMENT)
    return call(q, k, v, q_seg.astype(jnp.int32), kv_seg)


def attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
              segment_ids_BxT: jax.Array | None = None,
              kv_segment_ids_BxS: jax.Array | None = None, *, impl: str = "auto",
              causal: bool = True, return_lse: bool = False, **kwargs):
    """jaxllm.kernels.attention (same arguments and results), run on per-device blocks of the
    mesh in context; see the module docstring for the blocks."""
    B, T, N, _ = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1:3]
    mesh = jax.sharding.get_abstract_mesh()
    split = attention_split(mesh, B, T, S, N, K, causal)
    call = functools.partial(kernel_attention, impl=impl, causal=causal,
                             return_lse=return_lse, **kwargs)
    if split is None:
        return call(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, kv_segment_ids_BxS)
    # shard_map takes arrays only: absent segment ids travel as a mask of which are given.
    operands = (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, kv_segment_ids_BxS)
    given = tuple(x is not None for x in operands)
    in_specs = tuple(s for s, g in zip((split.q(),) * 3 + (split.rows(),) * 2, given,
                                       strict=True) if g)

    zigzag = split.sequence is not None and _ZIGZAG.get()
    if zigzag and (len(split.sequence) != 1 or T % (2 * mesh.shape[split.sequence[0]])
                   or kwargs.get("local_window") is not None):
        raise ValueError(f"rows of {T} tokens declared in the zigzag layout cannot run as ring "
                         f"attention over {split.sequence} (needs one axis, T divisible by "
                         "twice its size, no local window)")
    if zigzag and kv_segment_ids_BxS is not None and kv_segment_ids_BxS is not segment_ids_BxT:
        raise ValueError("ring attention takes self-attention segment ids only; dual chunk "
                         "attention (model.dca.enabled) cannot run on rows in the zigzag layout")

    def local(*blocks):
        it = iter(blocks)
        args = [next(it) if g else None for g in given]
        if split.sequence is None:
            return call(*args)
        if zigzag:
            q, k, v, q_seg, _ = args  # self-attention: the keys' segment ids are the queries'
            q_seg = jnp.ones(q.shape[:2], jnp.int32) if q_seg is None else q_seg
            return ring_attention(q, k, v, q_seg, axis_name=split.sequence[0], impl=impl,
                                  scale=kwargs.get("scale"), return_lse=return_lse)
        return _sequence_local(call, split.sequence, *args)

    arrays = [x for x in operands if x is not None]
    if axes_of_type(mesh, AxisType.Explicit):  # explicit shardings must equal in_specs
        arrays = [jax.reshard(x, s) for x, s in zip(arrays, in_specs, strict=True)]
    out_specs = (split.q(), split.lse()) if return_lse else split.q()
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=CHECK_VMA)(*arrays)
