"""`config.profile` writes a trace that jax's own reader opens, with the traced steps in it;
`config.compilation_cache_dir` fills the folder a second run reads from."""

from __future__ import annotations

import glob
import os
import subprocess
import sys

import jax
import pytest

from jaxllm.config.load import load_config
from jaxllm.config.schema import ConfigError
from jaxllm.train.profiling import compilation_cache_dir
from tests.helpers.runs import ROOT, xla_flags

SHORT = ["stages.pretrain.steps=4", "stages.long_context.steps=0", "stages.anneal.steps=0"]


def test_profile_of_steps_2_and_3_opens(tmp_path):
    from jaxllm.train.stages import run

    config = load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke"),
                         SHORT + ["stages.pretrain.batch_size=8", "profile.start=2",
                                  "profile.stop=4"])
    run(config, str(tmp_path))
    traces = glob.glob(str(tmp_path / "profile" / "**" / "*.xplane.pb"), recursive=True)
    assert len(traces) == 1, traces
    profile = jax.profiler.ProfileData.from_file(traces[0])
    names = {event.name for plane in profile.planes for line in plane.lines
             for event in line.events}
    assert {"train"} <= names or any(n.startswith("train") for n in names), sorted(names)[:50]


def test_bad_profile_range_names_the_key():
    with pytest.raises(ConfigError, match=r"profile\.stop"):
        load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke"),
                    ["profile.start=5", "profile.stop=3"])


def test_a_run_fills_its_compilation_cache(tmp_path):
    cache = tmp_path / "cache"
    env = {k: v for k, v in os.environ.items() if k != "JAX_COMPILATION_CACHE_DIR"}
    env["XLA_FLAGS"] = xla_flags(1)
    subprocess.run([sys.executable, "-m", "jaxllm.main", "--config=configs/tiny.py:smoke",
                    f"--workdir={tmp_path / 'run'}", *(f"--config.{o}" for o in SHORT),
                    "--config.mesh.data=1",
                    f"--config.compilation_cache_dir={cache}"], cwd=ROOT, env=env, check=True,
                   capture_output=True, timeout=300)
    assert len(os.listdir(cache)) >= 2  # the train step and the eval step at least
    config = load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke"))
    assert compilation_cache_dir(config) == os.environ.get(
        "JAX_COMPILATION_CACHE_DIR", os.path.expanduser("~/.cache/jaxllm/xla"))
