"""The checkout, smoke configs, `python -m jaxllm.main` runs and the metrics they log, meshes
of the fake devices, and the XLA flags of every test process.

tests/conftest.py imports this before it has set up the environment: nothing here imports jax
or jaxllm at module level (they are imported inside the helpers, which also keeps collecting a
test that needs none cheap).
"""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # checkout
STAGES = ("pretrain", "long_context", "anneal")

# Tests compile far more than they compute, so LLVM's optimisation is off: compiles about 30 %
# faster, slower only in code that no test times. Results can differ from optimised code in the
# last bit, so every process a test compares bitwise with another runs with these flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


# ----------------------------------------------------------------------------- configs


def smoke_config(*overrides: str, config: str = "configs/tiny.py:smoke", rows: int | None = 8):
    """A smoke config with `rows` sequences a step in every stage (None: as the file says; the
    8 test devices need 8 under data parallelism), then `overrides`."""
    from jaxllm.config.load import load_config

    batch = [] if rows is None else [f"stages.{s}.batch_size={rows}" for s in STAGES]
    return load_config(config, [*batch, *overrides])


def pretrain_smoke(*overrides: str):
    """tiny.py:smoke, pretrain only, 8 rows a step, every step logged, synchronous saves."""
    return smoke_config("checkpoint.async=False", "log_every=1", "eval_every=1000",
                        "stages.long_context.steps=0", "stages.anneal.steps=0", *overrides)


def mesh_of(**sizes: int):
    """A mesh of the first devices with jaxllm's axes at these sizes (the others 1)."""
    import jax
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from jaxllm.parallel import sharding

    shape = tuple(sizes.get(a, 1) for a in sharding.MESH_AXES)
    devices = np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


# ----------------------------------------------------------------------------- runs

# 12 steps: pretrain 0..7, long_context 8..9, anneal 10..11; a checkpoint every 3 steps.
RESUME_ARGS = ["--config=configs/tiny.py:smoke", "--config.stages.pretrain.steps=8",
               "--config.log_every=1", "--config.eval_every=1000",
               "--config.checkpoint.every_steps=3"]


def command(workdir, *extra, args=RESUME_ARGS):
    return [sys.executable, "-m", "jaxllm.main", f"--workdir={workdir}", *args, *extra]


def env():
    e = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    e["XLA_FLAGS"] = xla_flags(1)
    return e


def run(workdir, *extra, args=RESUME_ARGS):
    result = subprocess.run(command(workdir, *extra, args=args), cwd=ROOT, env=env(),
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def start(workdir, *extra, args=RESUME_ARGS):
    """The run in the background, its output (stdout and stderr) a pipe to read lines from."""
    return subprocess.Popen(command(workdir, *extra, args=args), cwd=ROOT, env=env(), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def wait_for_line(proc, prefix):
    for line in proc.stdout:
        if line.startswith(prefix):
            return line
    raise AssertionError(f"the run ended before printing {prefix!r}")


def kill_after_checkpoint(proc, workdir, step: int | None = None, timeout: float = 120) -> None:
    """SIGKILL the run once checkpoint `step` (None: any checkpoint) is complete on disk
    (saving is asynchronous: a finished step directory has its plain number for a name)."""
    import time

    def done() -> bool:
        folder = os.path.join(workdir, "checkpoints")
        if step is not None:
            return os.path.isdir(os.path.join(folder, str(step)))
        return os.path.isdir(folder) and any(n.isdigit() for n in os.listdir(folder))

    which = "any checkpoint" if step is None else f"checkpoint {step}"
    deadline = time.monotonic() + timeout
    while not done():
        assert proc.poll() is None, f"the run ended before {which} was complete"
        assert time.monotonic() < deadline, f"{which} was not completed"
        time.sleep(0.05)
    proc.kill()
    proc.wait()


# ----------------------------------------------------------------------------- metrics


def records(workdir) -> list[dict]:
    """Every record of a run's metrics.jsonl, in order."""
    from jaxllm.train.metrics import read_metrics

    return list(read_metrics(str(workdir)))


def train_records(workdir) -> list[dict]:
    """The training records (those with a loss), in order; a resumed run logs some twice."""
    return [r for r in records(workdir) if "loss" in r]


def by_step(workdir) -> dict[int, dict]:
    """The last training record of every step (a resumed run logs the replayed ones again)."""
    return {r["step"]: r for r in train_records(workdir)}
