"""Test defaults: CPU, float32 matmuls at full precision, fake devices for mesh tests, quick
compiles (`xla_flags`, also for the runs tests start).

One persistent compilation cache for the whole session, in a fresh temporary folder, shared
with every `python -m jaxllm.main` the tests start (they inherit the environment): most of a
smoke run's time is compiling the same few steps again. Every compile is cached, however
quick, on CPU too. A cached executable is the one compiled for the same program, jaxlib,
options and devices (the key hashes them all; the fake device count changes the program's
devices, multi-process runs have keys of their own), so bitwise comparisons between runs hold.
A folder that cannot be written only costs the cache: JAX warns and compiles.
"""

import atexit
import os
import shutil
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No network: Hugging Face libraries (transformers, datasets under lm-eval) stay offline, with
# a cache of their own that starts empty.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "HF_HOME" not in os.environ:
    _hf_home = tempfile.mkdtemp(prefix="jaxllm-test-hf-home-")
    atexit.register(shutil.rmtree, _hf_home, ignore_errors=True)
    os.environ["HF_HOME"] = _hf_home


# Tests compile far more than they compute, so LLVM's optimisation is off: compiles about 30 %
# faster, slower only in code that no test times. Results can differ from optimised code in the
# last bit, so every process a test compares bitwise with another runs with these flags.
FAST_COMPILE = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process with `devices` fake CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {FAST_COMPILE}"


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    try:
        _cache_dir = tempfile.mkdtemp(prefix="jaxllm-test-jax-cache-")
    except OSError:  # no writable temporary folder: run without the cache
        pass
    else:
        atexit.register(shutil.rmtree, _cache_dir, ignore_errors=True)
        os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache_dir
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")

import jax  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")


# ----------------------------------------------------------------------------- shared helpers
# Imported by test modules (`from tests.conftest import smoke_config`); jaxllm is imported inside
# them, so that collecting a test that needs none stays cheap.

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout
STAGES = ("pretrain", "long_context", "anneal")


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
    import numpy as np
    from jax.sharding import AxisType, Mesh

    from jaxllm.parallel import sharding

    shape = tuple(sizes.get(a, 1) for a in sharding.MESH_AXES)
    devices = np.asarray(jax.devices()[:int(np.prod(shape))]).reshape(shape)
    return Mesh(devices, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * len(shape))


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
