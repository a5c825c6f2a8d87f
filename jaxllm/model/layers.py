"""Building blocks: RMSNorm, rotary embeddings, SwiGLU MLP.

Dimension letters: B batch, T length, D model dim, F ffn dim, N heads, H head dim.
Parameters are created with logical axis names (`embed`, `mlp`, ...); sharding.py maps them
onto the mesh.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mc
from flax import linen as nn


def dtype_of(name: str) -> jnp.dtype:
    return jnp.dtype(name)


def init_normal(std: float, axes: tuple[str, ...]):
    return nn.with_logical_partitioning(nn.initializers.normal(std), axes)


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
        y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=self.n_in)
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


def rope_inverse_frequencies(head_dim: int, theta: float) -> jax.Array:
    """float32 inverse frequencies theta^(-2i/H), i < H/2 (as Hugging Face computes them)."""
    exponents = jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim
    return 1.0 / (jnp.float32(theta) ** exponents)


def apply_rope(x_BxTxNxH: jax.Array, positions_BxT: jax.Array, theta: float) -> jax.Array:
    """Rotary embedding in the rotate-half layout of Hugging Face (no weight permutation)."""
    head_dim = x_BxTxNxH.shape[-1]
    inv_freq = rope_inverse_frequencies(head_dim, theta)
    angles_BxTxH2 = positions_BxT.astype(jnp.float32)[..., None] * inv_freq
    angles_BxTx1xH = jnp.concatenate([angles_BxTxH2, angles_BxTxH2], axis=-1)[:, :, None, :]
    x32 = x_BxTxNxH.astype(jnp.float32)
    x1, x2 = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    out = x32 * jnp.cos(angles_BxTx1xH) + rotated * jnp.sin(angles_BxTx1xH)
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
