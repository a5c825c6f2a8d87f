"""DPO (jaxllm/train/dpo.py): chunked log-probabilities against whole logits, the pair sums and
the loss against a per-pair loop in float64, packed pairs against pairs one row each through a
tiny model, and the gradient's direction.

Dimension letters: B batch, T length, D model dim, V vocab, P preference pairs of a row.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxllm.config.schema import base_config
from jaxllm.model import apply, init_params
from jaxllm.model.transformer import frozen, head_weight
from jaxllm.train.dpo import dpo_sums, pair_logprobs, token_logprobs
from jaxllm.train.loss import num_chunks
from tests.helpers.model import small_config

B, T, D, V = 2, 30, 16, 40
BETA = 0.1
KEYS = ("loss", "pairs", "reward_margin", "chosen_reward", "rejected_reward", "reward_accuracy",
        "chosen_logp", "rejected_logp")


def head_config(tied: bool):
    cfg = base_config().model
    cfg.update(vocab_size=V, hidden_size=D, tie_embeddings=tied, dtype="float32")
    return frozen(cfg)


def head_inputs(tied: bool):
    """Hidden states, a head at a trained model's logit scale (std ~3), targets, and weights
    for a scalar of the log-probabilities whose gradient tells positions apart."""
    k = jax.random.split(jax.random.key(0), 4)
    x_BxTxD = jax.random.normal(k[0], (B, T, D))
    head = 3.0 * jax.random.normal(k[1], (V, D) if tied else (D, V)) / np.sqrt(D)
    targets_BxT = jax.random.randint(k[2], (B, T), 0, V)
    return x_BxTxD, head, targets_BxT, jax.random.normal(k[3], (B, T))


def whole_logprobs(tied, head, x_BxTxD, targets_BxT):
    logits_BxTxV = jnp.einsum("btd,vd->btv" if tied else "btd,dv->btv", x_BxTxD, head)
    logp_BxTxV = jax.nn.log_softmax(logits_BxTxV, axis=-1)
    return jnp.take_along_axis(logp_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]


@pytest.mark.parametrize("tied", [True, False])
def test_chunked_logprobs_and_gradients_equal_whole_logits(tied):
    """log p(target) per position, and the gradients of Σ w·logp by the hidden states and the
    head: the plain path (chunk_size 0), 1 chunk, 5 (7 → 5), 10 (4 → uneven 8 → 10) and 30
    chunks per row against a whole log-softmax and gather, 1e-6."""
    cfg = head_config(tied)
    x, head, targets, w = head_inputs(tied)
    assert (num_chunks(T, 7), num_chunks(T, 4)) == (5, 10)

    def reference(x, head):
        return jnp.sum(w * whole_logprobs(tied, head, x, targets))

    want = whole_logprobs(tied, head, x, targets)
    gx, gh = jax.grad(reference, argnums=(0, 1))(x, head)
    assert float(jnp.std(want)) > 1.0  # far from uniform: a misplaced position shows

    def ours(x, head, chunk):
        logp_BxT = token_logprobs(cfg, head, x, targets, chunk)
        return jnp.sum(w * logp_BxT), logp_BxT

    grad = jax.jit(jax.grad(ours, argnums=(0, 1), has_aux=True), static_argnums=2)
    for chunk in (0, T, 7, 4, 1):
        (cx, ch), got = grad(x, head, chunk)
        assert got.dtype == jnp.float32 and got.shape == (B, T)
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=str(chunk))
        np.testing.assert_allclose(cx, gx, rtol=0, atol=1e-6 * np.abs(gx).max(), err_msg=str(chunk))
        np.testing.assert_allclose(ch, gh, rtol=0, atol=1e-6 * np.abs(gh).max(), err_msg=str(chunk))


def _sizes(jaxpr):
    """The sizes of every value a jaxpr and its sub-jaxprs (scan bodies, checkpoints) make."""
    for eqn in jaxpr.eqns:
        yield from (v.aval.size for v in eqn.outvars if hasattr(v.aval, "size"))
        for param in eqn.params.values():
            for sub in param if isinstance(param, tuple | list) else (param,):
                sub = getattr(sub, "jaxpr", sub)
                if hasattr(sub, "eqns"):
                    yield from _sizes(sub)


def test_chunked_gradient_never_makes_whole_logits():
    """Under jax.grad, 10 chunks per row: no value as large as [B, T, V], in the forward pass
    (residuals stacked over chunks) or the backward one; the plain path does make one."""
    cfg = head_config(False)
    x, head, targets, w = head_inputs(False)

    def largest(chunk):
        f = jax.grad(lambda x, head: jnp.sum(w * token_logprobs(cfg, head, x, targets, chunk)),
                     argnums=(0, 1))
        return max(_sizes(jax.make_jaxpr(f)(x, head).jaxpr))

    assert largest(0) >= B * T * V
    assert largest(4) < B * T * V


# ------------------------------------------------------------------------- pairs and the loss

def random_batch(rng: np.random.Generator, pairs_per_row: list[int], T: int):
    """Rows of packed pairs: each document a prompt (mask 0) and a reply (mask 1, or all 0 for
    an empty reply), padding (segment 0) after the last one."""
    segments, masks = np.zeros((len(pairs_per_row), T), np.int32), np.zeros((len(pairs_per_row), T))
    for b, pairs in enumerate(pairs_per_row):
        t = 0
        for doc in range(2 * pairs):
            prompt, reply = rng.integers(1, 5), rng.integers(1, 7)
            segments[b, t:t + prompt + reply] = doc + 1
            masks[b, t + prompt:t + prompt + reply] = 1.0
            t += prompt + reply
        assert t < T
    return segments, masks


def loop_reference(logp, ref_logp, mask, segments, pairs, beta):
    """Pair by pair in float64: each document's Σ mask·logp, and the sums of dpo_sums."""
    logp, ref_logp, mask = (np.asarray(a, np.float64) for a in (logp, ref_logp, mask))
    sums = dict.fromkeys(KEYS, 0.0)
    per_pair = np.zeros((segments.shape[0], pairs, 2))
    for b in range(segments.shape[0]):
        for k in range(pairs):
            c, r = segments[b] == 2 * k + 1, segments[b] == 2 * k + 2
            pc, pr = np.sum((mask * logp)[b, c]), np.sum((mask * logp)[b, r])
            rc, rr = np.sum((mask * ref_logp)[b, c]), np.sum((mask * ref_logp)[b, r])
            per_pair[b, k] = pc, pr
            if mask[b, c].sum() == 0 or mask[b, r].sum() == 0:
                continue
            margin = beta * ((pc - rc) - (pr - rr))
            for key, value in (("loss", np.log1p(np.exp(-margin))), ("pairs", 1.0),
                               ("reward_margin", margin), ("chosen_reward", beta * (pc - rc)),
                               ("rejected_reward", beta * (pr - rr)),
                               ("reward_accuracy", float(margin > 0)), ("chosen_logp", pc),
                               ("rejected_logp", pr)):
                sums[key] += value
    return per_pair, sums


def test_pair_sums_and_dpo_sums_equal_a_loop_over_pairs():
    """3, 2 and 1 pairs in rows of 3 pair slots (the rest padding), one reply with no masked
    token (its pair is left out), random per-token log-probabilities: the per-pair sums and
    every sum of dpo_sums against a per-pair loop in float64, 1e-6."""
    rng = np.random.default_rng(0)
    pairs, T = 3, 64
    segments, mask = random_batch(rng, [3, 2, 1], T)
    mask[1, segments[1] == 2] = 0.0  # pair 0 of row 1: the rejected reply has no target
    logp = -rng.exponential(2.0, segments.shape).astype(np.float32)
    ref_logp = -rng.exponential(2.0, segments.shape).astype(np.float32)
    per_pair, want = loop_reference(logp, ref_logp, mask, segments, pairs, BETA)
    assert want["pairs"] == 5 and 0 < want["reward_accuracy"] < 5  # both signs of margin occur

    @jax.jit
    def ours(logp, ref_logp, mask, segments):
        policy = pair_logprobs(logp, mask, segments, pairs)
        return policy, dpo_sums(policy, pair_logprobs(ref_logp, mask, segments, pairs), BETA)

    (chosen, rejected, valid), got = ours(logp, ref_logp, mask, segments)
    assert chosen.shape == rejected.shape == valid.shape == (3, pairs)
    np.testing.assert_array_equal(valid, [[1, 1, 1], [0, 1, 0], [1, 0, 0]])
    np.testing.assert_allclose(chosen, per_pair[..., 0], rtol=1e-6)
    np.testing.assert_allclose(rejected, per_pair[..., 1], rtol=1e-6)
    for key in KEYS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-6, atol=1e-6, err_msg=key)


def test_the_loss_gradient_raises_chosen_and_lowers_rejected():
    """d loss / d log π(y_c) = −β·σ(r_r − r_c) < 0 and the opposite for y_r on every valid
    pair, 0 on invalid ones and on the reference; the metrics have no gradient."""
    rng = np.random.default_rng(1)
    chosen, rejected, ref_c, ref_r = (jnp.asarray(-rng.exponential(10.0, (2, 3)), jnp.float32)
                                      for _ in range(4))
    valid = jnp.asarray([[True, True, False], [True, True, True]])

    def of(key):
        return lambda c, r, rc, rr: dpo_sums((c, r, valid), (rc, rr), BETA)[key]

    dc, dr, drc, drr = jax.grad(of("loss"), argnums=(0, 1, 2, 3))(chosen, rejected, ref_c, ref_r)
    margin = BETA * ((chosen - ref_c) - (rejected - ref_r))
    want = np.where(valid, -BETA * jax.nn.sigmoid(-margin), 0.0)
    np.testing.assert_allclose(dc, want, rtol=1e-6)
    np.testing.assert_allclose(dr, -want, rtol=1e-6)
    assert bool(jnp.all(jnp.where(valid, dc < 0, dc == 0)))
    assert bool(jnp.all(jnp.where(valid, dr > 0, dr == 0)))
    assert not np.any(drc) and not np.any(drr)
    for key in KEYS[2:]:
        assert not np.any(jax.grad(of(key))(chosen, rejected, ref_c, ref_r)), key


# ------------------------------------------------------------------------- through a tiny model

def conversation(key, prompt: int, reply: int):
    """A document of `prompt` prompt tokens then `reply` reply tokens: its inputs, targets
    (the next token at each input) and mask (1 where the target is a reply token)."""
    tokens = jax.random.randint(key, (prompt + reply + 1,), 0, 128)
    mask = np.zeros(prompt + reply)
    mask[prompt - 1:] = 1.0
    return tokens[:-1], tokens[1:], mask


def pack(docs, T: int):
    """Documents one after the other in a row, segments 1, 2, ..., positions from 0 in each,
    padded with segment 0 to T."""
    row = {k: np.zeros(T, np.int32) for k in ("inputs", "targets", "segment_ids", "positions")}
    row["loss_mask"] = np.zeros(T, np.float32)
    t = 0
    for i, (inputs, targets, mask) in enumerate(docs):
        span = slice(t, t + len(inputs))
        row["inputs"][span], row["targets"][span], row["loss_mask"][span] = inputs, targets, mask
        row["segment_ids"][span], row["positions"][span] = i + 1, np.arange(len(inputs))
        t += len(inputs)
    return row


def rows(*packed):
    return {k: jnp.asarray(np.stack([r[k] for r in packed])) for k in packed[0]}


def test_packing_two_pairs_in_a_row_gives_the_pair_by_pair_values():
    """Pair A then pair B in one row (segments 1..4) against A alone in one row and B alone in
    another (pair slot 0 each), through a small jaxllm model at 8-token chunks, its reference
    another initialisation of it: the same per-pair policy log-probabilities, dpo_sums and
    gradient of the loss by the parameters, 1e-5."""
    cfg = frozen(small_config())
    policy, reference = init_params(cfg, jax.random.key(0)), init_params(cfg, jax.random.key(1))
    k = jax.random.split(jax.random.key(2), 4)
    a = [conversation(k[0], 5, 4), conversation(k[1], 5, 7)]
    b = [conversation(k[2], 3, 6), conversation(k[3], 3, 2)]
    T = 48
    packed, alone = rows(pack(a + b, T)), rows(pack(a, T), pack(b, T))

    def pairs_of(params, batch, pairs):
        x_BxTxD, _ = apply(cfg, params, batch["inputs"], batch["positions"],
                           batch["segment_ids"], head_out=False)
        logp_BxT = token_logprobs(cfg, head_weight(cfg, params), x_BxTxD, batch["targets"], 8)
        return pair_logprobs(logp_BxT, batch["loss_mask"], batch["segment_ids"], pairs)

    @functools.partial(jax.jit, static_argnums=2)
    def step(params, batch, pairs):
        def loss(params):
            per_pair = pairs_of(params, batch, pairs)
            sums = dpo_sums(per_pair, pairs_of(reference, batch, pairs), BETA)
            return sums["loss"], (per_pair, sums)

        return jax.grad(loss, has_aux=True)(params)

    g_one, (one_row, got) = step(policy, packed, 2)
    g_two, (two_rows, want) = step(policy, alone, 1)
    assert bool(jnp.all(one_row[2])) and bool(jnp.all(two_rows[2]))
    assert float(jnp.abs(one_row[0] - one_row[1]).min()) > 1.0  # the documents differ
    for a, b in zip(one_row[:2], two_rows[:2], strict=True):
        np.testing.assert_allclose(a.reshape(-1), b.reshape(-1), rtol=1e-5)
    for key in KEYS:
        np.testing.assert_allclose(got[key], want[key], rtol=1e-5, atol=1e-6, err_msg=key)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g_two))
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=0, atol=1e-5 * scale),
                 g_one, g_two)
