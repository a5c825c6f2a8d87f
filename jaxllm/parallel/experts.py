"""Mixture-of-experts dispatch: routing, the experts' SwiGLU on token-copies sorted by expert,
and expert parallelism (all-to-all over the `expert` mesh axes inside `jax.shard_map`).

Dimension letters (docs/glossary.md): k experts per token, Fe an expert's ffn dim, BT = B·T
tokens, M = BT·k token-copies, Ec an expert's capacity, El = E / ep the experts of one device
(ep the size of the expert mesh axes), Mr the rows a device receives in the exchange.

    y[t] = Σ_j weights[t, j] · (silu(x[t] @ gate[e]) · (x[t] @ up[e])) @ down[e],  e = experts[t, j]

Copies are numbered choice-major (copy j·BT + t is token t's j-th choice), the capacity
priority, and a stable argsort by expert groups them. Dropless (capacity_factor 0): three
grouped matmuls (jaxllm.kernels.gmm) on the sorted copies. Capacity: Ec = ceil(capacity_factor ·
BT · k / E) slots an expert, an [E, Ec, D] buffer through dense einsums; copies past them are
dropped and counted. On a mesh, copies go to their experts' devices and back (`EXCHANGE`), in
blocks by sharding.LOGICAL_AXIS_RULES:

| operand                 | logical axes                  | split inside the shard_map        |
|-------------------------|-------------------------------|-----------------------------------|
| x, weights, experts, y  | batch, length, –              | (data, fsdp, expert), sequence, – |
| gate, up [E, D, Fe]     | expert, embed, expert_mlp     | expert, –, tensor                 |
| down [E, Fe, D]         | expert, expert_mlp, embed     | expert, tensor, –                 |

Design notes (the exchange, gradients, measurements): docs/moe.md.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
from jax.sharding import AxisType
from jax.sharding import PartitionSpec as P

from jaxllm.kernels.gmm import gmm, resolve_moe_impl
from jaxllm.kernels.platform import traced_platform
from jaxllm.parallel.blocks import CHECK_VMA, axes_of_type, mesh_axes_for

EXCHANGE = "auto"  # dropless exchange on a mesh: auto (ragged on gpu/tpu), ragged, padded


def route(logits_BxTxE: jax.Array, top_k: int, norm_topk_prob: bool):
    """-> (probs_BxTxE, weights_BxTxk, experts_BxTxk int32): float32 softmax, its top k (ties
    as jax.lax.top_k), renormalised to sum 1 when `norm_topk_prob`."""
    probs_BxTxE = jax.nn.softmax(logits_BxTxE.astype(jnp.float32), axis=-1)
    weights_BxTxk, experts_BxTxk = jax.lax.top_k(probs_BxTxE, top_k)
    if norm_topk_prob:
        weights_BxTxk = weights_BxTxk / jnp.sum(weights_BxTxk, axis=-1, keepdims=True)
    return probs_BxTxE, weights_BxTxk, experts_BxTxk.astype(jnp.int32)


def capacity(capacity_factor: float, BT: int, k: int, E: int) -> int:
    """Slots per expert: ceil(factor · BT · k / E), at most the BT·k copies there are."""
    return max(1, min(math.ceil(capacity_factor * BT * k / E), BT * k))


def _silu_mul(gate_MxFe: jax.Array, up_MxFe: jax.Array) -> jax.Array:
    h = jax.nn.silu(gate_MxFe.astype(jnp.float32)) * up_MxFe.astype(jnp.float32)
    return h.astype(gate_MxFe.dtype)


def grouped_ffn(x_MxD, group_sizes_E, gate_ExDxFe, up_ExDxFe, down_ExFexD, impl: str):
    """The SwiGLU of expert e on rows of group e (rows in no group give 0): three gmm calls."""
    h_MxFe = _silu_mul(gmm(x_MxD, gate_ExDxFe, group_sizes_E, impl=impl),
                       gmm(x_MxD, up_ExDxFe, group_sizes_E, impl=impl))
    return gmm(h_MxFe, down_ExFexD, group_sizes_E, impl=impl)


def batched_ffn(x_ExEcxD, gate_ExDxFe, up_ExDxFe, down_ExFexD):
    """The SwiGLU of expert e on its Ec slots: dense einsums, float32 accumulation."""
    def mm(spec, a, b):
        return jnp.einsum(spec, a, b, preferred_element_type=jnp.float32).astype(a.dtype)
    h_ExEcxFe = _silu_mul(mm("ecd,edf->ecf", x_ExEcxD, gate_ExDxFe),
                          mm("ecd,edf->ecf", x_ExEcxD, up_ExDxFe))
    return mm("ecf,efd->ecd", h_ExEcxFe, down_ExFexD)


@dataclasses.dataclass(frozen=True)
class _Sorted:
    """The M copies sorted by expert: copy order_M[j] is j-th; inverse_M its inverse."""

    order_M: jax.Array
    inverse_M: jax.Array
    group_sizes_E: jax.Array

    @property
    def starts_E(self) -> jax.Array:
        return jnp.cumsum(self.group_sizes_E) - self.group_sizes_E


def _sort(experts_M: jax.Array, E: int) -> _Sorted:
    order_M = jnp.argsort(experts_M, stable=True)
    M = experts_M.shape[0]
    inverse_M = jnp.zeros((M,), jnp.int32).at[order_M].set(jnp.arange(M, dtype=jnp.int32))
    return _Sorted(order_M, inverse_M, jnp.bincount(experts_M, length=E).astype(jnp.int32))


# --- the exchange over the expert axes (dropless) -----------------------------------------


@dataclasses.dataclass(frozen=True)
class _Route:
    """Where this device's sorted copies go: contiguous runs of `send_sizes_ep` rows from
    `send_offsets_ep`, and the [ep, El] counts it receives from each source."""

    axes: tuple[str, ...]
    send_offsets_ep: jax.Array
    send_sizes_ep: jax.Array
    recv_counts_epxEl: jax.Array

    @property
    def recv_sizes_ep(self) -> jax.Array:
        return jnp.sum(self.recv_counts_epxEl, axis=1)


def _plan(group_sizes_E: jax.Array, axes: tuple[str, ...], ep: int) -> _Route:
    counts_epxEl = group_sizes_E.reshape(ep, -1)
    send_sizes_ep = jnp.sum(counts_epxEl, axis=1)
    recv_counts_epxEl = jax.lax.all_to_all(counts_epxEl, axes, 0, 0, tiled=True)
    return _Route(axes, jnp.cumsum(send_sizes_ep) - send_sizes_ep, send_sizes_ep,
                  recv_counts_epxEl)


def _use_ragged() -> bool:
    return EXCHANGE == "ragged" or (EXCHANGE == "auto" and traced_platform() in ("gpu", "tpu"))


def _send(x_MxD: jax.Array, r: _Route, ep: int) -> jax.Array:
    """Sorted copies → [ep · M, D] on their experts' devices, source i's rows at i·M."""
    M = x_MxD.shape[0]
    if _use_ragged():
        me = jax.lax.axis_index(r.axes)
        return jax.lax.ragged_all_to_all(
            x_MxD, jnp.zeros((ep * M, *x_MxD.shape[1:]), x_MxD.dtype), r.send_offsets_ep,
            r.send_sizes_ep, jnp.full((ep,), me * M, jnp.int32), r.recv_sizes_ep,
            axis_name=r.axes)
    rows_epxM = r.send_offsets_ep[:, None] + jnp.arange(M)
    valid_epxM = jnp.arange(M) < r.send_sizes_ep[:, None]
    blocks_epxMxD = jnp.where(valid_epxM[..., None], x_MxD[jnp.minimum(rows_epxM, M - 1)], 0)
    return jax.lax.all_to_all(blocks_epxMxD, r.axes, 0, 0).reshape(ep * M, -1)


def _send_back(y_MrxD: jax.Array, r: _Route, ep: int) -> jax.Array:
    """The reverse of `_send`: results → [M, D] in this device's sorted order."""
    M = y_MrxD.shape[0] // ep
    if _use_ragged():
        return jax.lax.ragged_all_to_all(
            y_MrxD, jnp.zeros((M, *y_MrxD.shape[1:]), y_MrxD.dtype),
            jnp.arange(ep, dtype=jnp.int32) * M, r.recv_sizes_ep,
            jax.lax.all_to_all(r.send_offsets_ep, r.axes, 0, 0, tiled=True), r.send_sizes_ep,
            axis_name=r.axes)
    back_epxMxD = jax.lax.all_to_all(y_MrxD.reshape(ep, M, -1), r.axes, 0, 0)
    shard_M = jnp.searchsorted(jnp.cumsum(r.send_sizes_ep), jnp.arange(M), side="right")
    shard_M = jnp.minimum(shard_M, ep - 1)  # rows past the last run are never read
    return back_epxMxD[shard_M, jnp.arange(M) - r.send_offsets_ep[shard_M]]


def _received_experts(r: _Route, M: int) -> jax.Array:
    """[ep · M] local expert of each received row; El for the padding after a source's run."""
    ends_epxEl = jnp.cumsum(r.recv_counts_epxEl, axis=1)
    find = jax.vmap(lambda ends_El: jnp.searchsorted(ends_El, jnp.arange(M), side="right"))
    return find(ends_epxEl).reshape(-1).astype(jnp.int32)


def _expert_parallel_ffn(x_MxD, group_sizes_E, gate_ExDxFe, up_ExDxFe, down_ExFexD, impl,
                         axes: tuple[str, ...], ep: int):
    """grouped_ffn of the sorted copies, each run on the device that owns its expert."""
    r = _plan(group_sizes_E, axes, ep)
    x_MrxD = _send(x_MxD, r, ep)
    local = _sort(_received_experts(r, x_MxD.shape[0]), gate_ExDxFe.shape[0] + 1)
    y_MrxD = grouped_ffn(x_MrxD[local.order_M], local.group_sizes_E[:-1], gate_ExDxFe, up_ExDxFe,
                         down_ExFexD, impl)
    return _send_back(y_MrxD[local.inverse_M], r, ep)


# --- one block of tokens --------------------------------------------------------------------


def _dropless(x_BTxD, experts_M, E, ffn_args, impl, ep_axes, ep):
    s = _sort(experts_M, E)
    x_MxD = x_BTxD[s.order_M % x_BTxD.shape[0]]  # choice-major: copy m is token m mod BT
    if ep_axes is None:
        y_MxD = grouped_ffn(x_MxD, s.group_sizes_E, *ffn_args, impl)
    else:
        y_MxD = _expert_parallel_ffn(x_MxD, s.group_sizes_E, *ffn_args, impl, ep_axes, ep)
    return y_MxD[s.inverse_M], jnp.int32(0)


def _with_capacity(x_BTxD, experts_M, E, ffn_args, Ec, ep_axes, ep):
    s = _sort(experts_M, E)
    BT, M = x_BTxD.shape[0], experts_M.shape[0]
    slot_ExEc = s.starts_E[:, None] + jnp.arange(Ec)
    filled_ExEc = jnp.arange(Ec) < s.group_sizes_E[:, None]
    token_ExEc = s.order_M[jnp.minimum(slot_ExEc, M - 1)] % BT
    x_ExEcxD = jnp.where(filled_ExEc[..., None], x_BTxD[token_ExEc], 0)
    if ep_axes is None:
        y_ExEcxD = batched_ffn(x_ExEcxD, *ffn_args)
    else:  # [ep, El, Ec, D] blocks: device j gets every source's slots of its El experts
        El, D = E // ep, x_BTxD.shape[1]
        x_epxElxEcxD = jax.lax.all_to_all(x_ExEcxD.reshape(ep, El, Ec, D), ep_axes, 0, 0)
        x_ElxMrxD = x_epxElxEcxD.transpose(1, 0, 2, 3).reshape(El, ep * Ec, D)
        y_ElxMrxD = batched_ffn(x_ElxMrxD, *ffn_args)
        y_epxElxEcxD = y_ElxMrxD.reshape(El, ep, Ec, D).transpose(1, 0, 2, 3)
        y_ExEcxD = jax.lax.all_to_all(y_epxElxEcxD, ep_axes, 0, 0).reshape(E, Ec, D)
    position_M = s.inverse_M - s.starts_E[experts_M]
    kept_M = position_M < Ec
    y_MxD = jnp.where(kept_M[:, None], y_ExEcxD[experts_M, jnp.minimum(position_M, Ec - 1)], 0)
    return y_MxD, jnp.sum(~kept_M).astype(jnp.int32)


def _local(x_BxTxD, weights_BxTxk, experts_BxTxk, gate_ExDxFe, up_ExDxFe, down_ExFexD, *,
           impl: str, capacity_factor: float, E: int, split: _Split | None = None):
    """The dispatch of one block of tokens (a device's, on a mesh): (y in x's dtype, dropped)."""
    B, T, D = x_BxTxD.shape
    k, BT = weights_BxTxk.shape[-1], B * T
    x_BTxD = x_BxTxD.reshape(BT, D)
    experts_M = experts_BxTxk.reshape(BT, k).T.reshape(-1)  # choice-major: the capacity priority
    ffn_args = (gate_ExDxFe, up_ExDxFe, down_ExFexD)
    ep_axes = None if split is None else split.expert
    ep = 1 if ep_axes is None else E // gate_ExDxFe.shape[0]
    if capacity_factor > 0:
        y_MxD, dropped = _with_capacity(x_BTxD, experts_M, E, ffn_args,
                                        capacity(capacity_factor, BT, k, E), ep_axes, ep)
    else:
        y_MxD, dropped = _dropless(x_BTxD, experts_M, E, ffn_args, impl, ep_axes, ep)
    y_BTxD = jnp.einsum("kn,knd->nd", weights_BxTxk.reshape(BT, k).T.astype(jnp.float32),
                        y_MxD.reshape(k, BT, D).astype(jnp.float32))
    if split is not None and split.mlp is not None:  # partial sums over this device's Fe
        y_BTxD = jax.lax.psum(y_BTxD, split.mlp)
    if split is not None and split.tokens:
        dropped = jax.lax.psum(dropped, split.tokens)
    return y_BTxD.reshape(B, T, D).astype(x_BxTxD.dtype), dropped


# --- the mesh -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Split:
    """Mesh axes of each dimension on one mesh; None: whole on every device."""

    batch: tuple[str, ...] | None
    length: tuple[str, ...] | None
    expert: tuple[str, ...] | None
    mlp: tuple[str, ...] | None

    @property
    def tokens(self) -> tuple[str, ...]:
        return (self.batch or ()) + (self.length or ())

    def specs(self) -> tuple[P, ...]:
        rows = P(self.batch, self.length, None)
        return (rows, rows, rows, P(self.expert, None, self.mlp), P(self.expert, None, self.mlp),
                P(self.expert, self.mlp, None))


def experts_split(mesh, B: int, T: int, E: int, Fe: int) -> _Split | None:
    """How the dispatch of these sizes splits over `mesh`; None when nothing splits."""
    if mesh.empty:
        return None
    split = _Split(mesh_axes_for(mesh, "batch", B), mesh_axes_for(mesh, "length", T),
                   mesh_axes_for(mesh, "expert", E), mesh_axes_for(mesh, "expert_mlp", Fe))
    return None if split == _Split(None, None, None, None) else split


def experts_ffn(x_BxTxD, weights_BxTxk, experts_BxTxk, gate_ExDxFe, up_ExDxFe, down_ExFexD, *,
                impl: str = "auto", capacity_factor: float = 0.0):
    """-> (y_BxTxD in x's dtype, dropped: int32, token-copies dropped in the whole batch).
    capacity_factor 0 is dropless; see the module docstring."""
    resolve_moe_impl(impl)  # an unknown impl fails here, whichever path runs
    (B, T, _), (E, _, Fe) = x_BxTxD.shape, gate_ExDxFe.shape
    mesh = jax.sharding.get_abstract_mesh()
    split = experts_split(mesh, B, T, E, Fe)
    local = functools.partial(_local, impl=impl, capacity_factor=capacity_factor, E=E)
    operands = (x_BxTxD, weights_BxTxk, experts_BxTxk, gate_ExDxFe, up_ExDxFe, down_ExFexD)
    if split is None:
        return local(*operands)
    specs = split.specs()
    if axes_of_type(mesh, AxisType.Explicit):  # explicit shardings must equal in_specs
        operands = [jax.reshard(a, s) for a, s in zip(operands, specs, strict=True)]
    return jax.shard_map(functools.partial(local, split=split), mesh=mesh, in_specs=specs,
                         out_specs=(specs[0], P()), check_vma=CHECK_VMA)(*operands)


def experts_ffn_ref(x_BxTxD, weights_BxTxk, experts_BxTxk, gate_ExDxFe, up_ExDxFe, down_ExFexD,
                    *, impl: str = "auto", capacity_factor: float = 0.0):
    """experts_ffn the slow obvious way: every expert on every token, masked (one device)."""
    del impl
    B, T, D = x_BxTxD.shape
    E, k, BT, dtype = gate_ExDxFe.shape[0], weights_BxTxk.shape[-1], B * T, x_BxTxD.dtype
    x_BTxD, experts_BTxk = x_BxTxD.reshape(BT, D), experts_BxTxk.reshape(BT, k)
    kept_BTxk = jnp.ones((BT, k), bool)
    if capacity_factor > 0:  # a copy's place in its expert's queue, copies taken choice-major
        one_hot_kxBTxE = experts_BTxk.T[..., None] == jnp.arange(E)
        one_hot_MxE = one_hot_kxBTxE.reshape(k * BT, E)
        before_MxE = jnp.cumsum(one_hot_MxE, axis=0) - one_hot_MxE
        place_kxBT = jnp.sum(before_MxE * one_hot_MxE, -1).reshape(k, BT)
        kept_BTxk = place_kxBT.T < capacity(capacity_factor, BT, k, E)
    mm = lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32).astype(dtype)  # noqa: E731
    y_BTxD = jnp.zeros((BT, D), jnp.float32)
    for e in range(E):
        h_BTxFe = _silu_mul(mm(x_BTxD, gate_ExDxFe[e]), mm(x_BTxD, up_ExDxFe[e]))
        w_BT = jnp.sum(jnp.where((experts_BTxk == e) & kept_BTxk,
                                 weights_BxTxk.reshape(BT, k).astype(jnp.float32), 0), axis=1)
        y_BTxD = y_BTxD + w_BT[:, None] * mm(h_BTxFe, down_ExFexD[e]).astype(jnp.float32)
    return y_BTxD.reshape(B, T, D).astype(dtype), jnp.sum(~kept_BTxk).astype(jnp.int32)
