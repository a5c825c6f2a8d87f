"""Grouped matmul kernels against a per-group loop and jax.lax.ragged_dot, on CPU.

Pallas kernels run in interpret mode (GPU kernel: `interpret=True`; TPU kernel: TPU
interpret mode). Group sizes include zeros, sums short of M, and boundaries that are not
tile multiples. Tolerance: float32 1e-4 absolute and relative (K up to 130 terms summed in a
different order); bfloat16 3e-2.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.gmm import gmm, resolve_moe_impl, tgmm
from jaxllm.kernels.gmm_ref import gmm_loop, gmm_ragged_dot, tgmm_loop, tgmm_ragged_dot

KERNELS = {
    "pallas_gpu": dict(impl="pallas", backend="gpu", interpret=True, tiling=(16, 16, 16)),
    "pallas_tpu": dict(impl="pallas", backend="tpu", interpret=True, tiling=(128, 128, 128)),
    "xla": dict(impl="xla"),
}
# (M, K, N, group sizes): empty groups first, inside and last; a sum short of M (rows in no
# group must come out 0); one case crossing 128-row tiles for the TPU kernel.
CASES = {
    "small": (50, 24, 20, [10, 0, 23, 11]),
    "empty_and_short": (70, 40, 33, [0, 0, 17, 3, 16, 30, 0]),
    "all_empty": (20, 16, 16, [0, 0, 0]),
    "long": (300, 130, 140, [100, 0, 150, 30]),
}


def _data(M, K, N, sizes, dtype=jnp.float32, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)
    return normal(M, K), normal(len(sizes), K, N), jnp.asarray(sizes, jnp.int32), normal(M, N)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("case", CASES)
def test_gmm_forward_and_gradients(kernel, case):
    lhs, rhs, sizes, d_out = _data(*CASES[case])
    options = dict(KERNELS[kernel])
    if kernel == "pallas_gpu" and case == "long":
        options["tiling"] = (64, 64, 128)  # the GPU default: K and N padded to the tiles
    op = functools.partial(gmm, **options)

    def loss(fn, lhs, rhs):
        return jnp.sum(fn(lhs, rhs, sizes) * d_out)

    def run(fn, transposed_fn, lhs, rhs):  # jitted whole: compiles faster than eager loops
        grads = jax.grad(functools.partial(loss, fn), argnums=(0, 1))(lhs, rhs)
        # The transposed product on its own (weight gradients), and rhs given as [E, N, K].
        return fn(lhs, rhs, sizes), grads, transposed_fn(lhs, d_out, sizes), fn(
            d_out, rhs, sizes, transpose_rhs=True)

    got = jax.jit(functools.partial(run, op, functools.partial(tgmm, **options)))(lhs, rhs)
    want = jax.jit(functools.partial(run, gmm_loop, tgmm_loop))(lhs, rhs)
    np.testing.assert_allclose(got[0], gmm_ragged_dot(lhs, rhs, sizes), atol=1e-4, rtol=1e-4)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4), got, want)


@pytest.mark.parametrize("kernel", ["pallas_gpu", "pallas_tpu"])
def test_tgmm_gradients_and_bfloat16(kernel):
    lhs, rhs, sizes, d_out = _data(*CASES["small"], dtype=jnp.bfloat16, seed=1)
    out = gmm(lhs, rhs, sizes, **KERNELS[kernel])
    assert out.dtype == jnp.bfloat16
    want = gmm_loop(lhs.astype(jnp.float32), rhs.astype(jnp.float32), sizes)
    # Entries are sums of 24 products of N(0, 1) values (|x| up to ~15): 3e-2 relative, and
    # 0.15 absolute for entries near 0 whose bf16 inputs carry the rounding.
    np.testing.assert_allclose(out.astype(jnp.float32), want, atol=0.15, rtol=3e-2)
    # tgmm is differentiable too (second-order MoE tools, and checks gmm's transposes).
    lhs, _, sizes, d_out = _data(*CASES["small"])
    probe = jnp.asarray(np.random.default_rng(2).normal(size=(4, 24, 20)), jnp.float32)
    loss = lambda fn, a, b: jnp.sum(fn(a, b, sizes) * probe)
    got = jax.jit(jax.grad(functools.partial(loss, functools.partial(tgmm, **KERNELS[kernel])),
                           argnums=(0, 1)))(lhs, d_out)
    want = jax.jit(jax.grad(functools.partial(loss, tgmm_loop), argnums=(0, 1)))(lhs, d_out)
    for g, g_ref in zip(got, want, strict=True):
        np.testing.assert_allclose(g, g_ref, atol=1e-4, rtol=1e-4)


def test_ragged_dot_reference_agrees_with_loop():
    lhs, rhs, sizes, d_out = _data(*CASES["empty_and_short"])
    np.testing.assert_allclose(tgmm_ragged_dot(lhs, d_out, sizes), tgmm_loop(lhs, d_out, sizes),
                               atol=1e-4, rtol=1e-4)


def test_moe_impl_resolution():
    assert resolve_moe_impl("auto") == "pallas"  # interpreted on CPU: faster than ragged_dot
    assert resolve_moe_impl("xla") == "xla"
    with pytest.raises(ValueError, match="moe_impl"):
        resolve_moe_impl("megablox")
