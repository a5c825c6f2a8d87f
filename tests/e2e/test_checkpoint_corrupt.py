"""A checkpoint that cannot be used never stops a run for good: it is moved aside (kept), the
run resumes from the one before it and saves that step afresh, and every step's loss is the
uninterrupted run's bit for bit. End to end through `python -m jaxllm.main`."""

import asyncio
import gc
import glob
import json
import logging
import os
import shutil
import subprocess
import sys

import jax.numpy as jnp
import pytest

from jaxllm.checkpoint.state import Checkpointer, _draining_event_loops, abstract_like
from tests.helpers.runs import ROOT, by_step, run, xla_flags
from tests.helpers.train import one_device_state, tiny_sync_saves

# The run of tests/helpers/runs.py's `run` (test_resume's) without its anneal stage: pretrain
# steps 0..7, long_context 8..9; checkpoints at 3, 6, 8 (pretrain's end), 9 and 10
# (long_context's end), of which keep=2 and the stage ends leave 8, 9 and 10.
TWO_STAGES = ["--config.stages.anneal.steps=0"]


def truncate(step_dir):
    """Every file cut to half its length: a copy that broke off, a disk that lost writes."""
    for root, _, names in os.walk(step_dir):
        for name in names:
            path = os.path.join(root, name)
            os.truncate(path, os.path.getsize(path) // 2)


def lose_array_data(step_dir):
    """The arrays' data files emptied, their metadata intact: TensorStore's error then prints
    the whole spec of the array it failed to read."""
    for path in glob.glob(str(step_dir / "state" / "ocdbt.process_0" / "d" / "*")):
        os.truncate(path, 0)


def stage_end(checkpoints):
    truncate(checkpoints / "10")


def mid_stage(checkpoints):
    shutil.rmtree(checkpoints / "10")  # the run died after saving step 9
    truncate(checkpoints / "9")


def no_commit_marker(checkpoints):
    # A save that broke off before its commit marker. Orbax 0.12 on a local disk marks a
    # finished step by renaming its temporary directory, so it lists `10/` anyway and restoring
    # it fails; an Orbax that marks it with commit_success.txt does not list it at all.
    for path in glob.glob(str(checkpoints / "10" / "**" / "commit_success.txt"), recursive=True):
        os.remove(path)
    truncate(checkpoints / "10")


def contents(path):
    return sorted((os.path.relpath(os.path.join(root, n), path),
                   os.path.getsize(os.path.join(root, n)))
                  for root, _, names in os.walk(path) for n in names)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    with pytest.MonkeyPatch.context() as env:
        # The reruns load the steps this run compiles (half of a rerun's time) from disk.
        env.setenv("JAX_COMPILATION_CACHE_DIR", str(tmp_path_factory.mktemp("jax_cache")))
        env.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
        workdir = tmp_path_factory.mktemp("uninterrupted")
        run(workdir, *TWO_STAGES)
        yield workdir


@pytest.mark.parametrize("damage, step, resumed_from, moved_to", [
    (stage_end, 10, 9, ("10.unreadable",)),
    (mid_stage, 9, 8, ("9.unreadable",)),
    (no_commit_marker, 10, 9, ("10.unreadable", "10.unfinished")),
], ids=["stage_end", "mid_stage", "no_commit_marker"])
def test_an_unusable_checkpoint_is_moved_aside_and_the_run_goes_on(
        uninterrupted, tmp_path, damage, step, resumed_from, moved_to):
    workdir = tmp_path / "run"
    shutil.copytree(uninterrupted, workdir)
    checkpoints = workdir / "checkpoints"
    damage(checkpoints)
    damaged = contents(checkpoints / str(step))
    with open(workdir / "metrics.jsonl") as f:
        logged_before = len(f.readlines())

    result = run(workdir, *TWO_STAGES)  # before the fix: StepAlreadyExistsError at `step`
    assert f"resumed from step {resumed_from} " in result.stdout
    aside = [os.path.basename(p) for p in glob.glob(str(checkpoints / f"{step}.*"))]
    assert len(aside) == 1 and aside[0] in moved_to, aside
    assert f"moved it to {checkpoints / aside[0]}, kept for inspection" in result.stderr
    assert contents(checkpoints / aside[0]) == damaged  # kept as it was
    # `step` saved afresh:
    assert Checkpointer(str(workdir), tiny_sync_saves()).steps() == [8, 9, 10]

    with open(workdir / "metrics.jsonl") as f:
        rerun = [json.loads(line) for line in f.readlines()[logged_before:]]
    assert [r["step"] for r in rerun if "loss" in r] == list(range(resumed_from + 1, 11))
    expected, resumed = by_step(uninterrupted), by_step(workdir)
    assert sorted(resumed) == sorted(expected) == list(range(1, 11))
    for s, record in expected.items():
        assert resumed[s]["loss"] == record["loss"], s  # bitwise: float32 on CPU


def saved_steps_1_and_2(workdir):
    """(config, state, state shardings) of a run dir with checkpoints of steps 1 and 2."""
    config = tiny_sync_saves("checkpoint.keep=3")
    state, state_sh, _ = one_device_state(config)
    ckpt = Checkpointer(str(workdir), config)
    for step in (1, 2):
        ckpt.save(step, state.replace(step=jnp.int32(step)), {"stage": "pretrain"})
    ckpt.close()
    return config, state, state_sh


def test_set_aside_names_never_collide_and_orbax_lists_none(tmp_path):
    config, state, state_sh = saved_steps_1_and_2(tmp_path)
    checkpoints = tmp_path / "checkpoints"
    truncate(checkpoints / "2")
    os.mkdir(checkpoints / "2.unreadable")  # set aside by an earlier run
    (checkpoints / "2.unreadable" / "state").write_text("earlier")
    # An entry with a step's name that Orbax does not list. Orbax 0.12 lists every such
    # directory on a local disk (see no_commit_marker above), so here it is a file; saving
    # step 3 would delete it.
    (checkpoints / "3").write_text("a copy that broke off")

    ckpt = Checkpointer(str(tmp_path), config)
    restored, _ = ckpt.restore_latest(abstract_like(state, state_sh))
    assert int(restored.step) == 1
    assert sorted(os.listdir(checkpoints)) == ["1", "2.unreadable", "2.unreadable-1",
                                               "3.unfinished"]
    assert ckpt.steps() == Checkpointer(str(tmp_path), config).steps() == [1]
    for step in (2, 3):  # neither blocks saving its step again
        ckpt.save(step, state, {"stage": "pretrain"})
    ckpt.close()
    assert Checkpointer(str(tmp_path), config).steps() == [1, 2, 3]
    assert (checkpoints / "3.unfinished").read_text() == "a copy that broke off"
    assert (checkpoints / "2.unreadable" / "state").read_text() == "earlier"


def test_when_no_checkpoint_can_be_read_the_run_stops_and_moves_none(tmp_path):
    """All unreadable is a shared cause more likely than damage to each: an error, not a run
    that silently starts again from step 0."""
    config, state, state_sh = saved_steps_1_and_2(tmp_path)
    for step in (1, 2):
        truncate(tmp_path / "checkpoints" / str(step))
    ckpt = Checkpointer(str(tmp_path), config)
    with pytest.raises(RuntimeError, match=r"none of the checkpoints \[1, 2\] .* can be "
                       r"restored; step 2 cannot be restored"):
        ckpt.restore_latest(abstract_like(state, state_sh))
    assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
    ckpt.close()


def test_the_warning_for_a_step_moved_aside_is_one_short_line(tmp_path, caplog):
    config, state, state_sh = saved_steps_1_and_2(tmp_path)
    lose_array_data(tmp_path / "checkpoints" / "2")
    ckpt = Checkpointer(str(tmp_path), config)
    with caplog.at_level(logging.WARNING):
        restored, _ = ckpt.restore_latest(abstract_like(state, state_sh))
    ckpt.close()
    assert int(restored.step) == 1
    [warning] = [r.getMessage() for r in caplog.records if "moved it to" in r.getMessage()]
    assert "\n" not in warning and len(warning) < 600, warning
    assert "TensorStore({" not in warning  # the spec of the array is not in it


def test_when_no_checkpoint_can_be_read_the_error_is_short_and_alone(tmp_path):
    """The error is the last line of stderr, not buried under the errors of Orbax's other
    reads, which it used to leave running when the first one failed (hundreds of lines)."""
    saved_steps_1_and_2(tmp_path)
    for step in (1, 2):
        lose_array_data(tmp_path / "checkpoints" / str(step))
    script = (f"import sys; sys.path.insert(0, {ROOT!r})\n"
              "from tests.helpers.train import one_device_state, tiny_sync_saves\n"
              "from jaxllm.checkpoint.state import Checkpointer, abstract_like\n"
              "config = tiny_sync_saves('checkpoint.keep=3')\n"
              "state, state_sh, _ = one_device_state(config)\n"
              f"Checkpointer({str(tmp_path)!r}, config).restore_latest("
              "abstract_like(state, state_sh))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                            timeout=300, env={**os.environ, "XLA_FLAGS": xla_flags(1)})
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and len(lines) < 30, result.stderr[-3000:]
    assert lines[-1].startswith("RuntimeError: none of the checkpoints [1, 2] in "), lines[-1]
    assert "step 2 cannot be restored (ValueError: " in lines[-1] and len(lines[-1]) < 800
    assert lines[-1].endswith("move them out of checkpoints/ to start from step 0")


def test_reads_left_running_by_a_failed_restore_finish_before_its_loop_closes(caplog):
    """Orbax's pattern: a fresh loop, a gather that fails on its first read, the loop closed.
    The slower reads finish (quietly) instead of erring into a closed loop later."""
    finished = []

    async def read(delay, name):
        await asyncio.sleep(delay)
        finished.append(name)
        raise OSError(f"{name} is unreadable")

    async def restore():
        await asyncio.gather(read(0, "first"), read(0.2, "second"))

    with _draining_event_loops():
        loop = asyncio.new_event_loop()
        try:
            with pytest.raises(OSError, match="first is unreadable"):
                loop.run_until_complete(restore())
        finally:
            loop.close()
    gc.collect()
    assert finished == ["first", "second"]
    assert "never retrieved" not in caplog.text
