"""Checkpoints: bad-step guard, fallback past an unreadable checkpoint, resharding on restore,
stage checkpoints kept, averaging."""

import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np

from jaxllm.checkpoint.average import average_checkpoints
from jaxllm.checkpoint.run_dir import load_params, save_params
from jaxllm.checkpoint.state import Checkpointer, abstract_like
from jaxllm.model import frozen
from jaxllm.parallel import sharding
from jaxllm.train.optim import make_optimizer, make_schedule
from jaxllm.train.stages import check_resumable, init_train_state
from jaxllm.train.step import make_train_step
from tests.helpers.train import one_device_state, tiny_sync_saves


def batch(B=2, T=8, loss_mask=1.0):
    tokens = jax.random.randint(jax.random.key(0), (B, T + 1), 0, 1000)
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
            "positions": jnp.broadcast_to(jnp.arange(T), (B, T)),
            "segment_ids": jnp.ones((B, T), jnp.int32),
            "loss_mask": jnp.full((B, T), loss_mask, jnp.float32)}


def make_step(config, spike_factor=0.0):
    return jax.jit(make_train_step(frozen(config.model), make_optimizer(config.optimizer),
                                   make_schedule(config.stages.pretrain.lr, 10), 0, 1, 0.0,
                                   spike_factor))


def test_a_nan_batch_is_skipped():
    config = tiny_sync_saves()
    state, _, _ = one_device_state(config)
    step = make_step(config)
    before = jax.device_get(state.params)
    state, metrics = step(state, batch(loss_mask=np.nan))
    assert int(metrics["skipped"]) == 1 and int(state.bad_in_row) == 1
    assert int(state.step) == 1  # the batch is consumed; the schedule moves on
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.params), before)
    state, metrics = step(state, batch())
    assert int(metrics["skipped"]) == 0 and int(state.bad_in_row) == 0
    assert not np.array_equal(state.params["final_norm"]["scale"], before["final_norm"]["scale"])


def test_a_loss_spike_is_skipped():
    config = tiny_sync_saves()
    state, _, _ = one_device_state(config)
    # Mid-stage (the average starts afresh at a stage's first step); real losses here are ~7.
    state = state.replace(step=jnp.int32(1), loss_ema=jnp.float32(1.0))
    _, metrics = make_step(config, spike_factor=3.0)(state, batch())
    assert int(metrics["skipped"]) == 1
    _, metrics = make_step(config, spike_factor=0.0)(state, batch())
    assert int(metrics["skipped"]) == 0
    _, metrics = make_step(config, spike_factor=3.0)(state.replace(step=jnp.int32(0)), batch())
    assert int(metrics["skipped"]) == 0  # the stage's first step: no average yet


def test_an_unreadable_newest_checkpoint_is_skipped(tmp_path):
    config = tiny_sync_saves()
    state, state_sh, _ = one_device_state(config)
    ckpt = Checkpointer(str(tmp_path), config)
    ckpt.save(1, state, {"stage": "pretrain"})
    ckpt.save(2, state.replace(step=jnp.int32(2)), {"stage": "pretrain"})
    ckpt.wait()
    state_dir = os.path.join(str(tmp_path), "checkpoints", "2", "state")
    for name in os.listdir(state_dir):  # truncate: the array data disappears
        path = os.path.join(state_dir, name)
        shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)
    restored, meta = Checkpointer(str(tmp_path), config).restore_latest(
        abstract_like(state, state_sh))
    assert int(restored.step) == 0 and meta["stage"] == "pretrain"


def test_restore_onto_another_mesh(tmp_path):
    config = tiny_sync_saves("mesh.data=1", "mesh.fsdp=8", "stages.pretrain.batch_size=8",
                  "stages.long_context.batch_size=8", "stages.anneal.batch_size=8")
    mesh8 = sharding.make_mesh(config)
    with sharding.use_mesh(mesh8):
        state8, sh8 = init_train_state(config, mesh8)
    Checkpointer(str(tmp_path), config).save(3, state8, {"stage": "pretrain"})
    Checkpointer(str(tmp_path), config).wait()
    one = tiny_sync_saves()
    state1, sh1, _ = one_device_state(one)
    restored1, _ = Checkpointer(str(tmp_path), one).restore(3, abstract_like(state1, sh1))
    q8, q1 = state8.params["layers"]["attn"]["q_proj"]["kernel"], restored1.params["layers"][
        "attn"]["q_proj"]["kernel"]
    assert len(q8.sharding.device_set) == 8 and len(q1.sharding.device_set) == 1
    np.testing.assert_array_equal(np.asarray(q1), np.asarray(q8))
    Checkpointer(str(tmp_path), one).save(4, restored1, {"stage": "pretrain"})  # and back
    back, _ = Checkpointer(str(tmp_path), config).restore(4, abstract_like(state8, sh8))
    assert back.params["layers"]["attn"]["q_proj"]["kernel"].sharding == q8.sharding
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(back.params),
                 jax.device_get(state8.params))


def test_keeps_the_newest_and_the_stage_ends(tmp_path):
    config = tiny_sync_saves("checkpoint.keep=1")
    state, _, _ = one_device_state(config)
    ckpt = Checkpointer(str(tmp_path), config, keep_steps=[2])
    for step in (1, 2, 3, 4):
        ckpt.save(step, state, {"stage": "pretrain"})
    ckpt.wait()
    assert ckpt.steps() == [2, 4]


def test_average_and_params_checkpoint(tmp_path):
    config = tiny_sync_saves()
    state, _, _ = one_device_state(config)
    workdir = str(tmp_path / "run")
    os.makedirs(workdir)
    check_resumable(workdir, config)  # writes config.json, which averaging reads
    ckpt = Checkpointer(workdir, config)
    shifted = state.replace(params=jax.tree.map(lambda p: p + 1.0, state.params))
    ckpt.save(1, state, {"stage": "pretrain"})
    ckpt.save(2, shifted, {"stage": "pretrain"})
    ckpt.close()
    assert average_checkpoints(workdir, 2, str(tmp_path / "avg")) == [1, 2]
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.params)
    averaged = load_params(str(tmp_path / "avg"), abstract)
    jax.tree.map(lambda a, p: np.testing.assert_allclose(a, np.asarray(p) + 0.5, rtol=1e-6),
                 averaged, jax.device_get(state.params))
    save_params(str(tmp_path / "again"), config.model, averaged)
    assert os.path.exists(tmp_path / "again" / "model.json")


def test_optimizer_state_is_unchanged_by_a_skipped_step():
    config = tiny_sync_saves()
    state, _, _ = one_device_state(config)
    step = make_step(config)
    state, _ = step(state, batch())
    opt_before = jax.device_get(state.opt_state)
    state, _ = step(state, batch(loss_mask=np.nan))
    jax.tree.map(np.testing.assert_array_equal, jax.device_get(state.opt_state), opt_before)
