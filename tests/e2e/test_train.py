"""End to end through the CLI: all three stages, run-directory contents, resume, bad input."""

import glob
import json
import os
import subprocess
import sys

import pytest

from tests.helpers.runs import ROOT, records, xla_flags


def run_main(workdir, *overrides, devices=1):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    env["XLA_FLAGS"] = xla_flags(devices)
    cmd = [sys.executable, "-m", "jaxllm.main", "--config=configs/tiny.py:smoke",
           f"--workdir={workdir}", *overrides]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("run"))
    result = run_main(workdir, "--config.export_hf_every=5")
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, result


def test_runs_all_stages_and_writes_the_run_directory(trained):
    workdir, result = trained
    logged = records(workdir)
    train = [r for r in logged if "loss" in r]
    assert [r["step"] for r in train] == [1, 2, 4, 6, 8, 10]
    assert [r["stage"] for r in train] == ["pretrain"] * 4 + ["long_context", "anneal"]
    for r in train:
        assert {"step", "stage", "loss", "lr", "grad_norm", "tokens_per_sec", "mfu"} <= set(r)
        assert r["tokens_per_sec"] > 0 and 0 < r["mfu"] <= 1
    assert train[0]["mfu_peak"] == "measured" and "mfu_peak" not in train[1]  # CPU: no rating
    evals = [r["eval_loss"] for r in logged if "eval_loss" in r]
    assert train[-1]["loss"] < train[0]["loss"] and evals[-1] < evals[0] - 0.1
    assert glob.glob(os.path.join(workdir, "events.out.tfevents.*"))
    with open(os.path.join(workdir, "config.json")) as f:
        assert json.load(f)["model"]["num_layers"] == 2
    assert sorted(os.listdir(os.path.join(workdir, "checkpoints")))
    for step in (5, 10):  # export_hf_every
        assert os.path.exists(os.path.join(workdir, "hf", str(step), "config.json"))
    assert "stage long_context" in result.stdout and "rope_theta 1e+06" in result.stdout


def test_resume_continues_in_the_last_stage(trained, tmp_path):
    workdir, _ = trained
    before = records(workdir)
    result = run_main(workdir, "--config.stages.anneal.steps=4")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "resumed from step 10 (anneal)" in result.stdout
    new = records(workdir)[len(before):]
    assert [r["step"] for r in new if "loss" in r] == [12]
    assert all(r["stage"] == "anneal" for r in new)


def test_resume_refuses_a_changed_model(trained):
    workdir, _ = trained
    result = run_main(workdir, "--config.model.num_layers=3")
    assert result.returncode == 2
    assert "config.model.num_layers" in result.stderr and "new --workdir" in result.stderr


def test_batch_that_does_not_split_over_the_mesh_is_refused(tmp_path):
    result = run_main(str(tmp_path), devices=8)  # data=-1 → 8 ways, batch 4
    assert result.returncode == 2
    assert "batch_size" in result.stderr and "data×fsdp×expert=8" in result.stderr
