"""Grouped matmul for mixture-of-experts layers: `gmm`, `tgmm`, differentiable, by impl.

Dimension letters (docs/glossary.md): M rows (tokens sorted by expert), I contracted dim, O
output dim, E groups (experts). Rows [start_e, end_e) belong to group e (running sums of
group_sizes); rows in no group give 0.

    gmm(lhs_MxI, rhs_ExIxO, group_sizes_E)  -> out_MxO,   out[m] = lhs[m] @ rhs[group(m)]
    tgmm(lhs_MxI, rhs_MxO, group_sizes_E)   -> out_ExIxO, out[e] = lhs[e's rows]ᵀ @ rhs[e's rows]

Backward of gmm: d lhs = gmm(d out, rhs, transposed), d rhs = tgmm(lhs, d out) (the weight
gradient); tgmm's backward is two gmm calls. `impl` (config `model.moe_impl`): 'pallas' runs
gmm_gpu (Triton) on GPU, gmm_tpu (Mosaic) on TPU and the GPU kernel interpreted on CPU, by
the platform traced for (kernels/platform.py);
'xla' runs `jax.lax.ragged_dot`; 'auto' is pallas (fastest measured on CPU too). Accumulation is
float32; outputs take lhs's dtype. References: gmm_ref.py.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jaxllm.kernels import gmm_ref
from jaxllm.kernels.mask import pad_to
from jaxllm.kernels.platform import traced_platform

MOE_IMPLS = ("auto", "xla", "pallas")


def resolve_moe_impl(impl: str) -> str:
    if impl not in MOE_IMPLS:
        raise ValueError(f"moe_impl {impl!r} is not one of {', '.join(MOE_IMPLS)}")
    if impl != "auto":
        return impl
    # Pallas everywhere: on CPU its interpreted GPU kernel (a loop of tile matmuls) measured
    # 5-10x faster than ragged_dot at 1K-4K rows (benchmarks/gmm.py, 2-core CPU).
    return "pallas"


@dataclasses.dataclass(frozen=True)
class _Static:
    tiling: tuple[int, int, int]  # (tm, ti, to)
    backend: str  # "gpu" or "tpu" kernels
    interpret: bool


def _static(backend: str | None, interpret: bool | None, tiling) -> _Static:
    platform = traced_platform()
    backend = backend or ("tpu" if platform == "tpu" else "gpu")
    interpret = platform == "cpu" if interpret is None else interpret
    # TPU tiles are (8, 128)-aligned MXU tiles; 64×64×128 suits Triton on H100 with bf16.
    default = (128, 128, 128) if backend == "tpu" else (64, 64, 128)
    return _Static(tuple(tiling or default), backend, interpret)


def _fit(size: int, tile: int, backend: str) -> int:
    """The tile, shrunk (to a power of two) for small dims; Mosaic keeps 128-multiples."""
    if backend == "tpu":
        return tile
    while tile > 16 and tile // 2 >= size:
        tile //= 2
    return tile


def _kernels(backend: str):
    if backend == "tpu":
        from jaxllm.kernels import gmm_tpu as module
    else:
        from jaxllm.kernels import gmm_gpu as module
    return module


def _gmm_pallas(lhs, rhs, group_sizes, transpose_rhs: bool, st: _Static):
    M, I = lhs.shape
    O = rhs.shape[1] if transpose_rhs else rhs.shape[2]
    tm, ti, to = (_fit(d, t, st.backend) for d, t in zip((M, I, O), st.tiling, strict=True))
    starts, ends = gmm_ref.group_bounds(group_sizes, M)
    lhs_p = pad_to(pad_to(lhs, 0, tm), 1, ti)
    rhs_p = pad_to(pad_to(rhs, 1, to if transpose_rhs else ti), 2, ti if transpose_rhs else to)
    out = _kernels(st.backend).gmm(lhs_p, rhs_p, starts, ends, tiling=(tm, ti, to),
                                   transpose_rhs=transpose_rhs, out_dtype=lhs.dtype,
                                   interpret=st.interpret)[:M, :O]
    # Rows in no group: tiles past the last group are never written on TPU.
    return jnp.where((jnp.arange(M) < ends[-1])[:, None], out, jnp.zeros_like(out))


def _tgmm_pallas(lhs, rhs, group_sizes, st: _Static):
    (M, I), O = lhs.shape, rhs.shape[1]
    tm, ti, to = (_fit(d, t, st.backend) for d, t in zip((M, I, O), st.tiling, strict=True))
    starts, ends = gmm_ref.group_bounds(group_sizes, M)
    lhs_p, rhs_p = pad_to(pad_to(lhs, 0, tm), 1, ti), pad_to(pad_to(rhs, 0, tm), 1, to)
    out = _kernels(st.backend).tgmm(lhs_p, rhs_p, starts, ends, tiling=(tm, ti, to),
                                    out_dtype=lhs.dtype, interpret=st.interpret)[:, :I, :O]
    return jnp.where((ends > starts)[:, None, None], out, jnp.zeros_like(out))


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _gmm(lhs, rhs, group_sizes, transpose_rhs: bool, st: _Static):
    return _gmm_pallas(lhs, rhs, group_sizes, transpose_rhs, st)


def _gmm_fwd(lhs, rhs, group_sizes, transpose_rhs, st):
    return _gmm(lhs, rhs, group_sizes, transpose_rhs, st), (lhs, rhs, group_sizes)


def _gmm_bwd(transpose_rhs, st, residuals, d_out):
    lhs, rhs, group_sizes = residuals
    d_lhs = _gmm(d_out.astype(lhs.dtype), rhs, group_sizes, not transpose_rhs, st)
    if transpose_rhs:  # rhs is [E, O, I]: its gradient is the transposed product the other way
        d_rhs = _tgmm(d_out.astype(lhs.dtype), lhs, group_sizes, st)
    else:
        d_rhs = _tgmm(lhs, d_out.astype(lhs.dtype), group_sizes, st)
    return d_lhs, d_rhs.astype(rhs.dtype), None


_gmm.defvjp(_gmm_fwd, _gmm_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _tgmm(lhs, rhs, group_sizes, st: _Static):
    return _tgmm_pallas(lhs, rhs, group_sizes, st)


def _tgmm_fwd(lhs, rhs, group_sizes, st):
    return _tgmm(lhs, rhs, group_sizes, st), (lhs, rhs, group_sizes)


def _tgmm_bwd(st, residuals, d_out_ExIxO):
    lhs, rhs, group_sizes = residuals
    d_out = d_out_ExIxO.astype(lhs.dtype)
    d_lhs = _gmm(rhs, d_out, group_sizes, True, st)  # d lhs[m] = rhs[m] @ d out[g]ᵀ
    d_rhs = _gmm(lhs, d_out, group_sizes, False, st)  # d rhs[m] = lhs[m] @ d out[g]
    return d_lhs, d_rhs.astype(rhs.dtype), None


_tgmm.defvjp(_tgmm_fwd, _tgmm_bwd)


def gmm(lhs_MxI: jax.Array, rhs_ExIxO: jax.Array, group_sizes_E: jax.Array, *,
        impl: str = "auto", transpose_rhs: bool = False,
        tiling: tuple[int, int, int] | None = None, backend: str | None = None,
        interpret: bool | None = None) -> jax.Array:
    """out[m] = lhs[m] @ rhs[group(m)]; `transpose_rhs` takes rhs as [E, O, I]."""
    group_sizes_E = group_sizes_E.astype(jnp.int32)
    if resolve_moe_impl(impl) == "xla":
        return gmm_ref.gmm_ragged_dot(lhs_MxI, rhs_ExIxO, group_sizes_E, transpose_rhs)
    return _gmm(lhs_MxI, rhs_ExIxO, group_sizes_E, transpose_rhs,
                _static(backend, interpret, tiling))


def tgmm(lhs_MxI: jax.Array, rhs_MxO: jax.Array, group_sizes_E: jax.Array, *,
         impl: str = "auto", tiling: tuple[int, int, int] | None = None,
         backend: str | None = None, interpret: bool | None = None) -> jax.Array:
    """out[e] = lhs[rows of e]ᵀ @ rhs[rows of e] (zeros for an empty group)."""
    group_sizes_E = group_sizes_E.astype(jnp.int32)
    if resolve_moe_impl(impl) == "xla":
        return gmm_ref.tgmm_ragged_dot(lhs_MxI, rhs_MxO, group_sizes_E)
    return _tgmm(lhs_MxI, rhs_MxO, group_sizes_E, _static(backend, interpret, tiling))
