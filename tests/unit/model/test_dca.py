"""Dual chunk attention (jaxllm/model/dca.py) against a slow reference written from the definition:
position indices built per (query, key) pair, rope applied with them, ONE softmax over all
masked scores. Forward and gradients (q, k, v before rope), packed documents, GQA, KV-cache
decoding, the position bound, and the errors of bad settings.

B batch, T query length, S key length, N query heads, K kv heads, G = N / K, H head dim;
c = chunk_size - local_size = 12 positions a chunk here, so 96 tokens span 8 chunks.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.kernels.attention import attention
from jaxllm.model.dca import dca_attention, dca_indices

CHUNK, LOCAL = 16, 4
C = CHUNK - LOCAL
N, K, H = 4, 2, 16
IMPLS = {"xla": None, "chunked": dict(block_q=16, block_k=16),
         "pallas": {name: 16 for name in ("block_q", "block_k", "block_q_dq", "block_k_dq",
                                          "block_q_dkv", "block_k_dkv")}}
# Documents per row for the reference test. Row 0 of the long case: one document over 8
# chunks (every inter-chunk distance); row 1: documents of 50, 30 and 16 tokens, so chunks
# restart mid-row. Pallas runs interpreted on CPU (slow), so on 4 chunks only.
LONG, SHORT = [[8 * C], [50, 30, 16]], [[30, 18]]
REFERENCE_CASES = [("xla", LONG), ("chunked", LONG), ("pallas", SHORT)]
TOL = dict(atol=1e-5, rtol=1e-5)


def rope(x_BxLxHeadsxH, positions_BxL):
    """Rotate-half rotary embedding, base 10000 (the model passes its own, YaRN or not)."""
    inv_freq = 1.0 / 10000 ** (np.arange(0, H, 2) / H)
    angles = positions_BxL.astype(jnp.float32)[..., None] * inv_freq
    cos = jnp.cos(jnp.concatenate([angles, angles], -1))[:, :, None]
    sin = jnp.sin(jnp.concatenate([angles, angles], -1))[:, :, None]
    x1, x2 = jnp.split(x_BxLxHeadsxH, 2, axis=-1)
    return x_BxLxHeadsxH * cos + jnp.concatenate([-x2, x1], -1) * sin


def dca_reference(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, q_pos_BxT, k_pos_BxS, q_seg_BxT, k_seg_BxS):
    """The definition, pair by pair: the pair's chunk relation picks the query's index."""
    B, T, S = q_BxTxNxH.shape[0], q_BxTxNxH.shape[1], k_BxSxKxH.shape[1]
    qp, kp = q_pos_BxT[:, :, None], k_pos_BxS[:, None, :]
    same_chunk, previous_chunk = qp // C == kp // C, qp // C == kp // C + 1
    q_index_BxTxS = jnp.where(same_chunk, qp % C,
                              jnp.where(previous_chunk, jnp.minimum(qp % C + C, CHUNK),
                                        min(2 * C - 1, CHUNK)))
    q_rot_BxTxSxNxH = rope(jnp.repeat(q_BxTxNxH, S, axis=1),
                           q_index_BxTxS.reshape(B, T * S)).reshape(B, T, S, N, H)
    k_rot_BxSxNxH = jnp.repeat(rope(k_BxSxKxH, k_pos_BxS % C), N // K, axis=2)
    s_BxNxTxS = jnp.einsum("btsnh,bsnh->bnts", q_rot_BxTxSxNxH, k_rot_BxSxNxH) * H ** -0.5
    causal_TxS = np.arange(S)[None, :] <= np.arange(T)[:, None] + S - T
    visible = (q_seg_BxT[:, :, None] == k_seg_BxS[:, None, :]) & causal_TxS
    p_BxNxTxS = jax.nn.softmax(jnp.where(visible[:, None], s_BxNxTxS, -jnp.inf), axis=-1)
    return jnp.einsum("bnts,bsnh->btnh", p_BxNxTxS, jnp.repeat(v_BxSxKxH, N // K, axis=2))


def packed(doc_lengths_per_row, T):
    """Segment ids 1, 2, ... and positions restarting at 0 in each document."""
    seg = np.zeros((len(doc_lengths_per_row), T), np.int32)
    pos = np.zeros_like(seg)
    for b, lengths in enumerate(doc_lengths_per_row):
        start = 0
        for i, n in enumerate(lengths):
            seg[b, start:start + n], pos[b, start:start + n] = i + 1, np.arange(n)
            start += n
    return jnp.asarray(seg), jnp.asarray(pos)


def qkv(B, T, S=None, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32)
    S = S or T
    return normal(B, T, N, H), normal(B, S, K, H), normal(B, S, K, H), normal(B, T, N, H)


def dca(impl, **kw):
    return functools.partial(dca_attention, chunk_size=CHUNK, local_size=LOCAL, rope=rope,
                             impl=impl, block_sizes=IMPLS[impl], **kw)


@pytest.mark.parametrize("impl", ["xla", "chunked"])
def test_fits_one_chunk_equals_ordinary_attention(impl):
    q, k, v, _ = qkv(2, C)
    seg, pos = packed([[C], [5, C - 5]], C)
    out = jax.jit(dca(impl))(q, k, v, pos, pos, seg, seg)
    full = attention(rope(q, pos), rope(k, pos), v, seg, impl="xla", causal=True)
    np.testing.assert_allclose(out, full, **TOL)


@pytest.mark.parametrize("impl, documents", REFERENCE_CASES,
                         ids=[impl for impl, _ in REFERENCE_CASES])
def test_equals_pairwise_reference_forward_and_gradients(impl, documents):
    T = sum(documents[0])
    q, k, v, w = qkv(len(documents), T)
    seg, pos = packed(documents, T)

    def loss(fn):
        def f(q, k, v):
            out = fn(q, k, v, pos, pos, seg, seg)
            return jnp.sum(out * w), out
        return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))

    (_, out), grads = loss(dca(impl))(q, k, v)
    (_, ref_out), ref_grads = loss(dca_reference)(q, k, v)
    np.testing.assert_allclose(out, ref_out, **TOL)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, **TOL)


def test_packed_documents_equal_each_document_alone():
    """No key of another document is seen: each document of a packed row gets the output it
    gets alone (moved to the front of a row of padding, segment 0: one compiled shape)."""
    T, lengths = 6 * C, [40, 8, 24]
    q, k, v, _ = qkv(1, T)
    seg, pos = packed([lengths], T)
    fn = jax.jit(dca("xla"))
    out = fn(q, k, v, pos, pos, seg, seg)
    for start, n in zip(np.cumsum([0] + lengths[:-1]), lengths, strict=True):
        q1, k1, v1, pos1 = (jnp.roll(x, -start, axis=1) for x in (q, k, v, pos))
        seg1 = jnp.where(jnp.arange(T) < n, 1, 0)[None]
        alone = fn(q1, k1, v1, pos1, pos1, seg1, seg1)
        np.testing.assert_allclose(out[:, start:start + n], alone[:, :n], **TOL)


@pytest.mark.parametrize("impl", ["chunked"])
def test_decode_step_equals_full_forward_rows(impl):
    """Queries at positions p.. against cached keys stored before rope. Row 1 is left-padded
    (segment 0, as jaxllm/model/decode.py pads prompts). One query: the whole cache, its unwritten
    slots segment 0, causal=False. Three queries: the cache up to them, causal."""
    S, pad = 7 * C, 5
    q, k, v, _ = qkv(2, S)
    seg = jnp.asarray(np.array([[1] * S, [0] * pad + [1] * (S - pad)], np.int32))
    pos = jnp.asarray(np.array([np.arange(S), np.maximum(np.arange(S) - pad, 0)], np.int32))
    full = jax.jit(dca(impl))(q, k, v, pos, pos, seg, seg)
    step = jax.jit(dca(impl, causal=False))
    for p in (C - 1, 3 * C + 2, S - 1):  # last of chunk 0; a successive query; the last
        written = jnp.where(jnp.arange(S) <= p, seg, 0)
        one = step(q[:, p:p + 1], k, v, pos[:, p:p + 1], pos, seg[:, p:p + 1], written)
        np.testing.assert_allclose(one, full[:, p:p + 1], **TOL)
    p = 5 * C - 2  # three queries crossing into chunk 5
    few = jax.jit(dca(impl))(q[:, p:p + 3], k[:, :p + 3], v[:, :p + 3], pos[:, p:p + 3],
                             pos[:, :p + 3], seg[:, p:p + 3], seg[:, :p + 3])
    np.testing.assert_allclose(few, full[:, p:p + 3], **TOL)


def test_position_indices_stay_in_trained_range():
    """Every rope index and every query-key distance of a part is at most chunk_size, for
    the test sizes and for Qwen2's 32768 / 1024 at 131072 tokens."""
    idx = dca_indices(jnp.arange(40)[None], jnp.arange(40)[None], chunk_size=CHUNK,
                      local_size=LOCAL)
    # By hand: 13 is chunk 1, offset 1: 13 as successive, 2·12-1 = 23 capped at 16 as inter.
    assert (idx.q_intra_BxT[0, 13], idx.q_succ_BxT[0, 13], idx.q_inter_BxT[0, 13]) == (1, 13, 16)
    assert (idx.q_succ_BxT[0, 30], idx.k_BxS[0, 30], idx.q_chunk_BxT[0, 30]) == (16, 6, 2)
    for chunk_size, local_size, length in ((CHUNK, LOCAL, 10_000), (32768, 1024, 131072)):
        c = chunk_size - local_size
        positions = jnp.arange(length)[None]
        idx = dca_indices(positions, positions, chunk_size=chunk_size, local_size=local_size)
        for q_index in (idx.q_intra_BxT, idx.q_succ_BxT, idx.q_inter_BxT):
            assert 0 <= int(q_index.min()) and int(q_index.max()) <= chunk_size
        assert 0 <= int(idx.k_BxS.min()) and int(idx.k_BxS.max()) < c
        assert int(idx.q_succ_BxT.max()) == chunk_size <= chunk_size + local_size
        # Key indices span [0, c): an intra-chunk key is at most c - 1 back, and successive
        # and inter-chunk keys are 1 to chunk_size back.
        assert int(idx.q_intra_BxT.max()) < c
        for q_index in (idx.q_succ_BxT, idx.q_inter_BxT):
            assert int(q_index.min()) - (c - 1) > 0 and int(q_index.max()) <= chunk_size

@pytest.mark.parametrize("chunk_size, local_size, impl, key", [
    (16, 16, "xla", "model.dca.local_size"),
    (16, 20, "xla", "model.dca.local_size"),
    (16, 4, "cudnn", "model.attention_impl"),
])
def test_bad_settings_raise_naming_the_key(chunk_size, local_size, impl, key):
    q, k, v, _ = qkv(1, 8)
    pos = jnp.arange(8)[None]
    with pytest.raises(ValueError, match=key):
        dca_attention(q, k, v, pos, pos, chunk_size=chunk_size, local_size=local_size,
                      rope=rope, impl=impl)


def test_model_decoding_with_a_cache_equals_full_forward_dca():
    """A tiny model with DCA (chunk 16, local 4) and YaRN on top, the Qwen2 setting: prefill
    12 tokens, then one token at a time to 44, three chunks in; every step's logits equal the
    full forward pass's at that position. Within the first chunk DCA is plain attention."""
    from jaxllm.config.schema import ConfigError, base_config
    from jaxllm.config.validate import validate_model
    from jaxllm.model import forward, init_params
    from tests.helpers.model import assert_cached_decoding_equals_forward

    cfg = base_config().model
    cfg.update(vocab_size=64, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
               head_dim=8, intermediate_size=48, dtype="float32", remat="none",
               attention_impl="chunked", init_std=0.3)
    cfg.rope_scaling.update(type="yarn", factor=4.0, original_max_position_embeddings=16)
    cfg.dca.update(enabled=True, chunk_size=16, local_size=4)
    params = init_params(cfg, jax.random.key(0))
    tokens = np.random.default_rng(0).integers(0, 64, (2, 44)).astype(np.int32)
    full = np.asarray(forward(cfg, params, tokens))
    plain = cfg.copy_and_resolve_references()
    plain.dca.enabled = False
    np.testing.assert_allclose(full[:, :12], np.asarray(forward(plain, params, tokens))[:, :12],
                               atol=1e-5, rtol=1e-5)
    assert_cached_decoding_equals_forward(cfg, params, tokens, prefill=12)
    cfg.rope_scaling.type = "dynamic_ntk"
    with pytest.raises(ConfigError, match=r"rope_scaling\.type"):
        validate_model(cfg)  # dynamic NTK would read DCA's indices as positions
