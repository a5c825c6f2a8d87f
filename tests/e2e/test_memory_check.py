"""`python -m jaxllm.main` on a machine too small for the config: one line, exit 2, before
anything is allocated or written (the check reads `plan`'s estimate, allocating nothing)."""

import os
import subprocess
import sys

import pytest

from tests.helpers.runs import ROOT

# The command, which then reports its own peak RSS in KiB: VmHWM, of this process image only
# (getrusage's ru_maxrss would keep the forking test process's, across exec).
MEASURED = ("import runpy, sys\n"
            "sys.argv = ['jaxllm.main', *sys.argv[1:]]\n"
            "try:\n"
            "    runpy.run_module('jaxllm.main', run_name='__main__')\n"
            "finally:\n"
            "    hwm = [l for l in open('/proc/self/status') if l.startswith('VmHWM')]\n"
            "    print('maxrss', hwm[0].split()[1], file=sys.stderr)\n")


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="VmHWM is Linux's")
def test_qwen2_0_5b_as_shipped_stops_in_one_line_before_allocating(tmp_path):
    workdir = tmp_path / "run"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1"}
    result = subprocess.run([sys.executable, "-c", MEASURED, "--config=configs/qwen2_0_5b.py",
                             f"--workdir={workdir}"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if not line.startswith("maxrss")]
    assert len(lines) == 1 and lines[0].startswith("error: stage pretrain needs about "), lines
    assert "per device" in lines[0] and "--config.check_memory=false" in lines[0]
    rss_kib = int(result.stderr.split("maxrss")[-1])
    assert rss_kib < 2 * 2**20, rss_kib  # under 2 GiB: nothing of the model was allocated
    assert not workdir.exists()  # no run directory, no checkpoint touched


def test_the_check_passes_a_config_that_fits_and_names_the_stage_that_does_not(monkeypatch):
    import jax

    from jaxllm import plan
    from jaxllm.config.schema import ConfigError
    from tests.helpers.runs import smoke_config

    config = smoke_config()
    plan.check_fits(config, jax.devices())  # the smoke config fits the test machine
    need = plan.make_plan(config, len(jax.devices()))["bytes_per_device"]["total"]
    monkeypatch.setattr(plan, "device_memory", lambda devices: int(need / plan.FAR_OVER) - 1)
    with pytest.raises(ConfigError, match=r"^stage \w+ needs about .* far over the"):
        plan.check_fits(config, jax.devices())
    monkeypatch.setattr(plan, "device_memory", lambda devices: None)  # unknown: no check
    plan.check_fits(config, jax.devices())
