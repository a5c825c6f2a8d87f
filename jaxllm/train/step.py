"""The pure train and eval steps: (state, batch) → (state, metrics), state donated.

Dimension letters: A gradient-accumulation micro-batches, B batch, T length, V vocab.
The loss is the mean next-token cross entropy over the tokens whose `loss_mask` is 1, with a
float32 log-softmax; with accumulation the mean is over all tokens of the global batch, so
it does not depend on how the batch is split.
"""

from __future__ import annotations

from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections as mc
import optax

from jaxllm.model import apply
from jaxllm.optim import Schedule

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # global optimizer steps taken, across stages
    params: dict
    opt_state: optax.OptState


def token_losses(logits_BxTxV: jax.Array, targets_BxT: jax.Array
                 ) -> tuple[jax.Array, jax.Array]:
    """Per-token negative log-likelihood and log-partition, both float32."""
    logits_BxTxV = logits_BxTxV.astype(jnp.float32)
    logz_BxT = jax.nn.logsumexp(logits_BxTxV, axis=-1)
    target_logit_BxT = jnp.take_along_axis(logits_BxTxV, targets_BxT[..., None], axis=-1)[..., 0]
    return logz_BxT - target_logit_BxT, logz_BxT


def summed_loss(params: dict, model_cfg: mc.FrozenConfigDict, batch: Batch, z_loss: float
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array]]:
    """(Σ nll + z_loss·Σ logz², (Σ nll, token count)) over the masked tokens."""
    logits_BxTxV = apply(model_cfg, params, batch["inputs"], batch["positions"],
                         batch["segment_ids"])
    nll_BxT, logz_BxT = token_losses(logits_BxTxV, batch["targets"])
    mask_BxT = batch["loss_mask"].astype(jnp.float32)
    nll = jnp.sum(nll_BxT * mask_BxT)
    objective = nll + z_loss * jnp.sum(jnp.square(logz_BxT) * mask_BxT) if z_loss else nll
    return objective, (nll, jnp.sum(mask_BxT))


def make_train_step(model_cfg: mc.FrozenConfigDict, tx: optax.GradientTransformation,
                    schedule: Schedule, stage_start: int, grad_accum: int, z_loss: float
                    ) -> Callable[[TrainState, Batch], tuple[TrainState, dict]]:
    """The step of one stage; `schedule` runs on the step within the stage."""
    grad_fn = jax.grad(summed_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch) -> tuple[TrainState, dict]:
        micro_AxB = jax.tree.map(
            lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

        def accumulate(carry, micro_batch):
            grads, nll, count = carry
            g, (nll_i, count_i) = grad_fn(state.params, model_cfg, micro_batch, z_loss)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            return (grads, nll + nll_i, count + count_i), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        (grads, nll, count), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro_AxB)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = schedule(state.step - stage_start)
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)
        metrics = {"loss": nll / count, "grad_norm": optax.global_norm(grads), "lr": lr,
                   "tokens": count}
        return TrainState(step=state.step + 1, params=params, opt_state=opt_state), metrics

    return train_step


def make_eval_step(model_cfg: mc.FrozenConfigDict) -> Callable[[dict, Batch], tuple]:
    """params, batch → (Σ nll, token count); the caller divides after summing batches."""

    def eval_step(params: dict, batch: Batch) -> tuple[jax.Array, jax.Array]:
        _, (nll, count) = summed_loss(params, model_cfg, batch, 0.0)
        return nll, count

    return eval_step
