"""Test defaults: CPU, float32 matmuls at full precision, fake devices for mesh tests, quick
compiles (`xla_flags` of tests/helpers/runs.py, also for the runs tests start).

One persistent compilation cache for the whole session, in a fresh temporary folder, shared
with every `python -m jaxllm.main` the tests start (they inherit the environment): most of a
smoke run's time is compiling the same few steps again. Every compile is cached, however
quick, on CPU too. A cached executable is the one compiled for the same program, jaxlib,
options and devices (the key hashes them all; the fake device count changes the program's
devices, multi-process runs have keys of their own), so bitwise comparisons between runs hold.
A folder that cannot be written only costs the cache: JAX warns and compiles.

Only this setup is here: the helpers test modules share are in tests/helpers/ (runs, train,
model, data, corpus, hf), which test modules import from, never from one another.
"""

import atexit
import os
import shutil
import tempfile

from tests.helpers.runs import xla_flags  # imports neither jax nor jaxllm

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# No network: Hugging Face libraries (transformers, datasets under lm-eval) stay offline, with
# a cache of their own that starts empty.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
if "HF_HOME" not in os.environ:
    _hf_home = tempfile.mkdtemp(prefix="jaxllm-test-hf-home-")
    atexit.register(shutil.rmtree, _hf_home, ignore_errors=True)
    os.environ["HF_HOME"] = _hf_home
# 8 fake CPU devices, LLVM's optimisation off (tests/helpers/runs.py's FAST_COMPILE says why).
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

