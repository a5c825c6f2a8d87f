"""Runs a config's stages in order: sharded init or resume, then train, eval, log, save.

Each stage has its own steps, seq_len, batch size, rope base, mixture and schedule; the
parameters, Adam moments and each data source's reading position carry across. Global step
numbers run on across stages, so stage k covers steps [sum of earlier stages' steps, + its
own).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import ml_collections as mc
import optax
from flax import linen as nn

from jaxllm.checkpoint.run_dir import (
    SHAPE_KEYS,
    check_same_shapes,
    checkpoint_steps,
    load_model_config,
    load_params,
    read_run_config,
)
from jaxllm.checkpoint.state import Checkpointer, abstract_like
from jaxllm.config.schema import ConfigError, stage_names
from jaxllm.config.validate import validate
from jaxllm.data.iterator import positions_after
from jaxllm.data.mixture import Position
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.model import Transformer, abstract_params, frozen
from jaxllm.parallel import sharding
from jaxllm.train.loop import Evaluator, PreemptionFlag, Run, run_stage, to_global
from jaxllm.train.metrics import MetricsWriter, Mfu, logged_steps, peak_flops
from jaxllm.train.optim import make_optimizer
from jaxllm.train.profiling import use_compilation_cache
from jaxllm.train.step import TrainState

__all__ = ["abstract_train_state", "init_train_state", "run", "stage_model_config", "stage_spans",
           "to_global"]


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


def abstract_train_state(config: mc.ConfigDict, mesh) -> tuple[TrainState, TrainState, Callable]:
    """(abstract state, its shardings on `mesh`, init): `eval_shape` and the sharding rules
    only, nothing allocated; `init(rng)` builds the state (jit it with the shardings)."""
    tx = make_optimizer(config.optimizer)
    model = Transformer(frozen(config.model))
    param_sh = sharding.param_shardings(abstract_params(config.model), mesh)

    def init(rng: jax.Array) -> TrainState:
        ones = jnp.ones((1, 1), jnp.int32)
        params = nn.unbox(model.init(rng, ones, ones * 0, ones)["params"])
        return TrainState.create(params, tx.init(params))

    abstract = jax.eval_shape(init, jax.ShapeDtypeStruct((), jax.random.key(0).dtype))
    opt_sh = optax.tree_map_params(
        tx, lambda _, s: s, abstract.opt_state, param_sh,
        transform_non_params=lambda _: sharding.replicated(mesh))
    rep = sharding.replicated(mesh)
    state_sh = TrainState(step=rep, params=param_sh, opt_state=opt_sh, loss_ema=rep,
                          bad_in_row=rep)
    return abstract, state_sh, init


def init_train_state(config: mc.ConfigDict, mesh) -> tuple[TrainState, TrainState]:
    """Sharded init: `eval_shape` → shardings → jitted init with out_shardings.

    Returns (state, state_shardings); no unsharded copy of the state is ever built.
    """
    _, state_sh, init = abstract_train_state(config, mesh)
    state = jax.jit(init, out_shardings=state_sh)(jax.random.key(config.seed))
    return state, state_sh


def check_resumable(workdir: str, config: mc.ConfigDict) -> None:
    """Writes config.json. A resumed run may not change the model's shape; other changes
    (more steps, log frequency, remat, ...) are accepted with a warning that lists them. A
    run that stopped before its first checkpoint has nothing to resume: any shape goes."""
    path = os.path.join(workdir, "config.json")
    if os.path.exists(path):
        old = read_run_config(workdir)
        new = json.loads(config.to_json_best_effort())
        for key in SHAPE_KEYS if checkpoint_steps(workdir) else ():
            if key in old["model"] and old["model"][key] != new["model"][key]:
                raise ConfigError(
                    f"config.model.{key}: the run in {workdir} was started with "
                    f"{old['model'][key]!r}, this command asks for {new['model'][key]!r}; a "
                    "resumed run cannot change the model's shape. Use a new --workdir.")
        changed = [f"config.{k}: {a!r} -> {b!r}" for k, a, b in _differences(old, new)]
        if changed:
            logging.warning("this run changes settings of %s: %s", workdir, "; ".join(changed))
    if jax.process_index() == 0:
        with open(path, "w") as f:
            f.write(config.to_json_best_effort(indent=2))


def _differences(old, new, prefix=""):
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new)):
            yield from _differences(old.get(key), new.get(key), f"{prefix}{key}.")
    elif old != new:
        yield prefix.rstrip("."), old, new


def initial_params(config: mc.ConfigDict, state: TrainState, state_sh: TrainState) -> TrainState:
    """`config.init.checkpoint`, `config.init.hf` or `config.init.upcycle_from` (a dense model
    upcycled into this MoE, jaxllm/convert/upcycle.py) weights, read onto the params' shardings."""
    if config.init.checkpoint:
        check_same_shapes(config.model, load_model_config(config.init.checkpoint),
                          config.init.checkpoint)
        params = load_params(config.init.checkpoint, abstract_like(state.params, state_sh.params))
    elif config.init.hf:
        from jaxllm.convert.hf import read_hf_config, read_hf_params  # safetensors: only here

        hf_model, _ = read_hf_config(config.init.hf)
        check_same_shapes(config.model, hf_model, config.init.hf)
        # Each device reads only its blocks: no full copy on one device first.
        params = read_hf_params(config.init.hf, hf_model, state_sh.params,
                                dtype=config.model.param_dtype)
    elif config.init.upcycle_from:
        from jaxllm.convert.upcycle import upcycled_params

        params = upcycled_params(config, state_sh.params)
    else:
        return state
    return state.replace(params=params)


EVALUATOR_KEYS = ("eval_long_every", "eval_tasks")  # config keys that ask for an evaluator


def run(config: mc.ConfigDict, workdir: str, evaluators: Sequence[Evaluator] = ()
        ) -> TrainState:
    """The whole pipeline; resumes from the newest checkpoint in `workdir/checkpoints`.
    `evaluators` run in the loop (`jaxllm.main.train` hands it those the config asks for).

    Raises `jaxllm.train.loop.Preempted` after saving when SIGTERM / SIGINT arrives.
    """
    validate(config)
    handled = {e.config_key for e in evaluators}
    for key in EVALUATOR_KEYS:
        if config[key] and key not in handled:
            raise ConfigError(f"config.{key} is set, but no evaluator for it was handed to "
                              "jaxllm.train.stages.run: call jaxllm.main.train(config, "
                              "workdir), which builds them, or pass "
                              "evaluators=jaxllm.eval.loop_evaluators(config)")
    for key, source in [(f"init.{k}", config.init[k]) for k in ("checkpoint", "hf", "upcycle_from")
                        ] + [("distill.teacher", config.distill.teacher),
                             ("dpo.reference", config.dpo.reference)]:
        if source and os.path.abspath(source) == os.path.abspath(workdir):
            raise ConfigError(f"config.{key} is the --workdir ({workdir}): the run would "
                              "write into the weights it reads; use a new --workdir")
    if os.path.exists(workdir) and not os.path.isdir(workdir):
        raise ConfigError(f"--workdir={workdir} is a file; give a directory (new or a run's)")
    try:
        os.makedirs(workdir, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--workdir={workdir}: cannot create it ({e.strerror})") from None
    use_compilation_cache(config)
    check_resumable(workdir, config)
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    if tokenizer.vocab_size > config.model.vocab_size:
        raise ConfigError(f"config.model.vocab_size: {config.model.vocab_size} rows cannot hold "
                          f"the tokenizer's {tokenizer.vocab_size} ids; set tokenizer.max_rank")
    mesh = sharding.make_mesh(config)
    spans = stage_spans(config)
    teacher = reference = None  # loaded (and their tokenizers checked) before anything compiles
    done = max(checkpoint_steps(workdir), default=0)
    ahead = {config.stages[s.name].objective for s in spans if s.steps and s.end > done}
    if "distill" in ahead:
        from jaxllm.train.teacher import load_teacher

        with sharding.use_mesh(mesh):
            teacher = load_teacher(config, mesh, tokenizer)
    if "dpo" in ahead and config.dpo.reference:
        from jaxllm.train.teacher import load_frozen

        with sharding.use_mesh(mesh):
            reference = load_frozen(config.dpo.reference, "config.dpo.reference", mesh,
                                    tokenizer)
    with sharding.use_mesh(mesh), PreemptionFlag() as flag:
        state, state_sh = init_train_state(config, mesh)
        ckpt = Checkpointer(workdir, config, keep_steps=[s.end for s in spans if s.steps])
        restored = ckpt.restore_latest(abstract_like(state, state_sh))
        state, meta = restored if restored is not None else (
            initial_params(config, state, state_sh), {})
        writer = MetricsWriter(workdir, spans[-1].end, int(state.step))
        peak, peak_kind, peak_line = peak_flops(config.model.dtype)
        writer.message(peak_line)
        if meta:
            writer.message(f"resumed from step {int(state.step)} ({meta['stage']})")
        shared = Run(config, workdir, mesh, state_sh, tokenizer, ckpt, writer,
                     Mfu(peak, peak_kind), flag, list(evaluators),
                     logged_steps(workdir, [e.prefix for e in evaluators]), teacher)
        reset = jax.jit(make_optimizer(config.optimizer).init, out_shardings=state_sh.opt_state)
        # Where the restored checkpoint's stage began each source, and (stage, data state)
        # of the last stage trained or restored at its end: the next stage goes on from there.
        positions = {name: Position.from_json(p) for name, p in meta.get("sources", {}).items()}
        ended = None
        try:
            for span in spans:
                if not span.steps:
                    continue
                if int(state.step) >= span.end:
                    if meta.get("stage") == span.name:
                        ended = span.name, meta["data_state"]
                    continue
                if ended is not None:
                    ended_stage, ended_data = ended
                    positions = positions_after(config, ended_stage, positions, ended_data)
                if int(state.step) == span.start and config.stages[span.name].reset_optimizer:
                    state = state.replace(opt_state=reset(state.params))
                if config.stages[span.name].objective == "dpo":
                    from jaxllm.train.teacher import load_reference

                    shared.reference = load_reference(
                        config, workdir, span.name, stage_model_config(config, span.name),
                        state.params, int(state.step) == span.start,
                        abstract_like(state.params, state_sh.params), reference)
                resume_data = meta.get("data_state") if meta.get("stage") == span.name else None
                state, end_data = run_stage(shared, span, state, resume_data, positions,
                                            stage_model_config(config, span.name))
                ended = span.name, end_data
        finally:
            ckpt.close()
            writer.close()
    return state
