"""The next-token loss over the vocabulary, a chunk of tokens at a time, with its gradient.

Dimension letters: B batch, T length, D model dim, V vocab, n chunks of a row, C = T / n.

At Qwen2's vocabulary (151,936) the float32 logits of one 4,096-token row are 2.5 GB, and their
gradient as much again; a loss that first builds all of them needs that memory on top of the
model's. Here the vocabulary projection runs inside a `lax.scan` over chunks of tokens, and
the loss is a custom VJP whose forward pass also computes the gradient: for each chunk it
forms the logits, the log-partition logz, the target logits, and d objective / d logits =
mask·(softmax·(1 + 2·z_loss·logz) − onehot(target)), then multiplies that back through the
head at once (dx for the chunk's hidden states, dW summed over chunks). So at most one
chunk's logits exist at a time, nothing is recomputed, and the backward pass only scales dx
and dW by the objective's cotangent. Only the objective carries a gradient; Σ nll and Σ logz²
come out beside it as values (metrics).

Chunk i holds tokens i, i + n, i + 2n, ... of every row (strided, not contiguous): the loss is
a sum over tokens, so any partition gives the same value, and a strided one keeps every chunk
spread over all devices when the rows are split over `sequence`. A chunk stays [B, C]: merged
into B·C tokens (B split over the batch axes, C over sequence) the partitioner would gather it
over sequence, and every sequence device would compute the whole chunk's logits.
`loss.chunk_size` = 0 is the plain loss: whole logits and autodiff, the obvious version the
fused one is tested against.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm.model.transformer import vocab_logits

HEAD_AXES = {True: ("vocab", "embed"), False: ("embed", "vocab")}  # tied: the embedding [V, D]


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
                  mask_BxT: jax.Array, chunk_size: int, z_loss: float = 0.0
                  ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(objective Σ nll + z_loss·Σ logz², Σ nll, Σ logz²) over the tokens where `mask` is 1,
    from the final hidden states and the head weight (`transformer.head_weight`). Only the
    objective carries a gradient."""
    mask_BxT = mask_BxT.astype(jnp.float32)
    if chunk_size <= 0:
        nll_BxT, logz_BxT = token_losses(vocab_logits(model_cfg, head, x_BxTxD), targets_BxT)
        nll, logz2 = jnp.sum(nll_BxT * mask_BxT), jnp.sum(jnp.square(logz_BxT) * mask_BxT)
        return (nll + z_loss * logz2 if z_loss else nll, jax.lax.stop_gradient(nll),
                jax.lax.stop_gradient(logz2))
    n = num_chunks(x_BxTxD.shape[1], chunk_size)
    return _fused_loss(_HeadSpec(bool(model_cfg.tie_embeddings), str(model_cfg.dtype), n,
                                 float(z_loss)), head, x_BxTxD, targets_BxT, mask_BxT)


@dataclasses.dataclass(frozen=True)
class _HeadSpec:
    tied: bool  # head is the embedding [V, D]; else lm_head's kernel [D, V]
    dtype: str  # compute dtype of the head's matmuls
    n: int  # chunks per row
    z_loss: float


def _chunk(spec: _HeadSpec, head, x_BxCxD, targets_BxC, mask_BxC, with_grad: bool):
    """([Σ objective, Σ nll, Σ logz²] of one chunk, and with_grad: (dx [B, C, D] in x's
    dtype, dW in the compute dtype in head's layout) of the objective)."""
    w = head.astype(spec.dtype)
    x = x_BxCxD.astype(spec.dtype)
    d_of_w = 1 if spec.tied else 0  # head is [V, D] tied, [D, V] untied
    logits_BxCxV = jax.lax.dot_general(x, w, (((2,), (d_of_w,)), ((), ())),
                                       preferred_element_type=jnp.float32)
    logz_BxC = jax.nn.logsumexp(logits_BxCxV, axis=-1)
    target_logit_BxC = jnp.take_along_axis(logits_BxCxV, targets_BxC[..., None], axis=-1)[..., 0]
    nll = jnp.sum((logz_BxC - target_logit_BxC) * mask_BxC)
    logz2 = jnp.sum(logz_BxC ** 2 * mask_BxC)
    sums = jnp.stack([nll + spec.z_loss * logz2, nll, logz2])
    if not with_grad:
        return sums, None
    p_BxCxV = jnp.exp(logits_BxCxV - logz_BxC[..., None])
    scale_BxC = (1.0 + 2.0 * spec.z_loss * logz_BxC) * mask_BxC
    is_target_BxCxV = jnp.arange(logits_BxCxV.shape[-1]) == targets_BxC[..., None]
    dlogits_BxCxV = (p_BxCxV * scale_BxC[..., None]
                     - jnp.where(is_target_BxCxV, mask_BxC[..., None], 0.0)).astype(spec.dtype)
    # dx = dlogits · W (contracting V); dW contracts the chunk's B and C tokens of dlogits, x.
    dx_BxCxD = jax.lax.dot_general(dlogits_BxCxV, w, (((2,), (1 - d_of_w,)), ((), ())),
                                   preferred_element_type=jnp.float32).astype(x_BxCxD.dtype)
    # A chunk's dW in the compute dtype, as every layer's: the device's partial sum is a whole
    # [V, D] before it is reduce-scattered onto the head's split (4.6 GiB in float32 at 72B).
    tokens = (((0, 1), (0, 1)), ((), ()))
    dw = (jax.lax.dot_general(dlogits_BxCxV, x, tokens) if spec.tied else
          jax.lax.dot_general(x, dlogits_BxCxV, tokens))
    return sums, (dx_BxCxD, dw)


def _over_chunks(spec: _HeadSpec, head, x_BxTxD, targets_BxT, mask_BxT, with_grad: bool):
    """Sums over every chunk, and with_grad (dx [B, T, D], dW float32)."""
    B, T, D = x_BxTxD.shape
    n = spec.n
    # [B, T] → [n, B, C]: chunk i is tokens i, i + n, ... of every row.
    strided = lambda a: jnp.moveaxis(  # noqa: E731
        a.reshape(B, T // n, n, *a.shape[2:]), 2, 0)

    def body(carry, chunk):
        total, dw = carry
        sums, grads = _chunk(spec, head, *chunk, with_grad)
        if not with_grad:
            return (total + sums, dw), None
        # The float32 sum of dW stays split like the head (each chunk's part reduce-scattered
        # onto it), not whole on every device: [V, D] is 4.6 GiB at Qwen2's size.
        dw = nn.with_logical_constraint(dw + grads[1].astype(jnp.float32), HEAD_AXES[spec.tied])
        return (total + sums, dw), grads[0]

    dw0 = (nn.with_logical_constraint(jnp.zeros(head.shape, jnp.float32), HEAD_AXES[spec.tied])
           if with_grad else None)
    (total, dw), dx_nxBxCxD = jax.lax.scan(
        body, (jnp.zeros(3, jnp.float32), dw0),
        (strided(x_BxTxD), strided(targets_BxT), strided(mask_BxT)))
    if not with_grad:
        return total, None
    dx_BxTxD = jnp.moveaxis(dx_nxBxCxD, 0, 2).reshape(B, T, D)
    return total, (dx_BxTxD, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_loss(spec: _HeadSpec, head, x_BxTxD, targets_BxT, mask_BxT):
    total, _ = _over_chunks(spec, head, x_BxTxD, targets_BxT, mask_BxT, False)
    return total[0], total[1], total[2]


def _fused_loss_fwd(spec: _HeadSpec, head, x_BxTxD, targets_BxT, mask_BxT):
    total, (dx_BxTxD, dw) = _over_chunks(spec, head, x_BxTxD, targets_BxT, mask_BxT, True)
    return (total[0], total[1], total[2]), (dx_BxTxD, dw.astype(head.dtype))


def _fused_loss_bwd(spec: _HeadSpec, residuals, cotangents):
    dx_BxTxD, dw = residuals
    g = cotangents[0]  # Σ nll and Σ logz² are values only
    return (g.astype(dw.dtype) * dw, g.astype(dx_BxTxD.dtype) * dx_BxTxD, None, None)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
