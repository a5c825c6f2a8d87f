"""The next-token loss over the vocabulary, a chunk of tokens at a time.

Dimension letters: B batch, T length, D model dim, V vocab, n chunks of a row, C = T / n.

At Qwen2's vocabulary (151,936) the float32 logits of one 4,096-token row are 2.5 GB, and their
gradient as much again; a loss that first builds all of them needs that memory on top of the
model's. Here the vocabulary projection runs inside the loop over chunks: a `lax.scan` whose
body, under `jax.checkpoint`, computes one chunk's logits, its log-partition and target
logits, and returns only their sums. The backward pass recomputes each chunk's logits from its
hidden states, so at most one chunk's logits (and their gradient) exist at a time.

Chunk i holds tokens i, i + n, i + 2n, ... of every row (strided, not contiguous): the loss is
a sum over tokens, so any partition gives the same value, and a strided one keeps every chunk
spread over all devices when the rows are split over `sequence`. Rows of at most
`loss.chunk_size` tokens (and `chunk_size` 0) take the whole row in one piece, exactly the
plain computation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxllm.model.transformer import vocab_logits


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, both float32."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return logz_BxT - target_logit_BxT, logz_BxT


def num_chunks(T: int, chunk_size: int) -> int:
    """The fewest chunks of at most `chunk_size` tokens that divide T evenly (1: whole rows)."""
    if chunk_size <= 0 or T <= chunk_size:
        return 1
    n = -(-T // chunk_size)
    while T % n:
        n += 1
    return n


def summed_losses(model_cfg, head: jax.Array, x_BxTxD: jax.Array, targets_BxT: jax.Array,
                  mask_BxT: jax.Array, chunk_size: int) -> tuple[jax.Array, jax.Array]:
    """(Σ nll, Σ logz²) over the tokens where `mask` is 1, from the final hidden states and
    the head weight (`jaxllm.model.transformer.head_weight`)."""
    B, T, D = x_BxTxD.shape
    n = num_chunks(T, chunk_size)

    def sums(x_BxCxD, targets_BxC, mask_BxC):
        nll_BxC, logz_BxC = token_losses(vocab_logits(model_cfg, head, x_BxCxD), targets_BxC)
        return jnp.stack([jnp.sum(nll_BxC * mask_BxC), jnp.sum(jnp.square(logz_BxC) * mask_BxC)])

    mask_BxT = mask_BxT.astype(jnp.float32)
    if n == 1:
        out = sums(x_BxTxD, targets_BxT, mask_BxT)
        return out[0], out[1]
    # [B, T] → [n, B, C]: chunk i is tokens i, i + n, ... of every row.
    strided = lambda a: jnp.moveaxis(a.reshape(B, T // n, n, *a.shape[2:]), 2, 0)  # noqa: E731

    def body(total, chunk):
        return total + jax.checkpoint(sums)(*chunk), None

    total, _ = jax.lax.scan(body, jnp.zeros(2, jnp.float32),
                            (strided(x_BxTxD), strided(targets_BxT), strided(mask_BxT)))
    return total[0], total[1]
