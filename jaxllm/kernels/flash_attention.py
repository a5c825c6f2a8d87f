"""Flash attention with Pallas kernels: the public, differentiable entry point.

Dimension letters (docs/glossary.md): B batch, T query length, S key length, N query heads, K kv
heads, G = N / K, H head dim.

`flash_attention` pads lengths to whole blocks (padded keys are masked, padded queries
dropped), picks the kernel for the platform traced for (kernels/platform.py:
flash_attention_gpu, Triton, on NVIDIA GPUs; flash_attention_tpu, Mosaic, on TPU; on CPU the
GPU kernel runs in interpret mode) and wraps
it in a custom VJP: the forward saves only the output and the log-sum-exp, the backward
kernels recompute scores block by block. The reference is flash_attention_ref.attention_ref.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from jaxllm.kernels.mask import MaskSpec, pad_to
from jaxllm.kernels.platform import traced_platform


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Query/key block sizes of the forward, dQ and dK/dV kernels (powers of two)."""

    block_q: int
    block_k: int
    block_q_dq: int
    block_k_dq: int
    block_q_dkv: int
    block_k_dkv: int
    num_warps: int = 4  # Triton only
    num_stages: int = 2  # Triton only

    @classmethod
    def default(cls, backend: str, head_dim: int = 128) -> BlockSizes:
        if backend == "tpu":
            # The MXU wants ≥ 128-wide tiles; 512-key blocks amortise the per-step overhead.
            return cls(512, 512, 512, 512, 512, 512)
        # Triton on H100-class GPUs: a 128×64 forward tile fits the register file at H = 128;
        # the backward holds more live tiles, so it uses 64×64.
        return cls(128, 64, 64, 64, 64, 64, num_warps=8 if head_dim > 64 else 4,
                   num_stages=2)

    def fitted(self, T: int, S: int, min_block: int) -> BlockSizes:
        """Blocks no larger than the (power-of-two rounded) lengths, so short sequences work."""
        fit_q = lambda b: min(b, max(min_block, pl.next_power_of_2(T)))
        fit_k = lambda b: min(b, max(min_block, pl.next_power_of_2(S)))
        return dataclasses.replace(
            self, block_q=fit_q(self.block_q), block_k=fit_k(self.block_k),
            block_q_dq=fit_q(self.block_q_dq), block_k_dq=fit_k(self.block_k_dq),
            block_q_dkv=fit_q(self.block_q_dkv), block_k_dkv=fit_k(self.block_k_dkv))


@dataclasses.dataclass(frozen=True)
class _Static:
    mask: MaskSpec
    scale: float
    blocks: BlockSizes
    backend: str  # "gpu" or "tpu": which kernel module
    interpret: bool


def _kernels(backend: str):
    if backend == "tpu":
        from jaxllm.kernels import flash_attention_tpu as module
    else:
        from jaxllm.kernels import flash_attention_gpu as module
    return module


def flash_attention(q_BxTxNxH: jax.Array, k_BxSxKxH: jax.Array, v_BxSxKxH: jax.Array,
                    segment_ids_BxT: jax.Array | None = None,
                    kv_segment_ids_BxS: jax.Array | None = None, *, causal: bool = True,
                    local_window: int | None = None, scale: float | None = None,
                    return_lse: bool = False, block_sizes: BlockSizes | dict | None = None,
                    backend: str | None = None, interpret: bool | None = None):
    """Same contract as `attention_ref`. `backend` ('gpu' or 'tpu') defaults to the traced
    platform's; `interpret` defaults to True on CPU (tests) and False elsewhere."""
    B, T, N, H = q_BxTxNxH.shape
    S, K = k_BxSxKxH.shape[1], k_BxSxKxH.shape[2]
    if N % K:
        raise ValueError(f"{N} query heads are not a multiple of {K} kv heads")
    platform = traced_platform()
    backend = backend or ("tpu" if platform == "tpu" else "gpu")
    interpret = platform == "cpu" if interpret is None else interpret
    if segment_ids_BxT is not None and kv_segment_ids_BxS is None:
        kv_segment_ids_BxS = segment_ids_BxT
    if isinstance(block_sizes, dict) or block_sizes is None:
        block_sizes = dataclasses.replace(BlockSizes.default(backend, H), **(block_sizes or {}))
    blocks = block_sizes.fitted(T, S, 128 if backend == "tpu" else 16)
    q_multiple = max(blocks.block_q, blocks.block_q_dq, blocks.block_q_dkv)
    k_multiple = max(blocks.block_k, blocks.block_k_dq, blocks.block_k_dkv)
    S_pad = S + (-S % k_multiple)
    static = _Static(MaskSpec(causal=causal, local_window=local_window, q_offset=S - T,
                              kv_len=S if S_pad != S else None),
                     H ** -0.5 if scale is None else float(scale), blocks, backend, interpret)

    q, k, v = pad_to(q_BxTxNxH, 1, q_multiple), pad_to(k_BxSxKxH, 1, k_multiple), pad_to(
        v_BxSxKxH, 1, k_multiple)
    if backend == "gpu":  # Triton tiles need power-of-two sizes ≥ 16; zero columns change nothing
        H_pad = max(16, pl.next_power_of_2(H))
        q, k, v = (pad_to(x, 3, H_pad) for x in (q, k, v))
    q_seg = kv_seg = None
    if segment_ids_BxT is not None:
        q_seg = pad_to(segment_ids_BxT.astype(jnp.int32), 1, q_multiple)
        kv_seg = pad_to(kv_segment_ids_BxS.astype(jnp.int32), 1, k_multiple)
    out, lse_BxNxT = _flash(q, k, v, q_seg, kv_seg, static)
    out_BxTxNxH = out[:, :T, :, :H]
    if not return_lse:
        return out_BxTxNxH
    return out_BxTxNxH, lse_BxNxT[:, :, :T].transpose(0, 2, 1)


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def _flash(q, k, v, q_seg, kv_seg, static: _Static):
    return _kernels(static.backend).forward(q, k, v, q_seg, kv_seg, static, static.blocks,
                                            static.interpret)


def _flash_fwd(q, k, v, q_seg, kv_seg, static: _Static):
    out, lse = _flash(q, k, v, q_seg, kv_seg, static)
    return (out, lse), (q, k, v, q_seg, kv_seg, out, lse)


def _flash_bwd(static: _Static, residuals, cotangents):
    q, k, v, q_seg, kv_seg, out, lse_BxNxT = residuals
    d_out, d_lse_BxNxT = cotangents
    # d lse / d s = p, so the lse cotangent folds into delta (FlashAttention-2 backward).
    delta_BxNxT = jnp.einsum("btnh,btnh->bnt", d_out.astype(jnp.float32),
                             out.astype(jnp.float32)) - d_lse_BxNxT
    # Rows that saw no key: +inf turns every recomputed p = exp(s - lse) into exactly 0.
    lse_BxNxT = jnp.where(jnp.isneginf(lse_BxNxT), jnp.inf, lse_BxNxT)
    dq, dk, dv = _kernels(static.backend).backward(
        q, k, v, q_seg, kv_seg, d_out.astype(q.dtype), lse_BxNxT, delta_BxNxT, static,
        static.blocks, static.interpret)
    return dq, dk, dv, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
