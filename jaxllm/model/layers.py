"""Building blocks: RMSNorm, rotary embeddings (plain, YaRN, dynamic NTK, LogN), SwiGLU MLP.

Dimension letters (docs/glossary.md): B batch, T length, D model dim, F ffn dim, N heads, H head
dim. Parameters are created with logical axis names (`embed`, `mlp`, ...); sharding.py maps them
onto the mesh.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import ml_collections as mc
from flax import linen as nn


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def init_normal(std: float, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def matmul(x: jax.Array, kernel: jax.Array, n_in: int) -> jax.Array:
    """jnp.tensordot(x, kernel, n_in), whose kernel gradient is one dot_general contracting
    x's and the output gradient's token dims [B, T] as they are: autodiff of the tensordot of a
    3-D x gives it a transpose of the output gradient, which XLA:CPU materialises in a slow
    strided copy (the MLP's backward was 2x slower), and merging B and T into one dim first
    makes the partitioner all-gather x over the sequence axis (B split over data, T over
    sequence) in every layer's backward."""
    return jnp.tensordot(x, kernel, axes=n_in)


def _matmul_fwd(x, kernel, n_in):
    return matmul(x, kernel, n_in), (x, kernel)


def _matmul_bwd(n_in, residuals, dy):
    x, kernel = residuals
    out = kernel.ndim - n_in
    dx = jnp.tensordot(dy, kernel, axes=(tuple(range(dy.ndim - out, dy.ndim)),
                                         tuple(range(n_in, kernel.ndim))))
    tokens = tuple(range(x.ndim - n_in))
    dkernel = jax.lax.dot_general(x, dy, ((tokens, tokens), ((), ())))
    return dx.astype(x.dtype), dkernel.astype(kernel.dtype)


matmul.defvjp(_matmul_fwd, _matmul_bwd)


class Linear(nn.Module):
    """Contracts the last `n_in` dims of x with a kernel stored [in..., out...].

    Unlike nn.DenseGeneral, the kernel is created in its full shape, so its logical axis
    names (`axes`, one per kernel dim) apply to the array that is stored.
    """

    features: tuple[int, ...]
    axes: tuple[str, ...]
    cfg: mc.FrozenConfigDict
    n_in: int = 1
    use_bias: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        cfg, dtype = self.cfg, dtype_of(self.cfg.dtype)
        shape = (*x.shape[x.ndim - self.n_in:], *self.features)
        kernel = self.param("kernel", init_normal(cfg.init_std, self.axes), shape,
                            dtype_of(cfg.param_dtype))
        y = matmul(x.astype(dtype), kernel.astype(dtype), self.n_in)
        if self.use_bias:
            bias = self.param("bias", nn.with_logical_partitioning(
                nn.initializers.zeros, self.axes[self.n_in:]), self.features,
                dtype_of(cfg.param_dtype))
            y = y + bias.astype(dtype)
        return y


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in float32 (bf16 variance underflows)."""

    eps: float
    dtype: str = "float32"
    param_dtype: str = "float32"

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        scale_D = self.param(
            "scale", nn.with_logical_partitioning(nn.initializers.ones, ("norm",)),
            (x_BxTxD.shape[-1],), dtype_of(self.param_dtype))
        x32 = x_BxTxD.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        # Same order as Hugging Face Qwen2/Llama: cast back first, then scale.
        dtype = dtype_of(self.dtype)
        return scale_D.astype(dtype) * normed.astype(dtype)


def rope_inverse_frequencies(head_dim: int, theta) -> jax.Array:
    """float32 inverse frequencies theta^(-2i/H), i < H/2 (as Hugging Face computes them)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.asarray(theta, jnp.float32) ** exponents)


def yarn_frequencies(head_dim: int, theta: float, scaling) -> tuple[jax.Array, float]:
    """YaRN (Peng et al. 2023) as transformers computes it: (inverse frequencies, the factor
    that multiplies cos and sin). Dimensions that turn fewer than beta_slow times over the
    original length are interpolated (frequency / factor), those that turn more than beta_fast
    times keep their frequency, with a linear ramp between; the attention factor defaults to
    0.1·ln(factor) + 1."""
    factor, original = scaling.factor, scaling.original_max_position_embeddings

    def correction_dim(rotations: float) -> float:  # the dim that turns `rotations` times
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    high = high + 0.001 if low == high else high  # no zero-width ramp
    ramp = jnp.clip((jnp.arange(head_dim // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
    extrapolated = rope_inverse_frequencies(head_dim, theta)
    inv_freq = extrapolated / factor * ramp + extrapolated * (1 - ramp)
    attention_factor = scaling.attention_factor or (
        0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv_freq, attention_factor


def rope(cfg: mc.FrozenConfigDict, theta: float | None = None):
    """The model's rotary embedding, `rope(x [B, T, heads, H], positions [B, T])`, by
    `cfg.rope_scaling.type`:

    none         theta^(-2i/H) (`theta` defaults to cfg.rope_theta)
    yarn         `yarn_frequencies`; the rotated x is multiplied by the attention factor
    dynamic_ntk  transformers' "dynamic": for a call whose last position p exceeds the
                 original length L, the base grows to theta·(factor·(p+1)/L - factor + 1)^(H/(H-2))
    and with `rope_scaling.logn` the queries (`query=True`) at positions p ≥ L are also scaled
    by log(p+1) / log(L) (Qwen-7B's LogN attention scaling), keys never.
    """
    theta = cfg.rope_theta if theta is None else theta
    scaling, H = cfg.rope_scaling, cfg.head_dim
    original = scaling.original_max_position_embeddings

    def apply(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, query: bool = False) -> jax.Array:
        scale = 1.0
        if scaling.type == "yarn":
            inv_freq, scale = yarn_frequencies(H, theta, scaling)
        elif scaling.type == "dynamic_ntk":
            length = jnp.maximum(jnp.max(positions_BxT) + 1, original).astype(jnp.float32)
            base = theta * (scaling.factor * length / original - (scaling.factor - 1)) ** (
                H / (H - 2))
            inv_freq = rope_inverse_frequencies(H, base)
        else:
            inv_freq = rope_inverse_frequencies(H, theta)
        out = apply_rope(x_BxTxNxH, positions_BxT, inv_freq, scale)
        if query and scaling.logn:
            p = positions_BxT.astype(jnp.float32) + 1
            logn_BxT = jnp.where(p > original, jnp.log(p) / math.log(original), 1.0)
            out = (out.astype(jnp.float32) * logn_BxT[..., None, None]).astype(out.dtype)
        return out

    return apply


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, inv_freq_H2: jax.Array,
               scale: float = 1.0) -> jax.Array:
    """Rotary embedding in the rotate-half layout of Hugging Face (no weight permutation),
    with inverse frequencies [H/2] and cos/sin multiplied by `scale`."""
    angles_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq_H2
    angles_BxTx1xH = jnp.concatenate([angles_BxTxH2, angles_BxTxH2], axis=-1)[:, :, None, :]
    x32 = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    cos, sin = jnp.cos(angles_BxTx1xH), jnp.sin(angles_BxTx1xH)
    if scale != 1.0:
        cos, sin = cos * scale, sin * scale
    out = x32 * cos + rotated * sin
    return out.astype(x_BxTxNxH.dtype)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x)); F is `intermediate_size` unless `features` says."""

    cfg: mc.FrozenConfigDict
    features: int | None = None

    @nn.compact
    def __call__(self, x_BxTxD: jax.Array) -> jax.Array:
        cfg = self.cfg
        F, D = self.features or cfg.intermediate_size, cfg.hidden_size
        gate_BxTxF = Linear((F,), ("embed", "mlp"), cfg, name="gate_proj")(x_BxTxD)
        up_BxTxF = Linear((F,), ("embed", "mlp"), cfg, name="up_proj")(x_BxTxD)
        h_BxTxF = nn.with_logical_constraint(nn.silu(gate_BxTxF) * up_BxTxF,
                                             ("batch", "length", "mlp"))
        return Linear((D,), ("mlp", "embed"), cfg, name="down_proj")(h_BxTxF)
