"""Fault tolerance end to end: SIGKILL then resume is bitwise exact; SIGTERM saves and exits
with PREEMPTED_EXIT_CODE; an interrupted long_context stage resumes in that stage."""

import os
import random
import signal
import subprocess

import pytest

from jaxllm.train.loop import PREEMPTED_EXIT_CODE
from tests.helpers.runs import (
    ROOT,
    by_step,
    command,
    env,
    kill_after_checkpoint,
    run,
    start,
    wait_for_line,
)

# The run is RESUME_ARGS' (tests/helpers/runs.py): 12 steps, pretrain 0..7, long_context 8..9,
# anneal 10..11; a checkpoint every 3 steps.


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The records of a run that nothing stops, a function that waits for it. The run starts
    at once, beside the first test's own: each compiles while the other computes."""
    root = tmp_path_factory.mktemp("uninterrupted")
    workdir = root / "run"
    with open(root / "output.log", "w+") as log:
        proc = subprocess.Popen(command(workdir), cwd=ROOT, env=env(), text=True, stdout=log,
                                stderr=subprocess.STDOUT)
        records = {}

        def wait():
            if not records:
                proc.wait(timeout=600)
                log.seek(0)
                assert proc.returncode == 0, log.read()[-3000:]
                records.update(by_step(workdir))
            return records

        yield wait
        proc.kill()  # (only if a test failed before waiting for it)
        proc.wait()


def test_sigkill_then_resume_is_bitwise_exact(uninterrupted, tmp_path):
    kill_after = random.Random(os.getpid()).randint(4, 9)  # a step after the first checkpoint
    proc = start(tmp_path)
    wait_for_line(proc, f"step {kill_after}:")
    kill_after_checkpoint(proc, str(tmp_path))
    result = run(tmp_path)
    assert "resumed from step" in result.stdout
    resumed, uninterrupted = by_step(tmp_path), uninterrupted()
    assert sorted(resumed) == sorted(uninterrupted) == list(range(1, 13))
    for step, record in uninterrupted.items():
        assert resumed[step]["loss"] == record["loss"], step  # bitwise: float32 on CPU
        assert resumed[step]["grad_norm"] == record["grad_norm"], step
        assert resumed[step]["lr"] == record["lr"], step


def test_sigterm_saves_and_exits_then_resumes_in_long_context(uninterrupted, tmp_path):
    proc = start(tmp_path)
    wait_for_line(proc, "step 9:")  # the first long_context step is done
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == PREEMPTED_EXIT_CODE, out[-3000:]
    assert "preempted: saved step" in out
    saved = int(out.split("preempted: saved step ")[1].split(";")[0])
    assert 9 <= saved <= 10
    assert os.path.isdir(tmp_path / "checkpoints" / str(saved))

    result = run(tmp_path)
    assert f"resumed from step {saved} (long_context)" in result.stdout
    assert "stage long_context: steps 8..9, seq_len 64, batch 2, rope_theta 1e+06" in result.stdout
    resumed, uninterrupted = by_step(tmp_path), uninterrupted()
    for step in range(saved + 1, 13):
        assert resumed[step]["lr"] == uninterrupted[step]["lr"]
        assert resumed[step]["loss"] == uninterrupted[step]["loss"]
    assert resumed[10]["stage"] == "long_context" and resumed[11]["stage"] == "anneal"


def test_a_changed_safe_setting_is_accepted_with_a_warning(tmp_path):
    run(tmp_path, "--config.stages.anneal.steps=1")
    result = run(tmp_path, "--config.stages.anneal.steps=2", "--config.model.remat=full")
    assert "config.model.remat" in result.stderr and "resumed from step 11" in result.stdout
