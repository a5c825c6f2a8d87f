"""The next-token loss over the vocabulary, a chunk of tokens at a time, with its gradient.

Dimension letters: B batch, T length, D model dim, V vocab, n chunks of a row, C = T / n,
N = B·C tokens of a chunk.

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
spread over all devices when the rows are split over `sequence`. `loss.chunk_size` = 0 is the
plain loss: whole logits and autodiff, the obvious version the fused one is tested against.
"""

from __future__ import annotations

import dataclasses
import functools

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


def _chunk(spec: _HeadSpec, head, x_NxD, targets_N, mask_N, with_grad: bool):
    """([Σ objective, Σ nll, Σ logz²] of one chunk, and with_grad: (dx [N, D] in x's dtype,
    dW float32 in head's layout) of the objective)."""
    w = head.astype(spec.dtype)
    x = x_NxD.astype(spec.dtype)
    contract_d = (((1,), (1,)), ((), ())) if spec.tied else (((1,), (0,)), ((), ()))
    logits_NxV = jax.lax.dot_general(x, w, contract_d, preferred_element_type=jnp.float32)
    logz_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    target_logit_N = jnp.take_along_axis(logits_NxV, targets_N[:, None], axis=-1)[:, 0]
    nll, logz2 = jnp.sum((logz_N - target_logit_N) * mask_N), jnp.sum(logz_N ** 2 * mask_N)
    sums = jnp.stack([nll + spec.z_loss * logz2, nll, logz2])
    if not with_grad:
        return sums, None
    p_NxV = jnp.exp(logits_NxV - logz_N[:, None])
    scale_N = (1.0 + 2.0 * spec.z_loss * logz_N) * mask_N
    is_target_NxV = jnp.arange(logits_NxV.shape[1])[None, :] == targets_N[:, None]
    dlogits_NxV = (p_NxV * scale_N[:, None]
                   - jnp.where(is_target_NxV, mask_N[:, None], 0.0)).astype(spec.dtype)
    # dx = dlogits · W (contracting V); dW contracts the N tokens of dlogits and x.
    dx_NxD = jax.lax.dot_general(dlogits_NxV, w, (((1,), (0,)), ((), ())) if spec.tied
                                 else (((1,), (1,)), ((), ())),
                                 preferred_element_type=jnp.float32).astype(x_NxD.dtype)
    tokens = (((0,), (0,)), ((), ()))
    dw = (jax.lax.dot_general(dlogits_NxV, x, tokens, preferred_element_type=jnp.float32)
          if spec.tied else
          jax.lax.dot_general(x, dlogits_NxV, tokens, preferred_element_type=jnp.float32))
    return sums, (dx_NxD, dw)


def _over_chunks(spec: _HeadSpec, head, x_BxTxD, targets_BxT, mask_BxT, with_grad: bool):
    """Sums over every chunk, and with_grad (dx [B, T, D], dW float32)."""
    B, T, D = x_BxTxD.shape
    n = spec.n
    # [B, T] → [n, B·C]: chunk i is tokens i, i + n, ... of every row.
    strided = lambda a: jnp.moveaxis(  # noqa: E731
        a.reshape(B, T // n, n, *a.shape[2:]), 2, 0).reshape(n, B * (T // n), *a.shape[2:])

    def body(carry, chunk):
        total, dw = carry
        sums, grads = _chunk(spec, head, *chunk, with_grad)
        if not with_grad:
            return (total + sums, dw), None
        return (total + sums, dw + grads[1]), grads[0]

    dw0 = jnp.zeros(head.shape, jnp.float32) if with_grad else None
    (total, dw), dx_nxNxD = jax.lax.scan(
        body, (jnp.zeros(3, jnp.float32), dw0),
        (strided(x_BxTxD), strided(targets_BxT), strided(mask_BxT)))
    if not with_grad:
        return total, None
    dx_BxTxD = jnp.moveaxis(dx_nxNxD.reshape(n, B, T // n, D), 0, 2).reshape(B, T, D)
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
