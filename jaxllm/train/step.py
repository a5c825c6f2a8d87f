"""The pure train and eval steps: (state, batch) → (state, metrics), state donated.

Dimension letters (docs/glossary.md): A gradient-accumulation micro-batches, B batch, T length,
V vocab. The loss is the mean next-token cross entropy over the tokens whose `loss_mask` is 1,
with a float32 log-softmax; with accumulation the mean is over all tokens of the global batch,
so it does not depend on how the batch is split.

Mixture-of-experts models add their router losses (jaxllm/model/moe.py `router_losses`):
`router_aux_loss_coef` × the load-balancing loss and `router_z_loss_coef` × the router z-loss,
each computed per micro-batch and weighted by its tokens like the cross entropy. The step's
metrics then carry `aux_loss`, `router_z_loss`, `expert_load` and `dropped_frac`, averaged
the same way.

A distillation stage (`objective` distill) runs the teacher's forward pass on each micro-batch
beside the student's, without gradients, and learns its distribution (jaxllm/train/loss.py);
`loss` stays the cross entropy on the data, and `distill_kl` is the KL per token. A DPO stage
(`objective` dpo) runs the frozen reference beside the policy on rows of preference pairs
(jaxllm/train/dpo.py): `loss` is the DPO loss per pair, averaged over the global batch's pairs,
with the reward metrics of DPO_METRICS.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import flax
import jax
import jax.numpy as jnp
import ml_collections as mc
import optax

from jaxllm.model import apply
from jaxllm.model.transformer import head_weight
from jaxllm.train.dpo import dpo_sums, pair_logprobs, token_logprobs
from jaxllm.train.loss import Teacher, summed_losses
from jaxllm.train.optim import Schedule

Batch = dict[str, jax.Array]


@flax.struct.dataclass
class TrainState:
    step: jax.Array  # global steps taken (skipped bad steps included), across stages
    params: dict
    opt_state: optax.OptState
    loss_ema: jax.Array  # running average of accepted losses, for the spike check; 0: none yet
    bad_in_row: jax.Array  # consecutive skipped steps

    @classmethod
    def create(cls, params: dict, opt_state: optax.OptState) -> TrainState:
        return cls(step=jnp.int32(0), params=params, opt_state=opt_state,
                   loss_ema=jnp.float32(0), bad_in_row=jnp.int32(0))


MOE_METRICS = ("aux_loss", "router_z_loss", "expert_load", "dropped_frac")
DPO_METRICS = ("reward_margin", "chosen_reward", "rejected_reward", "reward_accuracy",
               "chosen_logp", "rejected_logp")
EMA_DECAY = 0.99  # the loss average spans ~100 steps: slow enough that a spike stands out


@dataclasses.dataclass(frozen=True)
class Distillation:
    """A distillation stage's teacher model and loss settings (config.distill)."""
    model_cfg: mc.FrozenConfigDict
    temperature: float
    alpha: float  # the KL's weight; the cross entropy's is 1 − alpha

    def teacher(self, teacher_params: dict, batch: Batch) -> Teacher:
        """The teacher's final hidden states on `batch` (no gradient) and its head."""
        x_BxTxD, _ = apply(self.model_cfg, teacher_params, batch["inputs"], batch["positions"],
                           batch["segment_ids"], head_out=False)
        return Teacher(self.model_cfg, head_weight(self.model_cfg, teacher_params),
                       jax.lax.stop_gradient(x_BxTxD), self.temperature, self.alpha)


@dataclasses.dataclass(frozen=True)
class Preference:
    """A DPO stage's frozen reference model and settings (config.dpo); `pairs` pair slots per
    row bound the pairs a row can hold."""
    reference_cfg: mc.FrozenConfigDict
    beta: float
    pairs: int


def preference_loss(params: dict, model_cfg: mc.FrozenConfigDict, batch: Batch,
                    preference: Preference, reference_params: dict, chunk_size: int = 0
                    ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, dict]]:
    """(Σ DPO loss over the batch's pairs (+ pairs·MoE router losses), (Σ DPO loss, pairs,
    sums of DPO_METRICS and the MoE ones × pairs))."""
    def pair_logps(cfg, p):
        x_BxTxD, aux = apply(cfg, p, batch["inputs"], batch["positions"], batch["segment_ids"],
                             head_out=False)
        logp_BxT = token_logprobs(cfg, head_weight(cfg, p), x_BxTxD, batch["targets"],
                                  chunk_size)
        return pair_logprobs(logp_BxT, batch["loss_mask"].astype(jnp.float32),
                             batch["segment_ids"], preference.pairs), aux

    policy, aux = pair_logps(model_cfg, params)
    reference, _ = pair_logps(preference.reference_cfg, reference_params)
    sums = dpo_sums(policy, jax.lax.stop_gradient(reference[:2]), preference.beta)
    objective, count = sums["loss"], sums["pairs"]
    objective += router_objective(model_cfg, aux, count)
    metrics = {k: jax.lax.stop_gradient(v) * count for k, v in aux.items()}
    metrics |= {k: sums[k] for k in DPO_METRICS}
    return objective, (jax.lax.stop_gradient(sums["loss"]), count, metrics)


def router_objective(model_cfg: mc.FrozenConfigDict, aux: dict, weight: jax.Array) -> jax.Array:
    """An MoE model's router losses for the objective, `weight` times (its tokens or pairs);
    0 for a dense model (no `aux`)."""
    if not aux:
        return jnp.float32(0)
    return weight * (model_cfg.router_aux_loss_coef * aux["aux_loss"]
                     + model_cfg.router_z_loss_coef * aux["router_z_loss"])


def summed_loss(params: dict, model_cfg: mc.FrozenConfigDict, batch: Batch, z_loss: float,
                chunk_size: int = 0, teacher: Teacher | None = None
                ) -> tuple[jax.Array, tuple[jax.Array, jax.Array, dict]]:
    """(the objective over the masked tokens: Σ nll + z_loss·Σ logz² + count·(MoE router
    losses), or with a teacher its distillation objective, (Σ nll, token count, sums of the
    metrics: the MoE ones × count, `distill_kl` Σ KL))."""
    x_BxTxD, aux = apply(model_cfg, params, batch["inputs"], batch["positions"],
                         batch["segment_ids"], head_out=False)
    objective, nll, _, kl = summed_losses(model_cfg, head_weight(model_cfg, params), x_BxTxD,
                                          batch["targets"], batch["loss_mask"], chunk_size,
                                          z_loss, teacher)
    count = jnp.sum(batch["loss_mask"].astype(jnp.float32))
    objective += router_objective(model_cfg, aux, count)
    sums = jax.tree.map(lambda x: x * count, aux)
    if teacher is not None:
        sums["distill_kl"] = kl
    return objective, (nll, count, sums)


def make_train_step(model_cfg: mc.FrozenConfigDict, tx: optax.GradientTransformation,
                    schedule: Schedule, stage_start: int, grad_accum: int, z_loss: float,
                    spike_factor: float = 0.0, loss_chunk: int = 0,
                    distill: Distillation | None = None, preference: Preference | None = None
                    ) -> Callable[..., tuple[TrainState, dict]]:
    """The step of one stage, (state, batch) → (state, metrics), or with `distill` /
    `preference` (state, batch, the teacher's / reference's params) → (state, metrics);
    `schedule` runs on the step within the stage.

    A step whose loss or gradient norm is not finite, or whose loss is above `spike_factor`
    times the running average (when spike_factor > 0), leaves params and optimizer state as
    they were and reports `skipped` = 1.
    """
    grad_fn = jax.grad(preference_loss if preference else summed_loss, has_aux=True)

    def train_step(state: TrainState, batch: Batch, frozen_params: dict | None = None
                   ) -> tuple[TrainState, dict]:
        micro_AxB = jax.tree.map(
            lambda x: x.reshape(grad_accum, x.shape[0] // grad_accum, *x.shape[1:]), batch)

        def accumulate(carry, micro_batch):
            grads, nll, count, aux = carry
            if preference:
                args = (preference, frozen_params, loss_chunk)
            else:
                teacher = distill.teacher(frozen_params, micro_batch) if distill else None
                args = (z_loss, loss_chunk, teacher)
            g, (nll_i, count_i, aux_i) = grad_fn(state.params, model_cfg, micro_batch, *args)
            grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
            aux = jax.tree.map(jnp.add, aux, aux_i)
            return (grads, nll + nll_i, count + count_i, aux), None

        zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), state.params)
        names = (*(MOE_METRICS if model_cfg.num_experts else ()),
                 *(("distill_kl",) if distill else ()), *(DPO_METRICS if preference else ()))
        no_aux = {k: jnp.float32(0) for k in names}
        (grads, nll, count, aux), _ = jax.lax.scan(
            accumulate, (zeros, jnp.float32(0), jnp.float32(0), no_aux), micro_AxB)
        count = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / count, grads)
        loss, grad_norm = nll / count, optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        lr = schedule(state.step - stage_start)
        params = jax.tree.map(lambda p, u: (p - lr * u).astype(p.dtype), state.params, updates)

        # The average starts afresh with each stage: its data and objective set its own loss
        # level (a DPO loss is below 1).
        loss_ema = jnp.where(state.step == stage_start, 0.0, state.loss_ema)
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        if spike_factor > 0:
            ok &= (loss_ema == 0) | (loss <= spike_factor * loss_ema)
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)  # noqa: E731
        ema = jnp.where(loss_ema == 0, loss, EMA_DECAY * loss_ema + (1 - EMA_DECAY) * loss)
        new_state = TrainState(
            step=state.step + 1, params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            loss_ema=jnp.where(ok, ema, loss_ema),
            bad_in_row=jnp.where(ok, 0, state.bad_in_row + 1))
        metrics = {"loss": loss, "grad_norm": grad_norm, "lr": lr, "tokens": count,
                   "skipped": 1 - ok.astype(jnp.int32),
                   **{k: v / count for k, v in aux.items()}}
        return new_state, metrics

    return train_step


def make_eval_step(model_cfg: mc.FrozenConfigDict, loss_chunk: int = 0,
                   preference: Preference | None = None) -> Callable[..., tuple]:
    """params, batch → (Σ nll, token count); with `preference` (params, batch, reference
    params) → (Σ DPO loss, pairs, sums of DPO_METRICS). The caller divides after summing
    batches."""
    if preference:
        def eval_step(params: dict, batch: Batch, reference_params: dict) -> tuple:
            _, (loss, pairs, sums) = preference_loss(params, model_cfg, batch, preference,
                                                     reference_params, loss_chunk)
            return loss, pairs, {k: sums[k] for k in DPO_METRICS}
        return eval_step

    def eval_step(params: dict, batch: Batch) -> tuple[jax.Array, jax.Array]:
        _, (nll, count, _) = summed_loss(params, model_cfg, batch, 0.0, loss_chunk)
        return nll, count

    return eval_step
