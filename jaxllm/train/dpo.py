"""Direct Preference Optimization (Rafailov et al. 2023): per-token log-probabilities, a chunk
of tokens at a time, their sums over each document of a preference pair, and the DPO loss.

Dimension letters (docs/glossary.md): B batch, T length, D model dim, V vocab, n chunks of a row,
Tc = T / n the tokens of a chunk; and P the preference pairs of a row (its pair slots).

Pair k of a row (k = 0, 1, ...) is two documents: the chosen one, segment id 2k + 1, and the
rejected one, 2k + 2 (0 is padding); `loss_mask` is 1 on reply tokens only. A document's
log-probability is log π(y) = Σ_t mask_t·log π(target_t), over its positions t. With the
reference model's π_ref and the rewards r_c = β·(log π(y_c) − log π_ref(y_c)) and
r_r = β·(log π(y_r) − log π_ref(y_r)), the loss of a pair is

    −log σ(r_c − r_r),   d/d log π(y_c) = −β·σ(r_r − r_c) = −d/d log π(y_r),

so a step raises the chosen reply's log-probability and lowers the rejected one's. A pair
counts (is valid) when both of its documents have a masked token.

The log-probabilities come chunk by chunk over the vocabulary projection as in
jaxllm/train/loss.py (chunk i holds tokens i, i + n, ... of every row): each chunk's logits are
formed inside a `lax.scan` under `jax.checkpoint`, so the forward pass keeps only the chunk's
[B, Tc] log-probabilities and the backward pass forms the chunk's logits again; no whole
[B, T, V] array exists. `chunk_size` <= 0 is the plain version: whole logits.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model.transformer import vocab_logits
from jaxllm.train.loss import num_chunks, token_losses


def token_logprobs(model_cfg, head: jax.Array, x_BxTxD: jax.Array, targets_BxT: jax.Array,
                   chunk_size: int) -> jax.Array:
    """float32 log p(target) [B, T] at every position, from the final hidden states and the
    head weight (`transformer.head_weight`), `num_chunks(T, chunk_size)` chunks at a time."""

    def logprobs(head, x_BxTcxD, targets_BxTc):
        nll_BxTc, _ = token_losses(vocab_logits(model_cfg, head, x_BxTcxD), targets_BxTc)
        return -nll_BxTc

    if chunk_size <= 0:
        return logprobs(head, x_BxTxD, targets_BxT)
    B, T = targets_BxT.shape
    n = num_chunks(T, chunk_size)
    # [B, T] → [n, B, Tc]: chunk i is tokens i, i + n, ... of every row.
    strided = lambda a: jnp.moveaxis(a.reshape(B, T // n, n, *a.shape[2:]), 2, 0)
    chunk = jax.checkpoint(logprobs)  # keeps its inputs, not the chunk's logits, for backward

    def body(_, xs):
        return None, chunk(head, *xs)

    _, logp_nxBxTc = jax.lax.scan(body, None, (strided(x_BxTxD), strided(targets_BxT)))
    return jnp.moveaxis(logp_nxBxTc, 0, 2).reshape(B, T)


def pair_logprobs(logp_BxT: jax.Array, mask_BxT: jax.Array, segment_ids_BxT: jax.Array,
                  pairs: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(chosen [B, P], rejected [B, P], valid [B, P]): Σ mask·logp over the documents of the
    P = `pairs` pair slots of each row (segment ids 2k + 1 and 2k + 2), and whether both
    documents of a slot have a masked token. Segment ids above 2P belong to no slot."""
    ids_2P = jnp.arange(1, 2 * pairs + 1, dtype=jnp.int32)
    in_doc_BxTx2P = segment_ids_BxT.astype(jnp.int32)[..., None] == ids_2P
    mask_BxT = mask_BxT.astype(jnp.float32)
    weighted_BxT = mask_BxT * logp_BxT.astype(jnp.float32)
    sums_Bx2P = jnp.sum(jnp.where(in_doc_BxTx2P, weighted_BxT[..., None], 0.0), axis=1)
    tokens_Bx2P = jnp.sum(jnp.where(in_doc_BxTx2P, mask_BxT[..., None], 0.0), axis=1)
    valid_BxP = (tokens_Bx2P[:, 0::2] > 0) & (tokens_Bx2P[:, 1::2] > 0)
    return sums_Bx2P[:, 0::2], sums_Bx2P[:, 1::2], valid_BxP


def dpo_sums(policy: tuple, reference: tuple, beta: float) -> dict[str, jax.Array]:
    """Sums over the valid pairs of the DPO loss and its metrics, from the policy's
    (chosen [B, P], rejected [B, P], valid [B, P]) (`pair_logprobs`) and the reference's
    (chosen, rejected) on the same batch (a third item, its valid, is ignored). Only "loss"
    carries a gradient, and only to the policy; the caller divides by the global "pairs"."""
    chosen_BxP, rejected_BxP, valid_BxP = policy
    ref_chosen_BxP, ref_rejected_BxP = (jax.lax.stop_gradient(a) for a in reference[:2])
    chosen_BxP, rejected_BxP = chosen_BxP.astype(jnp.float32), rejected_BxP.astype(jnp.float32)
    chosen_reward_BxP = beta * (chosen_BxP - ref_chosen_BxP.astype(jnp.float32))
    rejected_reward_BxP = beta * (rejected_BxP - ref_rejected_BxP.astype(jnp.float32))
    margin_BxP = chosen_reward_BxP - rejected_reward_BxP
    # where, not a product: an invalid slot's values stay out of the sums and their gradients.
    total = lambda a_BxP: jnp.sum(jnp.where(valid_BxP, a_BxP, 0.0))
    stop = jax.lax.stop_gradient
    return {
        "loss": total(-jax.nn.log_sigmoid(margin_BxP)),
        "pairs": jnp.sum(valid_BxP.astype(jnp.float32)),
        "reward_margin": stop(total(margin_BxP)),
        "chosen_reward": stop(total(chosen_reward_BxP)),
        "rejected_reward": stop(total(rejected_reward_BxP)),
        "reward_accuracy": stop(total((margin_BxP > 0).astype(jnp.float32))),
        "chosen_logp": stop(total(chosen_BxP)),
        "rejected_logp": stop(total(rejected_BxP)),
    }
