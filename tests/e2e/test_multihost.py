"""Two processes over gloo (launch/local.sh) train exactly like one process with two devices."""

import os
import subprocess
import sys
import time

from tests.helpers.runs import FAST_COMPILE, ROOT, train_records, xla_flags

ARGS = ["--config=configs/tiny.py:smoke", "--config.mesh.data=2",
        "--config.stages.long_context.steps=0", "--config.stages.anneal.steps=0"]


def losses(workdir):
    return [(r["step"], r["loss"]) for r in train_records(workdir)]


def test_two_processes_equal_one_process_with_two_devices(tmp_path):
    # launch/local.sh appends each process's device count to XLA_FLAGS.
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    one_env = dict(env, XLA_FLAGS=xla_flags(2))
    # The two runs are independent: side by side, each compiles while the other computes.
    with open(tmp_path / "two.err", "w+") as two_err:
        two = subprocess.Popen(["bash", "launch/local.sh", "2", f"--workdir={tmp_path / 'two'}",
                                *ARGS], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=two_err, text=True)
        try:
            one = subprocess.run([sys.executable, "-m", "jaxllm.main",
                                  f"--workdir={tmp_path / 'one'}", *ARGS], cwd=ROOT, env=one_env,
                                 capture_output=True, text=True, timeout=600)
            two.wait(timeout=600)
        finally:
            two.kill()  # (only if it is still running: a timeout)
            two.wait()
        two_err.seek(0)
        assert two.returncode == 0, two_err.read()[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    assert losses(tmp_path / "two") == losses(tmp_path / "one")
    assert [step for step, _ in losses(tmp_path / "one")] == [1, 2, 4, 6]


def test_a_killed_peer_makes_the_other_exit_with_an_error(tmp_path):
    """Process 1 is SIGKILLed mid-training: process 0 must exit non-zero within 2 minutes."""
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = xla_flags(1)
    port = 20000 + os.getpid() % 20000
    procs = [subprocess.Popen(
        [sys.executable, "-m", "jaxllm.main", f"--workdir={tmp_path}",
         "--config=configs/tiny.py:smoke", "--config.mesh.data=2",
         "--config.stages.pretrain.steps=100000", "--config.eval_every=100000",
         f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(2)]
    try:
        for line in procs[0].stdout:  # wait until training is under way
            if line.startswith("step 2:"):
                break
        procs[1].kill()
        start = time.monotonic()
        procs[0].communicate(timeout=120)  # drains its output so it never blocks on the pipe
        assert procs[0].returncode != 0
        assert time.monotonic() - start < 120
    finally:
        for p in procs:
            p.kill()
            p.wait()
