"""The next-token loss over the vocabulary, a chunk of tokens at a time, with its gradient;
and the distillation loss, a teacher's next-token distribution learned the same way.

Dimension letters (docs/glossary.md): B batch, T length, D model dim, V vocab, n chunks of a row,
Tc = T / n the tokens of a chunk.

At Qwen2's vocabulary (151,936) the float32 logits of one 4,096-token row are 2.5 GB, and their
gradient as much again; a loss that first builds all of them needs that memory on top of the
model's. Here the vocabulary projection runs inside a `lax.scan` over chunks of tokens, and
the loss is a custom VJP whose forward pass also computes the gradient: for each chunk it
forms the logits, the log-partition logz, the target logits, and d objective / d logits =
mask·(softmax·(1 + 2·z_loss·logz) − onehot(target)), then multiplies that back through the
head at once (dx for the chunk's hidden states, dW summed over chunks). So at most one
chunk's logits exist at a time, nothing is recomputed, and the backward pass only scales dx
and dW by the objective's cotangent. Only the objective carries a gradient; Σ nll, Σ logz²
and Σ KL come out beside it as values (metrics).

With a teacher (its final hidden states and head, no gradient) the objective is
(1 − α)·Σ nll + α·τ²·Σ KL(p_τ ‖ q_τ) + z_loss·Σ logz², where p_τ and q_τ are the teacher's and
the student's softmax at temperature τ, and d/d logits of α·τ²·KL is α·τ·(q_τ − p_τ). The
teacher's logits are formed chunk by chunk beside the student's, so neither model's [B, T, V]
is ever whole. The two vocabularies may have different padding rows: the teacher's extra
rows are cut, the student's extra rows get no teacher probability.

Chunk i holds tokens i, i + n, i + 2n, ... of every row (strided, not contiguous): the loss is
a sum over tokens, so any partition gives the same value, and a strided one keeps every chunk
spread over all devices when the rows are split over `sequence`. A chunk stays [B, Tc]: merged
into B·Tc tokens (B split over the batch axes, Tc over sequence) the partitioner would gather it
over sequence, and every sequence device would compute the whole chunk's logits.
`loss.chunk_size` = 0 is the plain loss: whole logits and autodiff, the obvious version the
fused one is tested against.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import linen as nn

from jaxllm.model.transformer import vocab_logits

HEAD_AXES = {True: ("vocab", "embed"), False: ("embed", "vocab")}  # tied: the embedding [V, D]


class Teacher(NamedTuple):
    """What the distillation loss needs of the teacher: its model config, the head weight
    (`transformer.head_weight`), its final hidden states [B, T, D_teacher], and the loss's
    temperature τ and weight α."""
    model_cfg: object
    head: jax.Array
    x_BxTxD: jax.Array
    temperature: float
    alpha: float


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, both float32."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return logz_BxT - target_logit_BxT, logz_BxT


def fit_vocab(teacher_logits_BxTxV: jax.Array, V: int) -> jax.Array:
    """The teacher's logits over the student's V rows: extra rows cut, missing ones −inf."""
    Vt = teacher_logits_BxTxV.shape[-1]
    if Vt >= V:
        return teacher_logits_BxTxV[..., :V]
    pad = [(0, 0)] * (teacher_logits_BxTxV.ndim - 1) + [(0, V - Vt)]
    return jnp.pad(teacher_logits_BxTxV, pad, constant_values=-jnp.inf)


def token_kl(student_logits_BxTxV: jax.Array, teacher_logits_BxTxV: jax.Array,
             temperature: float) -> tuple[jax.Array, jax.Array, jax.Array]:
    """(KL(p_τ ‖ q_τ) per token, q_τ, p_τ): the teacher's (p) and the student's (q)
    softmax at temperature τ, both float32, the teacher's logits already on the student's
    rows (`fit_vocab`)."""
    log_q = jax.nn.log_softmax(student_logits_BxTxV.astype(jnp.float32) / temperature, axis=-1)
    log_p = jax.nn.log_softmax(teacher_logits_BxTxV.astype(jnp.float32) / temperature, axis=-1)
    p = jnp.exp(log_p)
    kl_BxT = jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)
    return kl_BxT, jnp.exp(log_q), p


def num_chunks(T: int, chunk_size: int) -> int:
    """The fewest chunks of at most `chunk_size` tokens that divide T evenly (1: whole rows)."""
    if chunk_size <= 0 or T <= chunk_size:
        return 1
    n = -(-T // chunk_size)
    while T % n:
        n += 1
    return n


def summed_losses(model_cfg, head: jax.Array, x_BxTxD: jax.Array, targets_BxT: jax.Array,
                  mask_BxT: jax.Array, chunk_size: int, z_loss: float = 0.0,
                  teacher: Teacher | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """(objective, Σ nll, Σ logz², Σ KL) over the tokens where `mask` is 1, from the final
    hidden states and the head weight (`transformer.head_weight`). The objective is
    Σ nll + z_loss·Σ logz², or with a teacher (1 − α)·Σ nll + α·τ²·Σ KL + z_loss·Σ logz²
    (Σ KL is 0 without one). Only the objective carries a gradient."""
    mask_BxT = mask_BxT.astype(jnp.float32)
    if chunk_size <= 0:
        logits_BxTxV = vocab_logits(model_cfg, head, x_BxTxD)
        nll_BxT, logz_BxT = token_losses(logits_BxTxV, targets_BxT)
        nll, logz2 = jnp.sum(nll_BxT * mask_BxT), jnp.sum(jnp.square(logz_BxT) * mask_BxT)
        objective, kl = nll + z_loss * logz2, jnp.float32(0)
        if teacher is not None:
            t_logits_BxTxV = jax.lax.stop_gradient(fit_vocab(
                vocab_logits(teacher.model_cfg, teacher.head, teacher.x_BxTxD),
                logits_BxTxV.shape[-1]))
            kl_BxT, _, _ = token_kl(logits_BxTxV, t_logits_BxTxV, teacher.temperature)
            kl = jnp.sum(kl_BxT * mask_BxT)
            objective = ((1 - teacher.alpha) * nll + z_loss * logz2
                         + teacher.alpha * teacher.temperature ** 2 * kl)
        stop = jax.lax.stop_gradient
        return objective, stop(nll), stop(logz2), stop(kl)
    n = num_chunks(x_BxTxD.shape[1], chunk_size)
    spec = _HeadSpec(bool(model_cfg.tie_embeddings), str(model_cfg.dtype), n, float(z_loss))
    t_head = t_x = None
    if teacher is not None:
        spec = dataclasses.replace(
            spec, teacher_tied=bool(teacher.model_cfg.tie_embeddings),
            teacher_dtype=str(teacher.model_cfg.dtype),
            temperature=float(teacher.temperature), alpha=float(teacher.alpha))
        t_head = jax.lax.stop_gradient(teacher.head)
        t_x = jax.lax.stop_gradient(teacher.x_BxTxD)
    return _fused_loss(spec, head, x_BxTxD, targets_BxT, mask_BxT, t_head, t_x)


@dataclasses.dataclass(frozen=True)
class _HeadSpec:
    tied: bool  # head is the embedding [V, D]; else lm_head's kernel [D, V]
    dtype: str  # compute dtype of the head's matmuls
    n: int  # chunks per row
    z_loss: float
    teacher_tied: bool = False  # the same three of the teacher's head, when there is one
    teacher_dtype: str = "float32"
    temperature: float = 1.0
    alpha: float = 0.0  # the KL's weight; the nll's is 1 − alpha


def _logits(x_BxTcxD, head, tied: bool, dtype: str):
    """float32 logits of a chunk and the head in its compute dtype (V is axis 0 when tied)."""
    w = head.astype(dtype)
    d_of_w = 1 if tied else 0
    return jax.lax.dot_general(x_BxTcxD.astype(dtype), w, (((2,), (d_of_w,)), ((), ())),
                               preferred_element_type=jnp.float32), w


def _chunk(spec: _HeadSpec, head, x_BxTcxD, targets_BxTc, mask_BxTc, t_head, t_x_BxTcxD,
           with_grad: bool):
    """([Σ objective, Σ nll, Σ logz², Σ KL] of one chunk, and with_grad: (dx [B, Tc, D] in
    x's dtype, dW in the compute dtype in head's layout) of the objective)."""
    logits_BxTcxV, w = _logits(x_BxTcxD, head, spec.tied, spec.dtype)
    logz_BxTc = jax.nn.logsumexp(logits_BxTcxV, axis=-1)
    target_logit_BxTc = jnp.take_along_axis(logits_BxTcxV, targets_BxTc[..., None], axis=-1)[..., 0]
    nll = jnp.sum((logz_BxTc - target_logit_BxTc) * mask_BxTc)
    logz2 = jnp.sum(logz_BxTc ** 2 * mask_BxTc)
    kl, tau, alpha = jnp.float32(0), spec.temperature, spec.alpha
    if t_head is not None:
        t_logits_BxTcxV, _ = _logits(t_x_BxTcxD, t_head, spec.teacher_tied, spec.teacher_dtype)
        kl_BxTc, q_BxTcxV, p_BxTcxV = token_kl(
            logits_BxTcxV, fit_vocab(t_logits_BxTcxV, logits_BxTcxV.shape[-1]), tau)
        kl = jnp.sum(kl_BxTc * mask_BxTc)
    sums = jnp.stack([(1 - alpha) * nll + spec.z_loss * logz2 + alpha * tau ** 2 * kl,
                      nll, logz2, kl])
    if not with_grad:
        return sums, None
    softmax_BxTcxV = jnp.exp(logits_BxTcxV - logz_BxTc[..., None])
    scale_BxTc = ((1 - alpha) + 2.0 * spec.z_loss * logz_BxTc) * mask_BxTc
    is_target_BxTcxV = jnp.arange(logits_BxTcxV.shape[-1]) == targets_BxTc[..., None]
    dlogits_BxTcxV = (softmax_BxTcxV * scale_BxTc[..., None]
                      - jnp.where(is_target_BxTcxV, (1 - alpha) * mask_BxTc[..., None], 0.0))
    if t_head is not None:
        dlogits_BxTcxV += (alpha * tau * mask_BxTc)[..., None] * (q_BxTcxV - p_BxTcxV)
    dlogits_BxTcxV = dlogits_BxTcxV.astype(spec.dtype)
    d_of_w = 1 if spec.tied else 0
    # dx = dlogits · W (contracting V); dW contracts the chunk's B and Tc tokens of dlogits, x.
    dx_BxTcxD = jax.lax.dot_general(dlogits_BxTcxV, w, (((2,), (1 - d_of_w,)), ((), ())),
                                    preferred_element_type=jnp.float32).astype(x_BxTcxD.dtype)
    # A chunk's dW in the compute dtype, as every layer's: the device's partial sum is a whole
    # [V, D] before it is reduce-scattered onto the head's split (4.6 GiB in float32 at 72B).
    x = x_BxTcxD.astype(spec.dtype)
    tokens = (((0, 1), (0, 1)), ((), ()))
    dw = (jax.lax.dot_general(dlogits_BxTcxV, x, tokens) if spec.tied else
          jax.lax.dot_general(x, dlogits_BxTcxV, tokens))
    return sums, (dx_BxTcxD, dw)


def _over_chunks(spec: _HeadSpec, head, x_BxTxD, targets_BxT, mask_BxT, t_head, t_x_BxTxD,
                 with_grad: bool):
    """Sums over every chunk, and with_grad (dx [B, T, D], dW float32)."""
    B, T, D = x_BxTxD.shape
    n = spec.n
    # [B, T] → [n, B, Tc]: chunk i is tokens i, i + n, ... of every row.
    strided = lambda a: None if a is None else jnp.moveaxis(  # noqa: E731
        a.reshape(B, T // n, n, *a.shape[2:]), 2, 0)

    def body(carry, chunk):
        total, dw = carry
        sums, grads = _chunk(spec, head, *chunk[:3], t_head, chunk[3], with_grad)
        if not with_grad:
            return (total + sums, dw), None
        # The float32 sum of dW stays split like the head (each chunk's part reduce-scattered
        # onto it), not whole on every device: [V, D] is 4.6 GiB at Qwen2's size.
        dw = nn.with_logical_constraint(dw + grads[1].astype(jnp.float32), HEAD_AXES[spec.tied])
        return (total + sums, dw), grads[0]

    dw0 = (nn.with_logical_constraint(jnp.zeros(head.shape, jnp.float32), HEAD_AXES[spec.tied])
           if with_grad else None)
    (total, dw), dx_nxBxCxD = jax.lax.scan(
        body, (jnp.zeros(4, jnp.float32), dw0),
        (strided(x_BxTxD), strided(targets_BxT), strided(mask_BxT), strided(t_x_BxTxD)))
    if not with_grad:
        return total, None
    dx_BxTxD = jnp.moveaxis(dx_nxBxCxD, 0, 2).reshape(B, T, D)
    return total, (dx_BxTxD, dw)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _fused_loss(spec: _HeadSpec, head, x_BxTxD, targets_BxT, mask_BxT, t_head, t_x_BxTxD):
    total, _ = _over_chunks(spec, head, x_BxTxD, targets_BxT, mask_BxT, t_head, t_x_BxTxD,
                            False)
    return tuple(total)


def _fused_loss_fwd(spec: _HeadSpec, head, x_BxTxD, targets_BxT, mask_BxT, t_head, t_x_BxTxD):
    total, (dx_BxTxD, dw) = _over_chunks(spec, head, x_BxTxD, targets_BxT, mask_BxT, t_head,
                                         t_x_BxTxD, True)
    return tuple(total), (dx_BxTxD, dw.astype(head.dtype))


def _fused_loss_bwd(spec: _HeadSpec, residuals, cotangents):
    dx_BxTxD, dw = residuals
    g = cotangents[0]  # Σ nll, Σ logz² and Σ KL are values only; the teacher has no gradient
    return (g.astype(dw.dtype) * dw, g.astype(dx_BxTxD.dtype) * dx_BxTxD, None, None, None, None)


_fused_loss.defvjp(_fused_loss_fwd, _fused_loss_bwd)
