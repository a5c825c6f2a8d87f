"""Fault tolerance and run starts, end to end through `stages.run` on the smoke model:
bad steps restore the last checkpoint and drop their batches; `init.checkpoint` / `init.hf`
start from given weights; `stages.NAME.reset_optimizer` zeroes the Adam moments.

The runs are in-process (8 fake devices, so every stage runs 8 rows a step) with a wrapper
around the data iterator that numbers each stage's batches from 0, so a test can poison
chosen batches and see which ones were trained on."""

import math
import os

import jax
import numpy as np
import optax
import pytest

from jaxllm.checkpoint.run_dir import save_params
from jaxllm.checkpoint.state import Checkpointer, abstract_like
from jaxllm.config.schema import ConfigError
from jaxllm.convert import save_hf
from jaxllm.data import make_iterator
from jaxllm.data.tokenizer import load_tokenizer
from jaxllm.parallel import sharding
from jaxllm.train import loop, stages
from jaxllm.train.step import make_eval_step
from tests.helpers.runs import pretrain_smoke, train_records

RUNAWAY = 40  # no run here trains on this many batches: more is a restore loop


class Numbered:
    """A stage's batches numbered from its first (the number is part of the iterator's
    checkpointed state). Numbers in `absent` are left out, as if the data never had them;
    those in `bad` get a NaN loss mask, which makes their loss non-finite."""

    def __init__(self, inner, bad=(), absent=()):
        self.inner, self.bad, self.absent, self.number = inner, set(bad), set(absent), 0

    def __next__(self):
        while True:
            batch, number = dict(next(self.inner)), self.number
            self.number += 1
            if number not in self.absent:
                break
        if number in self.bad:
            batch["loss_mask"] = np.full_like(batch["loss_mask"], np.nan)
        batch["number"] = number  # taken out again before the train step (see run_numbered)
        return batch

    def get_state(self):  # the inner state's keys, as the pipeline reads them, plus ours
        return {**self.inner.get_state(), "number": self.number}

    def set_state(self, state):
        self.inner.set_state(state)
        self.number = state["number"]

    def stats(self):
        return self.inner.stats()

    def close(self):
        self.inner.close()


def run_numbered(monkeypatch, config, workdir, bad=None, absent=None):
    """stages.run with numbered batches; `bad` / `absent`: stage name → batch numbers.
    Returns (final state on the host, numbers of the batches trained on, in order)."""
    bad, absent, trained = bad or {}, absent or {}, []
    real_iterator, real_to_global = loop.make_iterator, loop.to_global

    def numbered_iterator(config, stage_name, *args, **kwargs):
        inner = real_iterator(config, stage_name, *args, **kwargs)
        return Numbered(inner, bad.get(stage_name, ()), absent.get(stage_name, ()))

    def to_global(batch, batch_sh, order=None):  # called on exactly the batches it trains on
        if "number" in batch:
            batch = dict(batch)
            trained.append(batch.pop("number"))
            assert len(trained) < RUNAWAY, f"a restore loop? trained on {trained}"
        return real_to_global(batch, batch_sh, order)

    monkeypatch.setattr(loop, "make_iterator", numbered_iterator)
    monkeypatch.setattr(loop, "to_global", to_global)
    state = stages.run(config, workdir)
    return jax.device_get(state), trained


# ----------------------------------------------------------------------------- bad steps

# pretrain: 12 steps, a checkpoint every 4, restore after 2 skipped steps in a row. The skip
# flag is read one step late (so the loop never waits on the device): the step after the bad
# ones is trained too, before the restore throws it away.
BAD_RUN = ["stages.pretrain.steps=12", "checkpoint.every_steps=4", "bad_steps.max_in_row=2"]


@pytest.mark.parametrize("bad, trained_expected, restores, skipped_logged", [
    # Batches 5, 6 make steps 5, 6 skip; back to step 4, from where batches 4, 7, 8, ...
    # train steps 4, 5, 6, ...
    ((5, 6), [*range(8), 4, *range(7, 14)], [("5..6", 4, 2)], [6, 7]),
    # Four bad batches: the first restore drops 5, 6; replaying meets 7, 8 (now at steps
    # 5, 6), and the second restore drops all four.
    ((5, 6, 7, 8), [*range(8), 4, 7, 8, 9, 4, *range(9, 16)],
     [("5..6", 4, 2), ("5..6", 4, 4)], [6, 7, 6, 7]),
    # Bad again after the checkpoint at step 8, which the replay saved after dropping 5, 6.
    ((5, 6, 10, 11), [*range(8), 4, *range(7, 13), *range(12, 16)],
     [("5..6", 4, 2), ("8..9", 8, 2)], [6, 7, 9, 10]),
    # The last two steps of the stage: the last one's flag is read at once, and the restore
    # comes before the stage's final checkpoint. (The restoring step is never logged.)
    ((10, 11), [*range(12), 8, 9, 12, 13], [("10..11", 8, 2)], [11]),
], ids=["max_in_row", "longer", "twice", "at_the_end"])
def test_bad_steps_restore_and_drop_their_batches(monkeypatch, tmp_path, capsys, bad,
                                                  trained_expected, restores, skipped_logged):
    config = pretrain_smoke(*BAD_RUN)
    state, trained = run_numbered(monkeypatch, config, str(tmp_path / "bad"),
                                  bad={"pretrain": bad})
    out = capsys.readouterr().out
    assert trained == trained_expected
    assert [line for line in out.splitlines() if "were skipped in a row" in line] == [
        f"steps {steps} were skipped in a row: restored step {step} and will drop the {n} "
        "batches that caused them" for steps, step, n in restores]
    assert out.count("dropping a batch that caused bad steps") == sum(n for *_, n in restores)
    records = train_records(str(tmp_path / "bad"))  # "step": steps done, so bad step 5 is 6
    assert [r["step"] for r in records if r["skipped"]] == skipped_logged
    assert all(r["tokens_per_sec"] > 0 for r in records)  # the clock restarts at a restore
    assert int(state.step) == 12
    assert all(np.isfinite(p).all() for p in jax.tree.leaves(state.params))

    # The same as a run whose data never had those batches: every step's loss, and the
    # final state, bit for bit.
    clean, clean_trained = run_numbered(monkeypatch, config, str(tmp_path / "clean"),
                                        absent={"pretrain": bad})
    assert clean_trained == [n for n in range(12 + len(bad)) if n not in bad]
    last_restore = restores[-1][1]
    assert trained[last_restore - 12:] == clean_trained[last_restore:]
    last = {r["step"]: r["loss"] for r in records}  # the replayed steps' records come last
    assert last == {r["step"]: r["loss"] for r in train_records(str(tmp_path / "clean"))}
    jax.tree.map(np.testing.assert_array_equal, state.params, clean.params)
    jax.tree.map(np.testing.assert_array_equal, state.opt_state, clean.opt_state)


# pretrain: steps 0..5, checkpoints at 5 and 6 (its end); long_context: steps 6..8.
@pytest.mark.parametrize("stage, bad, steps", [
    ("pretrain", (1, 2), "steps 1..2"),  # before the first checkpoint
    ("long_context", (0, 1), "steps 6..7"),  # the newest checkpoint ends pretrain
], ids=["no_checkpoint", "previous_stage"])
def test_bad_steps_without_a_checkpoint_of_the_stage_stop_the_run(monkeypatch, tmp_path,
                                                                  stage, bad, steps):
    config = pretrain_smoke("checkpoint.every_steps=5", "bad_steps.max_in_row=2",
                   "stages.long_context.steps=3", "stages.long_context.batch_size=8")
    with pytest.raises(RuntimeError, match=rf"{steps} were all skipped .*stage '{stage}' has "
                       r"no checkpoint to go back to; lower the learning rate"):
        run_numbered(monkeypatch, config, str(tmp_path), bad={stage: bad})


# ----------------------------------------------------------------------------- init weights

def smoke_weights(config):
    """Weights of the smoke model's shape unlike any init: another seed's, tripled (so their
    loss is far from the ~ln(V) of a fresh init), on the run's mesh."""
    other = config.copy_and_resolve_references()
    other.seed += 1
    mesh = sharding.make_mesh(other)
    with sharding.use_mesh(mesh):
        state, _ = stages.init_train_state(other, mesh)
    return jax.tree.map(lambda p: p * 3, state.params)


def first_batch_loss(config, params):
    """The loss of `params` on the first pretrain batch, outside the stages."""
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    data = make_iterator(config, "pretrain", tokenizer)
    batch = next(data)
    data.close()
    model = stages.stage_model_config(config, "pretrain")
    nll, count = jax.jit(make_eval_step(model))(params, batch)
    return float(nll) / float(count)


def test_init_checkpoint_and_init_hf_start_from_those_weights(tmp_path):
    config = pretrain_smoke("stages.pretrain.steps=2")
    weights = smoke_weights(config)
    save_params(str(tmp_path / "params"), config.model, weights)
    save_hf(config.model, weights, str(tmp_path / "hf"))
    expected = first_batch_loss(config, weights)
    assert abs(expected - math.log(config.model.vocab_size)) > 0.5  # unlike a fresh init's
    final = {}
    for key in ("checkpoint", "hf"):
        run_config = config.copy_and_resolve_references()
        run_config.init[key] = str(tmp_path / ("params" if key == "checkpoint" else "hf"))
        final[key] = jax.device_get(stages.run(run_config, str(tmp_path / f"run_{key}")))
        first = train_records(str(tmp_path / f"run_{key}"))[0]
        assert first["step"] == 1 and first["loss"] == pytest.approx(expected, rel=1e-5), key
    # Same weights, same data: the same run, whichever format the weights came in.
    jax.tree.map(np.testing.assert_array_equal, final["checkpoint"].params, final["hf"].params)


@pytest.mark.parametrize("key", ["checkpoint", "hf"])
def test_init_weights_of_another_shape_are_refused(tmp_path, key):
    other = pretrain_smoke("model.intermediate_size=96")
    path = str(tmp_path / "weights")
    if key == "checkpoint":
        save_params(path, other.model, smoke_weights(other))
    else:
        save_hf(other.model, smoke_weights(other), path)
    config = pretrain_smoke(f"init.{key}={path}")
    with pytest.raises(ConfigError, match=r"config\.model\.intermediate_size=128, but .*weights "
                       "has 96"):
        stages.run(config, str(tmp_path / "run"))
    with pytest.raises(ConfigError, match=f"config.init.{key} is the --workdir"):
        stages.run(config, path)  # would overwrite the weights' directory
    assert not os.path.exists(os.path.join(path, "checkpoints"))


# ----------------------------------------------------------------------------- reset_optimizer

def adam(opt_state) -> optax.ScaleByAdamState:
    return next(s for s in opt_state if isinstance(s, optax.ScaleByAdamState))


def test_reset_optimizer_starts_a_stage_with_fresh_adam_moments(tmp_path):
    # pretrain: steps 0..2; long_context: step 3. Checkpoints 3 (pretrain's end) and 4.
    saved = {}
    for reset in (False, True):
        config = pretrain_smoke("stages.pretrain.steps=3", "stages.long_context.steps=1",
                       "stages.long_context.batch_size=8",
                       f"stages.long_context.reset_optimizer={reset}")
        workdir = str(tmp_path / f"reset_{reset}")
        stages.run(config, workdir)
        mesh = sharding.make_mesh(config)
        with sharding.use_mesh(mesh):
            abstract = abstract_like(*stages.init_train_state(config, mesh))
        ckpt = Checkpointer(workdir, config)
        saved[reset] = [jax.device_get(ckpt.restore(step, abstract)[0]) for step in (3, 4)]
        ckpt.close()
    (carried3, carried4), (reset3, reset4) = saved[False], saved[True]
    jax.tree.map(np.testing.assert_array_equal, reset3, carried3)  # the same pretrain
    assert int(adam(carried3.opt_state).count) == 3
    assert int(adam(carried4.opt_state).count) == 4
    assert int(adam(reset4.opt_state).count) == 1
    # Both take step 3 from the same params and batch, so with the same gradient g: carried,
    # mu = b1·mu3 + (1 - b1)·g; reset, mu = (1 - b1)·g. The difference is b1·mu3, and b2·nu3
    # for nu: what the pretrain moments add, nothing of them left after a reset.
    for name, beta in (("mu", config.optimizer.b1), ("nu", config.optimizer.b2)):
        moment3 = getattr(adam(carried3.opt_state), name)
        carried, fresh = (getattr(adam(s.opt_state), name) for s in (carried4, reset4))
        for c, f, m in zip(*map(jax.tree.leaves, (carried, fresh, moment3)), strict=True):
            assert np.abs(m).max() > 0
            np.testing.assert_allclose(c - f, beta * m, rtol=1e-4, atol=1e-6 * np.abs(m).max())
