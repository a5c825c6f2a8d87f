"""`benchmarks/device_check.sh --cpu`: the GPU check's every step, at toy sizes on CPU, so the
script is known to work before a GPU is lent. Asserts on what it wrote (every step exit 0,
each benchmark's table with its peer's row and a number in each row), never on times."""

import os
import subprocess
import sys

import pytest

from benchmarks.timing import is_number  # a table cell that holds a measurement
from tests.helpers.runs import ROOT

SCRIPT = os.path.join(ROOT, "benchmarks", "device_check.sh")
STEPS = ("install", "env", "kernel_tests", "attention", "gmm", "train_step")


def table_rows(log: str) -> dict[str, list[str]]:
    """Table rows by their name cell (the one after T in the attention table), less the
    header, the separator and attention's `fastest` lines; a name seen twice keeps the first
    cells and adds the next ones."""
    rows: dict[str, list[str]] = {}
    for line in log.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if not line.startswith("|") or set(cells[0]) <= {"-"} or "implementation" in cells:
            continue
        if cells[0].isdigit():  # attention: | T | implementation | forward | fwd+bwd |
            if cells[1].startswith("fastest"):
                continue
            cells = cells[1:]
        rows.setdefault(cells[0], []).extend(cells[1:])
    return rows


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("device_check")
    env = dict(os.environ, PYTHON=sys.executable)
    env.pop("XLA_FLAGS", None)  # conftest's 8 fake devices: not what the script runs with
    result = subprocess.run(["bash", SCRIPT, "--cpu", str(out)], cwd=ROOT, env=env,
                            capture_output=True, text=True, timeout=600)
    logs = {p.removesuffix(".log"): (out / p).read_text() for p in os.listdir(out)
            if p.endswith(".log")}
    return result, (out / "summary.txt").read_text(), logs


def test_every_step_succeeds(cpu_run):
    result, summary, logs = cpu_run
    assert result.returncode == 0, result.stdout + result.stderr
    exits = {}
    for line in summary.splitlines():
        words = line.split()
        if words and words[0] in (*STEPS, "total"):
            exits[words[0]] = words[1]
    assert exits == {**dict.fromkeys(STEPS, "0"), "total": "0"}, summary
    assert set(logs) == set(STEPS)
    assert summary in result.stdout  # printed at the end too


def test_kernel_tests_skip_on_cpu_and_env_names_this_checkout(cpu_run):
    _, summary, logs = cpu_run
    assert "skipped" in logs["kernel_tests"] and "failed" not in logs["kernel_tests"]
    assert f"jaxllm from {os.path.join(ROOT, 'jaxllm')}" in logs["env"]
    assert "jax " in summary.split("## env", 1)[1]


@pytest.mark.parametrize("step,ours,peers", [
    ("attention", ["jaxllm pallas (interpret)", "jaxllm chunked (jnp)"],
     ["xla (attention_ref)", "jax.nn xla"]),
    ("gmm", ["jaxllm gmm (pallas)"], ["jax.lax.ragged_dot", "per-group loop (ref)"]),
    ("train_step", ["jaxllm (jax.jit)"], ["transformers (torch eager)"]),
])
def test_tables_have_ours_and_the_peer_with_numbers(cpu_run, step, ours, peers):
    _, summary, logs = cpu_run
    rows = table_rows(logs[step])
    assert set(rows) == {*ours, *peers}, logs[step]
    for name in (*ours, *peers):
        numbers = [c for c in rows[name] if is_number(c)]
        # attention: forward and fwd+bwd at two lengths; gmm: both; train step: ms,
        # tokens/s, MFU, peak memory, and for ours the ratio to the best peer
        want = {"attention": 4, "gmm": 2}.get(step) or (5 if name in ours else 4)
        assert len(numbers) == want, rows[name]
    assert "failed:" not in logs[step]
    assert f"## {step}" in summary and peers[0] in summary.split(f"## {step}", 1)[1]


def test_no_out_dir_is_a_loud_error():
    result = subprocess.run(["bash", SCRIPT, "--cpu"], cwd=ROOT, capture_output=True,
                            text=True, timeout=30)
    assert result.returncode == 2 and "usage" in result.stderr
