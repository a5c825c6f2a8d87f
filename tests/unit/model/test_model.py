"""Model properties: causality, packed documents, remat, scan layout, dtypes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.model import forward, init_params, param_count
from tests.helpers.model import small_config


def test_shapes_and_dtypes():
    cfg = small_config(dtype="bfloat16")
    params = init_params(cfg, jax.random.key(0))
    assert params["layers"]["attn"]["q_proj"]["kernel"].shape == (2, 64, 4, 16)
    assert params["layers"]["attn"]["q_proj"]["kernel"].dtype == jnp.float32  # master weights
    logits = forward(cfg, params, jnp.zeros((2, 8), jnp.int32))
    assert logits.shape == (2, 8, 128) and logits.dtype == jnp.float32
    assert np.isfinite(np.asarray(logits)).all()


def test_causality_through_gradients():
    """d logits[t] / d embeddings[s] is zero for every s > t."""
    cfg = small_config()
    params = init_params(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(2), (1, 12), 0, 128)
    t = 5

    def out_at_t(embedding):
        p = {**params, "embed": {"embedding": embedding}}
        return forward(cfg, p, tokens)[0, t].sum()

    # The gradient w.r.t. the embedding rows used at positions > t must vanish.
    grad = jax.grad(out_at_t)(params["embed"]["embedding"])
    seen = set(np.asarray(tokens[0, :t + 1]).tolist())
    later = set(np.asarray(tokens[0, t + 1:]).tolist()) - seen
    assert later, "pick a seed where later positions use new tokens"
    for tok in later:
        assert np.all(np.asarray(grad[tok]) == 0), tok
    assert np.abs(np.asarray(grad[int(tokens[0, t])])).sum() > 0


def test_causality_via_perturbation():
    cfg = small_config()
    params = init_params(cfg, jax.random.key(1))
    tokens = jax.random.randint(jax.random.key(3), (2, 16), 0, 128)
    changed = tokens.at[:, 9:].set((tokens[:, 9:] + 1) % 128)
    a, b = forward(cfg, params, tokens), forward(cfg, params, changed)
    np.testing.assert_array_equal(np.asarray(a[:, :9]), np.asarray(b[:, :9]))
    assert not np.allclose(np.asarray(a[:, 9:]), np.asarray(b[:, 9:]))


def test_packed_batch_equals_documents_one_by_one():
    cfg = small_config()
    params = init_params(cfg, jax.random.key(4))
    docs = [jax.random.randint(jax.random.key(10 + i), (n,), 0, 128) for i, n in
            enumerate([5, 9, 2])]
    tokens = jnp.concatenate(docs)[None]
    segments = jnp.concatenate([jnp.full(len(d), i + 1) for i, d in enumerate(docs)])[None]
    positions = jnp.concatenate([jnp.arange(len(d)) for d in docs])[None]
    packed = forward(cfg, params, tokens, positions, segments)[0]
    start = 0
    for d in docs:
        alone = forward(cfg, params, d[None])[0]
        np.testing.assert_allclose(np.asarray(packed[start:start + len(d)]), np.asarray(alone),
                                   atol=1e-5, rtol=1e-5)
        start += len(d)


def test_remat_equals_no_remat():
    from jaxllm.model import apply

    tokens = jax.random.randint(jax.random.key(5), (2, 10), 0, 128)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    seg = jnp.ones((2, 10), jnp.int32)
    params = init_params(small_config(), jax.random.key(6))

    def loss_and_grad(remat):
        cfg = small_config(remat=remat)
        loss = lambda p: jnp.mean(apply(cfg, p, tokens, pos, seg) ** 2)  # noqa: E731
        return jax.value_and_grad(loss)(params)

    base_loss, base_grad = loss_and_grad("none")
    for policy in ("full", "dots"):
        loss, grad = loss_and_grad(policy)
        np.testing.assert_allclose(loss, base_loss, rtol=1e-6)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
                     grad, base_grad)


def test_tied_and_llama_layouts():
    tied = init_params(small_config(tie_embeddings=True), jax.random.key(0))
    assert "lm_head" not in tied
    llama = init_params(small_config(family="llama", qkv_bias=False), jax.random.key(0))
    assert "bias" not in llama["layers"]["attn"]["q_proj"]
    assert llama["lm_head"]["kernel"].shape == (64, 128)


def test_rope_base_changes_outputs():
    params = init_params(small_config(), jax.random.key(7))
    tokens = jax.random.randint(jax.random.key(8), (1, 32), 0, 128)
    a = forward(small_config(rope_theta=1e4), params, tokens)
    b = forward(small_config(rope_theta=1e6), params, tokens)
    assert float(jnp.max(jnp.abs(a - b))) > 1e-2


@pytest.mark.parametrize("layers", [2, 80])
def test_scan_compiles_one_layer(layers):
    """An 80-layer model's abstract params stack along L; tracing does not unroll layers."""
    cfg = small_config(num_layers=layers)
    assert param_count(cfg) == param_count(small_config(num_layers=1)) + (layers - 1) * (
        param_count(small_config(num_layers=2)) - param_count(small_config(num_layers=1)))
    params = jax.eval_shape(lambda: init_params(cfg, jax.random.key(0)))
    jaxpr = jax.make_jaxpr(lambda p: forward(cfg, p, jnp.zeros((1, 4), jnp.int32)))(params)
    assert len(str(jaxpr)) < 60_000


@pytest.mark.parametrize("overrides", [
    dict(), dict(remat="full"),
    dict(family="qwen2_moe", num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
         shared_expert_intermediate_size=48, decoder_sparse_step=2, num_layers=4),
])
def test_layer_loop_equals_the_scan(overrides):
    """model.scan_layers=False (a Python loop over the stacked layer parameters) gives the
    scan's logits, MoE losses and gradients, from the same parameters."""
    from jaxllm.model import apply

    tokens = jax.random.randint(jax.random.key(5), (2, 10), 0, 128)
    pos = jnp.broadcast_to(jnp.arange(10), (2, 10))
    seg = jnp.ones((2, 10), jnp.int32)
    params = init_params(small_config(**overrides), jax.random.key(6))

    def loss_and_grad(scan_layers):
        cfg = small_config(**overrides, scan_layers=scan_layers)

        def loss(p):
            logits, aux = apply(cfg, p, tokens, pos, seg, with_aux=True)
            return jnp.mean(logits ** 2) + sum(aux.values(), 0.0), aux

        return jax.jit(jax.value_and_grad(loss, has_aux=True))(params)

    (loss, aux), grad = loss_and_grad(False)
    (want_loss, want_aux), want_grad = loss_and_grad(True)
    np.testing.assert_allclose(loss, want_loss, rtol=1e-6)
    assert aux.keys() == want_aux.keys() and (not overrides.get("num_experts") or aux)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5),
                 (aux, grad), (want_aux, want_grad))


@pytest.mark.parametrize("x_shape, kernel_shape, n_in", [
    ((2, 5, 8), (8, 3, 4), 1),  # q_proj: [B, T, D] x [D, N, H]
    ((2, 5, 3, 4), (3, 4, 8), 2),  # o_proj: [B, T, N, H] x [N, H, D]
])
def test_matmul_and_its_gradients_equal_tensordot(x_shape, kernel_shape, n_in):
    """layers.matmul's custom VJP (the kernel gradient as one 2-D matmul) against autodiff of
    the plain jnp.tensordot."""
    from jaxllm.model.layers import matmul

    kx, kk, kg = jax.random.split(jax.random.key(0), 3)
    x, kernel = jax.random.normal(kx, x_shape), jax.random.normal(kk, kernel_shape)
    g = jax.random.normal(kg, jnp.tensordot(x, kernel, n_in).shape)

    def grads(f):
        y, vjp = jax.vjp(f, x, kernel)
        return y, vjp(g)

    y, (dx, dk) = grads(lambda x, k: matmul(x, k, n_in))
    want_y, (want_dx, want_dk) = grads(lambda x, k: jnp.tensordot(x, k, n_in))
    for got, want in ((y, want_y), (dx, want_dx), (dk, want_dk)):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
