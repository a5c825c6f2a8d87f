"""Smoke configs and train states in one process: tiny.py:smoke at 8 rows a step (the 8 test
devices under data parallelism) or with synchronous saves, pretrain steps on a mesh of given
devices, a train state on one device."""

import jax

from jaxllm.data import make_iterator
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.parallel import sharding
from jaxllm.train.optim import make_optimizer, make_schedule
from jaxllm.train.stages import init_train_state, stage_model_config, to_global
from jaxllm.train.step import make_train_step
from tests.helpers.runs import smoke_config


def tiny_8_rows(*overrides):
    return smoke_config(*overrides)


def train(config, devices, steps=5, hlo=False):
    """The metrics of `steps` pretrain steps of `config` on `devices` (each a dict of floats),
    the compiled step's HLO text when `hlo`, and the final params."""
    mesh = sharding.make_mesh(config, devices)
    stage = config.stages.pretrain
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    with sharding.use_mesh(mesh):
        state, state_sh = init_train_state(config, mesh)
        step = jax.jit(make_train_step(stage_model_config(config, "pretrain"),
                                       make_optimizer(config.optimizer),
                                       make_schedule(stage.lr, stage.steps), 0, 1, 0.0),
                       donate_argnums=0, out_shardings=(state_sh, None))
        data = make_iterator(config, "pretrain", tokenizer)
        batches = [to_global(next(data), sharding.batch_sharding(mesh)) for _ in range(steps)]
        text = step.lower(state, batches[0]).compile().as_text() if hlo else None
        records = []
        for batch in batches:
            state, metrics = step(state, batch)
            records.append({k: float(v) for k, v in metrics.items()})
    return records, text, state.params


def tiny_sync_saves(*overrides):
    return smoke_config("checkpoint.async=False", *overrides, rows=None)


def one_device_state(config):
    mesh = sharding.make_mesh(config, jax.devices()[:1])
    with sharding.use_mesh(mesh):
        return (*init_train_state(config, mesh), mesh)
