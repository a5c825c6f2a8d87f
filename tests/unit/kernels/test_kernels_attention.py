"""Attention kernels against the full-softmax reference, forward and gradients, on CPU.

The Pallas kernels run in interpret mode: the GPU (Triton) kernel with `interpret=True`, the
TPU (Mosaic) kernel under TPU interpret mode (`pltpu.InterpretParams`). This checks their
logic, block bookkeeping and masks, not their lowering: that needs the accelerator
(tests/unit/kernels/test_kernels_device.py). Tolerances: float32 inputs 2e-5 absolute + 2e-5
relative (differences are summation order only); bfloat16 inputs 3e-2 (bf16 probabilities in the
second matmul, bf16 outputs), against the reference run in float32 on the same bf16 values.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.chunked_attention import chunked_attention, default_block
from jaxllm.kernels.flash_attention import flash_attention
from jaxllm.kernels.flash_attention_ref import attention_ref

SMALL_GPU = dict(block_q=16, block_k=16, block_q_dq=16, block_k_dq=16, block_q_dkv=16,
                 block_k_dkv=16)
IMPLS = {
    "chunked": functools.partial(chunked_attention, block_q=16, block_k=16),
    "pallas_gpu": functools.partial(flash_attention, backend="gpu", interpret=True,
                                    block_sizes=SMALL_GPU),
    "pallas_tpu": functools.partial(flash_attention, backend="tpu", interpret=True),
}
# (B, T, S, K, G, H, causal, local_window, segments): lengths are not block multiples
# (16 for chunked and GPU, 128 for TPU); G covers 1, 2 and 7; segments give several documents
# per row; "T < S" puts the queries at the end of the keys, some rows seeing no key at all.
CASES = {
    "G1_causal_segments": (2, 45, 45, 2, 1, 16, True, None, "docs"),
    "G7_bidirectional_window_segments": (1, 37, 37, 1, 7, 16, False, 9, "docs"),
    "G2_T<S_causal_empty_rows": (1, 20, 45, 1, 2, 16, True, None, "empty_rows"),
}
TPU_LENGTH = {45: 150, 37: 137, 20: 20}  # TPU blocks are 128: cross a boundary


def _inputs(B, T, S, K, G, H, segments, dtype, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)
    q, k, v = normal(B, T, K * G, H), normal(B, S, K, H), normal(B, S, K, H)
    seg_q = seg_kv = None
    if segments:
        seg_kv = jnp.asarray(np.sort(rng.integers(0, 4, (B, S)), axis=1), jnp.int32)
        seg_q = seg_kv[:, S - T:]
        if segments == "empty_rows":  # a document with no keys visible to it
            seg_q = seg_q.at[:, :3].set(99)
    return q, k, v, seg_q, seg_kv


def _run(fn, q, k, v, seg_q, seg_kv, **kw):
    """Output, lse and the gradients of a loss that uses both (lse as DCA would); jitted as
    one program, which compiles faster than running the loops eagerly."""
    def loss(q, k, v, seg_q, seg_kv):
        out, lse = fn(q, k, v, seg_q, seg_kv, return_lse=True, **kw)
        lse_term = jnp.where(jnp.isfinite(lse), lse, 0.0)
        return (jnp.sum(out.astype(jnp.float32) * jnp.cos(out.astype(jnp.float32)))
                + 0.5 * jnp.sum(lse_term)), (out, lse)

    @jax.jit
    def run(q, k, v, seg_q, seg_kv):
        (_, (out, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(
            q, k, v, seg_q, seg_kv)
        return out, lse, grads

    return run(q, k, v, seg_q, seg_kv)


def _check(got, want, tol):
    out, lse, grads = got
    out_ref, lse_ref, grads_ref = want
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(lse_ref))
    finite = np.isfinite(lse_ref)
    np.testing.assert_allclose(np.asarray(lse)[finite], np.asarray(lse_ref)[finite], atol=tol,
                               rtol=tol)
    np.testing.assert_allclose(np.asarray(out, np.float32), np.asarray(out_ref, np.float32),
                               atol=tol, rtol=tol)
    for name, g, g_ref in zip("qkv", grads, grads_ref, strict=True):
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
        np.testing.assert_allclose(np.asarray(g, np.float32), np.asarray(g_ref, np.float32),
                                   atol=tol, rtol=tol, err_msg=f"d{name}")


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES)
def test_matches_reference_float32(impl, case):
    B, T, S, K, G, H, causal, window, segments = CASES[case]
    if impl == "pallas_tpu":
        T, S = TPU_LENGTH[T], TPU_LENGTH[S]
    inputs = _inputs(B, T, S, K, G, H, segments, jnp.float32)
    kw = dict(causal=causal, local_window=window)
    want = _run(attention_ref, *inputs, **kw)
    got = _run(IMPLS[impl], *inputs, **kw)
    _check(got, want, 2e-5)
    if segments == "empty_rows":  # rows that see nothing: output 0, lse -inf
        assert not np.asarray(got[0][:, :3]).any() and np.isneginf(got[1][:, :3]).all()


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_reference_bfloat16(impl):
    T = 150 if impl == "pallas_tpu" else 45
    inputs = _inputs(1, T, T, 2, 2, 32, "docs", jnp.bfloat16, seed=1)
    want = _run(attention_ref, *(x if x is None or x.dtype != jnp.bfloat16 else
                                 x.astype(jnp.float32) for x in inputs))
    got = _run(IMPLS[impl], *inputs)
    assert got[0].dtype == jnp.bfloat16 and got[1].dtype == jnp.float32
    assert all(g.dtype == jnp.bfloat16 for g in got[2])
    _check(got, want, 3e-2)


@pytest.mark.parametrize("T", [300, 600])
def test_chunked_default_blocks(T):
    """The model calls chunked attention with its default blocks (128 tokens up to 512, then
    256): lengths that are not a multiple of them, packed documents, T < S."""
    assert [default_block(n) for n in (64, 512, 513, 4096)] == [128, 128, 256, 256]
    inputs = _inputs(1, T - 30, T, 1, 2, 8, "docs", jnp.float32, seed=2)
    _check(_run(chunked_attention, *inputs), _run(attention_ref, *inputs), 2e-5)


def test_scale_and_gqa_layout():
    """A custom softmax scale, and query head n reading kv head n // G (HF repeat_kv)."""
    q, k, v, _, _ = _inputs(1, 24, 24, 2, 3, 16, None, jnp.float32)
    got = IMPLS["chunked"](q, k, v, scale=0.3)
    repeated = [jnp.repeat(x, 3, axis=2) for x in (k, v)]
    want = attention_ref(q, *repeated, scale=0.3)
    np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)
    pallas = IMPLS["pallas_gpu"](q, k, v, scale=0.3)
    np.testing.assert_allclose(pallas, want, atol=2e-5, rtol=2e-5)


def test_partial_attentions_merge_by_lse():
    """Attention over [keys A, keys B] = merge of the two halves weighted by their lse (DCA)."""
    q, k, v, _, _ = _inputs(1, 32, 64, 1, 2, 16, None, jnp.float32)
    full = attention_ref(q, k, v, causal=False)
    halves = [IMPLS["chunked"](q, k[:, sl], v[:, sl], causal=False, return_lse=True)
              for sl in (slice(0, 40), slice(40, 64))]
    (o1, l1), (o2, l2) = halves
    lse = jnp.logaddexp(l1, l2)
    merged = o1 * jnp.exp(l1 - lse)[..., None] + o2 * jnp.exp(l2 - lse)[..., None]
    np.testing.assert_allclose(merged, full, atol=2e-5, rtol=2e-5)
