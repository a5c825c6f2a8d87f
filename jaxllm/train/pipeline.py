"""Runs a config's stages in order: sharded init or resume, then train, eval, log, save.

Each stage has its own steps, seq_len, batch size, rope base, mixture and schedule; the
parameters and Adam moments carry across. Global step numbers run on across stages, so
stage k covers steps [sum of earlier stages' steps, + its own).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np
import optax
from flax import linen as nn

from jaxllm import sharding
from jaxllm.checkpoint import Checkpointer, abstract_like
from jaxllm.config import ConfigError, stage_names, validate
from jaxllm.data import eval_batches, make_iterator
from jaxllm.metrics import MetricsWriter, flops_per_token, measure_peak_flops
from jaxllm.model import Transformer, abstract_params, frozen
from jaxllm.optim import make_optimizer, make_schedule
from jaxllm.tokenizer import load_tokenizer
from jaxllm.train.step import TrainState, make_eval_step, make_train_step


@dataclass(frozen=True)
class StageSpan:
    name: str
    start: int  # first global step of the stage
    steps: int

    @property
    def end(self) -> int:
        return self.start + self.steps


def stage_spans(config: mc.ConfigDict) -> list[StageSpan]:
    spans, start = [], 0
    for name in stage_names(config):
        spans.append(StageSpan(name, start, int(config.stages[name].steps)))
        start += spans[-1].steps
    return spans


def stage_model_config(config: mc.ConfigDict, stage_name: str) -> mc.FrozenConfigDict:
    model = mc.ConfigDict(config.model.to_dict())
    model.rope_theta = float(config.stages[stage_name].rope_theta)
    return frozen(model)


def init_train_state(config: mc.ConfigDict, mesh) -> tuple[TrainState, TrainState]:
    """Sharded init: `eval_shape` → shardings → jitted init with out_shardings.

    Returns (state, state_shardings); no unsharded copy of the state is ever built.
    """
    tx = make_optimizer(config.optimizer)
    model = Transformer(frozen(config.model))
    param_sh = sharding.param_shardings(abstract_params(config.model), mesh)

    def init(rng: jax.Array) -> TrainState:
        ones = jnp.ones((1, 1), jnp.int32)
        params = nn.unbox(model.init(rng, ones, ones * 0, ones)["params"])
        return TrainState(step=jnp.int32(0), params=params, opt_state=tx.init(params))

    abstract = jax.eval_shape(init, jax.random.key(config.seed))
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, param_sh,
        transform_non_params=lambda _: sharding.replicated(mesh))
    state_sh = TrainState(step=sharding.replicated(mesh), params=param_sh, opt_state=opt_sh)
    state = jax.jit(init, out_shardings=state_sh)(jax.random.key(config.seed))
    return state, state_sh


def check_resumable(workdir: str, config: mc.ConfigDict) -> None:
    """Writes config.json; a resumed run may not change the model's shape."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        with open(path) as f:
            old_model = json.load(f).get("model", {})
        for key, new in config.model.to_dict().items():
            if key in old_model and old_model[key] != new:
                raise ConfigError(
                    f"config.model.{key}: the run in {workdir} was started with {old_model[key]!r}"
                    f", this command asks for {new!r}; a resumed run cannot change the model. "
                    "Use a new --workdir.")
    if jax.process_index() == 0:
        with open(path, "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def to_global(batch: dict[str, np.ndarray], batch_sh) -> dict[str, jax.Array]:
    """Host batch → global array. Every process holds the whole global batch (the data issue
    makes each read only its share); passing the global shape makes each device take its rows."""
    return {k: jax.make_array_from_process_local_data(batch_sh, v, v.shape)
            for k, v in batch.items()}


def run(config: mc.ConfigDict, workdir: str) -> TrainState:
    """The whole pipeline; resumes from the newest checkpoint in `workdir/checkpoints`."""
    validate(config)
    os.makedirs(workdir, exist_ok=True)
    check_resumable(workdir, config)
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"config.model.vocab_size: {config.model.vocab_size} rows cannot hold "
                          f"the tokenizer's {tokenizer.vocab_size} ids; set tokenizer.max_rank")
    mesh = sharding.make_mesh(config)
    batch_ways = mesh.shape["data"] * mesh.shape["fsdp"]
    for name in stage_names(config):
        if config.stages[name].batch_size % (batch_ways * config.optimizer.grad_accum):
            raise ConfigError(
                f"config.stages.{name}.batch_size: {config.stages[name].batch_size} rows do not "
                f"split over mesh data×fsdp={batch_ways} times optimizer.grad_accum="
                f"{config.optimizer.grad_accum}")
    spans = stage_spans(config)
    total = spans[-1].end
    with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.RULES):
        state, state_sh = init_train_state(config, mesh)
        ckpt = Checkpointer(workdir, config)
        meta = {}
        if (latest := ckpt.latest_step()) is not None:
            state, meta = ckpt.restore(latest, abstract_like(state, state_sh))
        writer = MetricsWriter(workdir, total, int(state.step))
        if meta:
            writer.message(f"resumed from step {int(state.step)} ({meta['stage']})")
        peak = measure_peak_flops(config.model.dtype)
        try:
            for span in spans:
                if span.steps and int(state.step) < span.end:
                    resume_data = meta.get("data_state") if meta.get("stage") == span.name else None
                    state = _run_stage(config, span, state, state_sh, mesh, tokenizer, ckpt,
                                       writer, peak, resume_data)
        finally:
            ckpt.close()
            writer.close()
    return state


def _run_stage(config, span: StageSpan, state, state_sh, mesh, tokenizer, ckpt, writer, peak,
               resume_data) -> TrainState:
    stage = config.stages[span.name]
    model_cfg = stage_model_config(config, span.name)
    tx = make_optimizer(config.optimizer)
    step_fn = make_train_step(model_cfg, tx, make_schedule(stage.lr, span.steps), span.start,
                              config.optimizer.grad_accum, config.loss.z_loss)
    batch_sh = sharding.batch_sharding(mesh)
    train_step = jax.jit(step_fn, donate_argnums=0, out_shardings=(state_sh, None))
    eval_step = jax.jit(make_eval_step(model_cfg))
    data = make_iterator(config, span.name, tokenizer, split="train")
    if resume_data is not None:
        data.set_state(resume_data)
    held_out = [to_global(b, batch_sh) for b in eval_batches(config, span.name, tokenizer)]
    tokens_per_step = stage.batch_size * stage.seq_len
    flops = flops_per_token(config.model, stage.seq_len)
    writer.message(f"stage {span.name}: steps {span.start}..{span.end - 1}, seq_len "
                   f"{stage.seq_len}, batch {stage.batch_size}, rope_theta {stage.rope_theta:g}")

    first = int(state.step)
    clock, clock_step = time.perf_counter(), first
    for step in range(first, span.end):
        state, metrics = train_step(state, to_global(next(data), batch_sh))
        done = step + 1
        writer.advance()
        if done % config.log_every == 0 or done in (1, span.end):
            metrics = jax.device_get(metrics)
            now = time.perf_counter()
            rate = tokens_per_step * (done - clock_step) / (now - clock)
            clock, clock_step = now, done
            writer.write({"step": done, "stage": span.name, "loss": float(metrics["loss"]),
                          "lr": float(metrics["lr"]), "grad_norm": float(metrics["grad_norm"]),
                          "tokens_per_sec": rate, "mfu": rate * flops / peak})
        paused = done == first + 1  # the first step of a stage compiles: leave it out
        if done % config.eval_every == 0 or done == span.end:
            sums = [jax.device_get(eval_step(state.params, b)) for b in held_out]
            eval_loss = sum(float(s[0]) for s in sums) / max(sum(float(s[1]) for s in sums), 1)
            writer.write({"step": done, "stage": span.name, "eval_loss": eval_loss})
            paused = True
        if done % config.checkpoint.every_steps == 0 or done == span.end:
            ckpt.save(done, state, {"stage": span.name, "data_state": data.get_state()})
            paused = True
        if paused:  # tokens/s counts training only
            jax.block_until_ready(state.step)
            clock, clock_step = time.perf_counter(), done
    return state
