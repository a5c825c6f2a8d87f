"""The step loop of one stage: train, log, evaluate, save; bad steps and preemption.

Bad steps: the train step itself skips an update whose loss or gradient is not finite (or
spikes); after `config.bad_steps.max_in_row` skipped steps in a row the loop restores the
newest checkpoint and, replaying from it, draws the offending batches without training on them.

Preemption: SIGTERM or SIGINT sets a flag; at the next step boundary the loop saves a
checkpoint, waits for it to be written, and raises `Preempted`; `python -m jaxllm.main` then
exits with PREEMPTED_EXIT_CODE, and running the same command again resumes from that step.
"""

from __future__ import annotations

import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import jax
import ml_collections as mc
import numpy as np
from jax.experimental import multihost_utils

from jaxllm.checkpoint.state import Checkpointer, abstract_like
from jaxllm.data import eval_batches, make_iterator
from jaxllm.data.mixture import Position
from jaxllm.parallel import sharding
from jaxllm.parallel.blocks import row_order, traced_in_row_order
from jaxllm.train.metrics import MetricsWriter, Mfu, flops_per_token
from jaxllm.train.optim import make_optimizer, make_schedule
from jaxllm.train.profiling import Profiler
from jaxllm.train.step import (
    DPO_METRICS,
    MOE_METRICS,
    Distillation,
    Preference,
    TrainState,
    make_eval_step,
    make_train_step,
)

PREEMPTED_EXIT_CODE = 75  # EX_TEMPFAIL: "try again later", what a scheduler should do


class Preempted(Exception):
    """Raised once the checkpoint that SIGTERM / SIGINT asked for is on disk."""


class PreemptionFlag:
    """Turns SIGTERM and SIGINT into a request the loop honours at a step boundary.

    A second SIGINT (Ctrl-C twice) stops at once, without a checkpoint.
    """

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self) -> PreemptionFlag:
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logging.warning("received signal %d: saving a checkpoint at the next step", signum)

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def agreed(self, step: int, every: int) -> bool:
        """Whether all processes stop now. Alone: at once. With peers: every `every` steps,
        all processes compare flags in one small collective, so they stop at the same step."""
        if jax.process_count() == 1:
            return self.requested
        if step % every:
            return False
        flags = multihost_utils.process_allgather(np.int32(self.requested))
        return bool(np.max(flags))


@dataclass(frozen=True)
class StageContext:
    """What an evaluator may need to set itself up for one stage."""

    name: str
    model_cfg: mc.FrozenConfigDict  # the stage's (its rope_theta)
    mesh: jax.sharding.Mesh
    order: np.ndarray | None  # row order of the stage's batches (blocks.row_order)
    tokenizer: Any


class Evaluator(Protocol):
    """A periodic evaluation of the live params that the loop is handed (jaxllm.eval's
    `loop_evaluators` builds them from the config): it runs at every `every`-th step (0:
    none) and at the end of each stage that `for_stage` gives a function for; the function's
    {name: value} (names start with `prefix`) goes to metrics.jsonl. A step whose metrics.jsonl
    already has `prefix` values is not evaluated again."""

    config_key: str  # the config key that asks for it
    prefix: str
    every: int

    def for_stage(self, stage: StageContext) -> Callable[[Any], dict[str, float]] | None: ...


@dataclass
class Run:
    """What every stage of one run shares."""

    config: mc.ConfigDict
    workdir: str
    mesh: jax.sharding.Mesh
    state_sh: TrainState
    tokenizer: object
    ckpt: Checkpointer
    writer: MetricsWriter
    mfu: Mfu  # achieved FLOP/s → MFU, against the chips' rated (or a measured) peak
    preemption: PreemptionFlag
    evaluators: list[Evaluator] = field(default_factory=list)
    logged: dict[str, set[int]] = field(default_factory=dict)  # prefix → steps in metrics
    teacher: tuple[Distillation, dict] | None = None  # of distill stages (train/teacher.py)
    reference: tuple[Preference, dict] | None = None  # of the dpo stage that runs next


def stage_steps(config: mc.ConfigDict, span, model_cfg: mc.FrozenConfigDict, mesh,
                state_sh: TrainState, distill: Distillation | None = None,
                preference: Preference | None = None
                ) -> tuple[Callable, Callable, np.ndarray | None]:
    """The jitted train step (state donated; with `distill` / `preference` it also takes the
    teacher's / reference's params) and eval step of a stage on `mesh` (with `preference`,
    it takes the reference's params too), and the row order its batches take
    (`row_order`: split over `sequence`, rows are laid out for ring attention, and
    `to_global` permutes them); jaxllm.compile compiles exactly these."""
    stage = config.stages[span.name]
    step_fn = make_train_step(model_cfg, make_optimizer(config.optimizer),
                              make_schedule(stage.lr, span.steps), span.start,
                              config.optimizer.grad_accum, config.loss.z_loss,
                              config.bad_steps.spike_factor, config.loss.chunk_size, distill,
                              preference)
    order = row_order(mesh, stage.seq_len)
    train_step = jax.jit(traced_in_row_order(step_fn, order), donate_argnums=0,
                         out_shardings=(state_sh, None))
    eval_step = jax.jit(traced_in_row_order(
        make_eval_step(model_cfg, config.loss.chunk_size, preference), order))
    return train_step, eval_step, order


def run_stage(run: Run, span, state: TrainState, resume_data: dict | None,
              positions: dict[str, Position], model_cfg: mc.FrozenConfigDict
              ) -> tuple[TrainState, dict]:
    """Trains steps [state.step, span.end) of one stage, reading each source from
    `positions`; returns the state and the data iterator's state at the stage's end."""
    config, writer = run.config, run.writer
    stage = config.stages[span.name]
    distill, teacher_params = run.teacher if stage.objective == "distill" else (None, None)
    preference, reference_params = run.reference if stage.objective == "dpo" else (None, None)
    train_step, eval_step, order = stage_steps(config, span, model_cfg, run.mesh, run.state_sh,
                                               distill, preference)
    frozen_args = ((teacher_params,) if distill else (reference_params,) if preference else ())
    eval_args = (reference_params,) if preference else ()
    batch_sh = sharding.batch_sharding(run.mesh)
    data = make_iterator(config, span.name, run.tokenizer, split="train", sharding=batch_sh,
                         positions=positions)
    if resume_data is not None:
        data.set_state(resume_data)
    held_out = [to_global(b, batch_sh, order)
                for b in eval_batches(config, span.name, run.tokenizer, sharding=batch_sh)]
    context = StageContext(span.name, model_cfg, run.mesh, order, run.tokenizer)
    evaluations = [(e, fn) for e in run.evaluators if (fn := e.for_stage(context)) is not None]
    tokens_per_step = stage.batch_size * stage.seq_len
    flops = flops_per_token(config.model, stage.seq_len, config.mfu_convention)
    writer.message(f"stage {span.name}: steps {span.start}..{span.end - 1}, seq_len "
                   f"{stage.seq_len}, batch {stage.batch_size}, rope_theta {stage.rope_theta:g}"
                   + (f", distilling from {config.distill.teacher} (temperature "
                      f"{config.distill.temperature:g}, alpha {config.distill.alpha:g})"
                      if distill else "")
                   + (", chat fine-tuning: loss on assistant turns only"
                      if stage.objective == "sft" else "")
                   + (f", preference pairs against {config.dpo.reference or 'its starting weights'}"
                      f" (beta {config.dpo.beta:g})" if preference else ""))

    # Batches are numbered by when they were drawn from `data` (0: its first); `saved` maps a
    # checkpoint step to the number of batches drawn before it, so that a restore knows which
    # batches to drop however many restores and drops came before.
    def save(done: int) -> dict:
        data_state = data.get_state()
        run.ckpt.save(done, state, {"stage": span.name, "data_state": data_state,
                                    "sources": {n: p.to_json() for n, p in positions.items()}})
        saved[done] = drawn
        return data_state

    first = int(state.step)
    clock, clock_step = time.perf_counter(), first
    profiler = Profiler(config, run.workdir)  # config.profile's steps, if any are in this stage
    saved = {first: 0}  # (a checkpoint at `first`, if any, is where `data` started)
    bad_run: list[tuple[int, int]] = []  # (step, batch) of consecutive skipped steps
    dropped: set[int] = set()  # batches that a restore said to drop
    drawn, previous = 0, None  # batches drawn from `data`; (metrics, batch) of the last step
    epochs: dict[str, int] = {}  # of each source, as last logged
    step = first
    while step < span.end:
        batch = next(data)
        drawn += 1
        if drawn - 1 in dropped:
            writer.message(f"step {step}: dropping a batch that caused bad steps")
            continue
        with profiler.step(step):
            state, metrics = train_step(state, to_global(batch, batch_sh, order), *frozen_args)
        done, step = step + 1, step + 1
        profiler.after(done, state)
        writer.advance()
        # Read the previous step's flag: by now it is computed, so this never stalls the device.
        if previous is not None:
            bad_run = bad_run + [(done - 2, previous[1])] if int(previous[0]["skipped"]) else []
        previous = (metrics, drawn - 1)
        if done == span.end and int(metrics["skipped"]):  # no later step to read it at
            bad_run, previous = bad_run + [(done - 1, drawn - 1)], None
        if len(bad_run) >= config.bad_steps.max_in_row:
            data.close()
            state, data, dropped, step = _restore_after_bad_steps(
                run, span, state, [s for s, _ in bad_run], dropped | {b for _, b in bad_run},
                saved, batch_sh, positions)
            saved, bad_run, drawn, previous = {step: 0}, [], 0, None
            clock, clock_step = time.perf_counter(), step
            continue
        if done % config.log_every == 0 or done in (1, span.end):
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            rate = tokens_per_step * (done - clock_step) / (now - clock)
            clock, clock_step = now, done
            stats = data.stats()  # data_wait_sec, data_tokens_per_sec, epoch
            for name, epoch in stats.get("epoch", {}).items():
                if epoch > epochs.setdefault(name, epoch):
                    writer.message(f"step {done}: data source {name!r} has been read through; "
                                   f"epoch {epoch} begins, in a new order")
                    epochs[name] = epoch
            writer.write({"step": done, "stage": span.name, "loss": float(metrics["loss"]),
                          "lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
                          "tokens_per_sec": rate, "mfu": run.mfu(rate * flops),
                          **run.mfu.label_once(),
                          "skipped": int(metrics["skipped"]), **stats,
                          **{k: float(metrics[k]) for k in (*MOE_METRICS, "distill_kl",
                                                            *DPO_METRICS) if k in metrics}})
        paused = done == first + 1  # the first step of a stage compiles: leave it out
        if done % config.eval_every == 0 or done == span.end:
            sums = [jax.device_get(eval_step(state.params, b, *eval_args)) for b in held_out]
            count = max(sum(float(s[1]) for s in sums), 1)
            scores = {"eval_loss": sum(float(s[0]) for s in sums) / count}
            if preference:  # held-out pairs' rewards and log-probabilities
                scores |= {f"eval_{k}": sum(float(s[2][k]) for s in sums) / count
                           for k in DPO_METRICS}
            writer.write({"step": done, "stage": span.name, **scores})
            paused = True
        for evaluator, evaluate in evaluations:
            logged = run.logged.setdefault(evaluator.prefix, set())
            every = evaluator.every
            if done in logged or not (done == span.end or (every and done % every == 0)):
                continue
            scores = evaluate(state.params)
            writer.write({"step": done, "stage": span.name, **scores})
            logged.add(done)
            if done == span.end and scores:
                writer.message(f"stage {span.name} ends: " + ", ".join(
                    f"{k}={v:.4g}" for k, v in scores.items()))
            paused = True
        if done % config.checkpoint.every_steps == 0 or done == span.end:
            end_data = save(done)
            paused = True
        if config.export_hf_every and done % config.export_hf_every == 0:
            from jaxllm.convert import export_run_checkpoint  # safetensors; only when asked

            path = export_run_checkpoint(run.workdir, done, config, span.name, state.params,
                                         run.tokenizer)
            writer.message(f"step {done}: exported {path}")
            paused = True
        if run.preemption.agreed(done, config.log_every):
            if done % config.checkpoint.every_steps and done != span.end:
                save(done)
            run.ckpt.wait()
            writer.message(f"preempted: saved step {done}; run the same command to resume")
            raise Preempted(done)
        if paused:  # tokens/s counts training only
            jax.block_until_ready(state.step)
            clock, clock_step = time.perf_counter(), done
    profiler.close()
    data.close()  # with data.workers > 0 it owns worker processes
    return state, end_data


def _restore_after_bad_steps(run: Run, span, state: TrainState, bad_steps: list[int],
                             bad_batches: set[int], saved: dict[int, int], batch_sh,
                             positions: dict[str, Position]):
    """Back to the newest checkpoint of this stage; returns (state, data, the batches to
    drop numbered from that checkpoint, its step)."""
    run.ckpt.wait()  # an asynchronous save may still be writing the newest checkpoint
    restored = run.ckpt.restore_latest(abstract_like(state, run.state_sh))
    if restored is None or restored[1].get("stage") != span.name:
        raise RuntimeError(
            f"steps {bad_steps[0]}..{bad_steps[-1]} were all skipped (non-finite or spiking "
            f"loss) and stage {span.name!r} has no checkpoint to go back to; lower the learning "
            "rate or checkpoint more often (config.checkpoint.every_steps)")
    state, meta = restored
    start = int(state.step)
    data = make_iterator(run.config, span.name, run.tokenizer, split="train", sharding=batch_sh,
                         positions=positions)
    data.set_state(meta["data_state"])
    # A checkpoint older than where `data` started (the newer ones were unreadable): which of
    # its batches were bad is unknown; replaying meets them again and restores from here.
    offset = saved.get(start)
    drop = set() if offset is None else {b - offset for b in bad_batches if b >= offset}
    run.writer.message(f"steps {bad_steps[0]}..{bad_steps[-1]} were skipped in a row: restored "
                       f"step {start} and will drop the {len(drop)} batches that caused them")
    return state, data, drop, start


def to_global(batch: dict[str, np.ndarray], batch_sh, order: np.ndarray | None = None
              ) -> dict[str, jax.Array]:
    """This process's rows of the batch (`make_iterator(..., sharding=batch_sh)` reads exactly
    the rows its devices hold) → global arrays over the mesh's batch axes; with `order`
    (blocks.row_order), each row's tokens in that order. Every token's loss is its
    own, so the order changes no loss or gradient, only which device holds which token."""
    if order is not None:
        batch = {k: v[:, order] for k, v in batch.items()}
    return {k: jax.make_array_from_process_local_data(batch_sh, v) for k, v in batch.items()}
