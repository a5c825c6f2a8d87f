"""The Pallas kernels compiled for a real accelerator (Triton on an NVIDIA GPU, Mosaic on a
TPU), against the references: the same checks as the interpret-mode tests, at kernel block
sizes, and the model with the kernel (what attention_impl='auto' runs there) against the
model with XLA attention. Skipped on CPU, where tests/unit/kernels/test_kernels_attention.py,
test_kernels_gmm.py and test_attention_impls.py run the same kernels interpreted.
`benchmarks/device_check.sh` runs this file first on a GPU. Tolerances: float32 inputs 1e-2
(TF32 matmuls in Triton on the accelerator), bfloat16 inputs 3e-2."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.flash_attention import flash_attention
from jaxllm.kernels.flash_attention_ref import attention_ref
from jaxllm.kernels.gmm import gmm, tgmm
from jaxllm.kernels.gmm_ref import gmm_loop, tgmm_loop

pytestmark = pytest.mark.skipif(
    jax.default_backend() not in ("gpu", "tpu"),
    reason="needs a GPU or TPU: on CPU the kernels are tested in interpret mode")


def _attention_case(T, S, K, G, H, causal, window, dtype, seed):
    rng = np.random.default_rng(seed)
    normal = lambda *s: jnp.asarray(rng.normal(size=s), jnp.float32).astype(dtype)
    q, k, v = normal(2, T, K * G, H), normal(2, S, K, H), normal(2, S, K, H)
    seg = jnp.asarray(np.sort(rng.integers(0, 4, (2, S)), axis=1), jnp.int32)

    def run(fn, q, k, v):
        def loss(q, k, v):
            out, lse = fn(q, k, v, seg[:, S - T:], seg, causal=causal, local_window=window,
                          return_lse=True)
            return jnp.sum(out.astype(jnp.float32) ** 2) + jnp.sum(lse), (out, lse)

        (_, aux), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, k, v)
        return aux, grads

    return q, k, v, jax.jit(functools.partial(run, flash_attention)), jax.jit(
        functools.partial(run, attention_ref))


@pytest.mark.parametrize("dtype,tol", [("float32", 1e-2), ("bfloat16", 3e-2)])
@pytest.mark.parametrize("G,causal,window", [(1, True, None), (2, False, None), (7, True, 200)])
def test_flash_attention_on_device(dtype, tol, G, causal, window):
    q, k, v, ours, ref = _attention_case(1000, 1000, 2, G, 128, causal, window,
                                         jnp.dtype(dtype), seed=G)
    got, want = ours(q, k, v), ref(*(x.astype(jnp.float32) for x in (q, k, v)))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                                   atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [("float32", 2e-2), ("bfloat16", 1e-1)])
def test_gmm_on_device(dtype, tol):
    rng = np.random.default_rng(0)
    sizes = jnp.asarray([300, 0, 1000, 17, 700, 0], jnp.int32)
    lhs = jnp.asarray(rng.normal(size=(2100, 384)), dtype)
    rhs = jnp.asarray(rng.normal(size=(6, 384, 640)) / 20, dtype)
    d_out = jnp.asarray(rng.normal(size=(2100, 640)), dtype)

    def run(fn, tfn, lhs, rhs):
        loss = lambda a, b: jnp.sum(fn(a, b, sizes).astype(jnp.float32) * d_out)
        return fn(lhs, rhs, sizes), jax.grad(loss, argnums=(0, 1))(lhs, rhs), tfn(
            lhs, d_out, sizes)

    got = jax.jit(functools.partial(run, functools.partial(gmm, impl="pallas"),
                                    functools.partial(tgmm, impl="pallas")))(lhs, rhs)
    want = jax.jit(functools.partial(run, gmm_loop, tgmm_loop))(
        lhs.astype(jnp.float32), rhs.astype(jnp.float32))
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        np.testing.assert_allclose(np.asarray(a, np.float32) / scale, np.asarray(b) / scale,
                                   atol=tol)


def test_model_with_the_kernel_on_device():
    """Loss and parameter gradients of a small model on packed documents, attention_impl
    'pallas' vs 'xla', float32; each leaf within 1e-2 of its largest value."""
    from jaxllm.model import apply, init_params
    from tests.helpers.model import small_config

    tokens = jax.random.randint(jax.random.key(0), (2, 256), 0, 128)
    positions = jnp.broadcast_to(jnp.arange(256), (2, 256))
    segments = jnp.asarray(np.repeat([[1, 2, 3, 4], [1, 1, 2, 2]], 64, axis=1), jnp.int32)
    params = init_params(small_config(head_dim=64), jax.random.key(1))

    def loss_and_grads(impl):
        cfg = small_config(head_dim=64, attention_impl=impl)
        loss = lambda p: jnp.mean(apply(cfg, p, tokens, positions, segments) ** 2)
        return jax.jit(jax.value_and_grad(loss))(params)

    got, want = loss_and_grads("pallas"), loss_and_grads("xla")
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        scale = float(jnp.max(jnp.abs(b))) + 1e-6
        np.testing.assert_allclose(np.asarray(a) / scale, np.asarray(b) / scale, atol=1e-2)
