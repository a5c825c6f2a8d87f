"""jaxllm as an lm-evaluation-harness model: per request, the numbers of lm-eval's own `hf`
model on the same Hugging Face checkpoint (a transformers Qwen2 at a trained model's scale,
with the Qwen2 tokenizer cut to 257 ranks), and the same on a 4-device mesh as on one.

Needs lm-eval (`pip install -e '.[eval]'`); without it the module skips, saying so.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers

import jaxllm
from jaxllm.data.tokenizer import save_hf_tokenizer_files
from tests.helpers.hf import CASES, hf_config, trained_scale
from tests.helpers.runs import records

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e "
                              "'.[eval]'): the harness model is not checked")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from jaxllm.eval.harness import TASKS_DIR, JaxLLM, bucket, load_tasks  # noqa: E402
from tests.helpers.runs import ROOT  # noqa: E402

MAX_LENGTH = 48  # short, so that long requests are cut and rolling texts take several windows
CODE = open(os.path.join(os.path.dirname(os.__file__), "textwrap.py")).read()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("harness_qwen2"))
    tokenizer = jaxllm.load_tokenizer("qwen2", max_rank=257)  # 260 ids: split over tensor 2
    config = hf_config(*CASES["qwen2_untied"])
    config.vocab_size = tokenizer.vocab_size  # no rows past the tokenizer's ids
    config.eos_token_id = tokenizer.eos_id  # as Qwen2's config.json: generation stops at EOS
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    trained_scale(model, 0)
    model.save_pretrained(path)
    save_hf_tokenizer_files(tokenizer, path)
    return path


@pytest.fixture(scope="module")
def models(hf_dir):
    ours = JaxLLM(hf=hf_dir, batch_size=4, max_length=MAX_LENGTH)
    theirs = HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=4,
                  max_length=MAX_LENGTH)
    return ours, theirs


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, doc={}, arguments=a, idx=0, metadata=("test", i, 1))
            for i, a in enumerate(args)]


def test_loglikelihood_equals_hf(models):
    """Short and long contexts (cut from the left to max_length), an empty one (scored after
    EOS), continuations of one and many tokens: log-likelihoods to 1e-4, greedy flags."""
    ours, theirs = models
    pairs = [("def main(argv):", " return 0"), ("import os\n", "import sys"),
             (CODE[:600], CODE[600:640]), ("", "while True:"), ("x = ", "1"),
             ("for i in range(", "10):"), (CODE[1000:1100], "\n")]
    a = ours.loglikelihood(_requests("loglikelihood", pairs))
    b = theirs.loglikelihood(_requests("loglikelihood", pairs))
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-4, rtol=1e-5)
    assert [g for _, g in a] == [g for _, g in b]
    assert len({round(x, 2) for x, _ in a}) == len(pairs)  # not all alike: a real comparison


def test_loglikelihood_rolling_equals_hf(models):
    ours, theirs = models
    texts = [(CODE[:900],), (CODE[2000:2050],), ("a",)]
    a = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    b = theirs.loglikelihood_rolling(_requests("loglikelihood_rolling", texts))
    assert len(ours.tok_encode(texts[0][0])) > 3 * MAX_LENGTH  # several windows
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-3)


def test_greedy_generation_equals_hf(models):
    """Stop strings, max_gen_toks, a context longer than max_length − max_gen_toks."""
    ours, theirs = models
    kw = {"until": ["\n\n", "def "], "max_gen_toks": 12, "do_sample": False}
    args = [("def main(argv):", kw), ("import os\n", dict(kw, until=["\n"])),
            (CODE[:500], kw), ("class A:", dict(kw, max_gen_toks=5))]
    a = ours.generate_until(_requests("generate_until", args))
    b = theirs.generate_until(_requests("generate_until", args))
    assert a == b
    assert any(a)


def test_sampled_generation_is_seeded_and_varies(models):
    ours, _ = models
    kw = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0}
    args = _requests("generate_until", [("def ", kw)] * 4)
    first = ours.generate_until(args)
    assert first == ours.generate_until(args)  # same seed, same samples
    assert len(set(first)) > 1  # 4 rows of one prompt: different samples


def test_a_mesh_gives_the_numbers_of_one_device(hf_dir, models):
    """fsdp 2 × tensor 2 over 4 of the test's fake devices, 7 requests in batches padded to
    the mesh: the same log-likelihoods and continuations."""
    ours, _ = models
    sharded = JaxLLM(hf=hf_dir, mesh="fsdp:2/tensor:2", batch_size=3, max_length=MAX_LENGTH)
    assert sharded.mesh is not None and sharded.mesh.shape["tensor"] == 2
    pairs = [("def f(", "x):"), (CODE[:300], CODE[300:320]), ("", "import")] * 2 + [("a", "b")]
    a = sharded.loglikelihood(_requests("loglikelihood", pairs))
    b = ours.loglikelihood(_requests("loglikelihood", pairs))
    np.testing.assert_allclose([x for x, _ in a], [x for x, _ in b], atol=1e-5)
    kw = {"until": ["\n"], "max_gen_toks": 6, "do_sample": False}
    gen = _requests("generate_until", [("def main(", kw), ("x = [", kw)])
    assert sharded.generate_until(gen) == ours.generate_until(gen)


def test_buckets_and_bad_arguments(hf_dir):
    assert [bucket(n) for n in (1, 16, 17, 33, 64)] == [16, 16, 32, 64, 64]
    with pytest.raises(ValueError, match="unknown"):
        JaxLLM(hf=hf_dir, max_lenght=8)
    with pytest.raises(ValueError, match="batch_size"):
        JaxLLM(hf=hf_dir, batch_size="many")


def _tasks(*names: str) -> list:
    from lm_eval.tasks import TaskManager

    return load_tasks(TaskManager(include_path=TASKS_DIR), list(names), "test")


def test_task_scores_equal_hf(hf_dir):
    """lm_eval.simple_evaluate over the shipped tasks (multiple choice, generation,
    perplexity; many contexts longer than max_length, so cut from the left): every score the
    hf model's. (The hf model asserts that a choice fits in max_length: 128 here.)"""
    models = (JaxLLM(hf=hf_dir, batch_size=4, max_length=128),
              HFLM(pretrained=hf_dir, dtype="float32", device="cpu", batch_size=4,
                   max_length=128))
    tasks = _tasks("stdlib")
    scores = [lm_eval.simple_evaluate(model=m, tasks=tasks, limit=6, bootstrap_iters=0)["results"]
              for m in models]
    for task in ("stdlib_next_line", "stdlib_complete_line", "stdlib_ppl"):
        ours, theirs = ({k: v for k, v in r[task].items() if isinstance(v, float)}
                        for r in scores)
        assert ours.keys() == theirs.keys() and ours, task
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (task, key)


def test_shipped_tasks_are_built_from_the_held_out_stdlib(tmp_path):
    """The JSONL beside the task YAMLs is what `python -m jaxllm.eval.tasks.stdlib` builds
    from this Python's standard library (CPython 3.11 made the shipped files)."""
    if sys.version_info[:2] != (3, 11):
        pytest.skip("the shipped task data comes from CPython 3.11's standard library")
    from jaxllm.eval.tasks import stdlib

    stdlib.build(str(tmp_path))
    for name in ("stdlib_next_line", "stdlib_complete_line", "stdlib_ppl"):
        assert (tmp_path / f"{name}.jsonl").read_text() == open(
            os.path.join(TASKS_DIR, f"{name}.jsonl")).read(), name
    rows = [json.loads(x) for x in (tmp_path / "stdlib_next_line.jsonl").read_text().splitlines()]
    assert len(rows) == 200 and all(len(r["choices"]) == 4 for r in rows)
    assert all(r["choices"][r["label"]] not in r["context"].splitlines() for r in rows)


def test_cli_runs_a_shipped_task_offline(hf_dir, tmp_path):
    """`python -m jaxllm.eval.harness --model jaxllm` with lm_eval's flags: a shipped task by
    name (its folder is included) and another by YAML path; lm_eval's --batch_size reaches
    the model."""
    out = subprocess.run(
        [sys.executable, "-m", "jaxllm.eval.harness", "--model", "jaxllm", "--model_args",
         f"hf={hf_dir}", "--batch_size", "2", "--limit", "4", "--tasks",
         f"stdlib_next_line,{os.path.join(TASKS_DIR, 'stdlib_complete_line.yaml')}",
         "--output_path", str(tmp_path / "out")],
        cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "stdlib_next_line" in out.stdout and "stdlib_complete_line" in out.stdout
    assert "acc" in out.stdout and "exact_match" in out.stdout


# ----------------------------------------------------------------------------- in training

def _scored(workdir, key: str) -> list[dict]:
    return [r for r in records(workdir) if key in r]


def test_eval_tasks_in_training_through_every_stage_and_resume_repeats_none(tmp_path):
    """config.eval_tasks on tiny:smoke over the 8 test devices (data 8: the harness runs on
    the training mesh with the live params): scores at every eval_tasks_every-th step and at
    each stage's end, as eval/<task>/<metric> in metrics.jsonl, the stage's last printed.
    Resumed from a checkpoint in the middle of the first stage, the run evaluates only the
    step whose scores metrics.jsonl lacks."""
    from jaxllm.config.load import load_config
    from jaxllm.main import train

    overrides = [*(f"stages.{s}.batch_size=8" for s in ("pretrain", "long_context", "anneal")),
                 "checkpoint.async=False", "checkpoint.every_steps=2", "checkpoint.keep=10",
                 "eval_tasks=stdlib_next_line", "eval_tasks_every=4", "eval_tasks_limit=3",
                 "eval_every=100"]
    config = load_config("configs/tiny.py:smoke", overrides)
    workdir = tmp_path / "run"
    train(config, str(workdir))
    key = "eval/stdlib_next_line/acc"
    spans = {s: config.stages[s].steps for s in ("pretrain", "long_context", "anneal")}
    ends = np.cumsum(list(spans.values())).tolist()
    first = _scored(workdir, key)
    assert [r["step"] for r in first] == sorted({4, 8, *ends}) == [4, 6, 8, 10]
    assert [r["stage"] for r in first] == ["pretrain", "pretrain", "long_context", "anneal"]
    assert all(0 <= r[key] <= 1 for r in first)

    # Back to step 4 (mid pretrain), with step 8's scores gone from metrics.jsonl.
    for name in os.listdir(workdir / "checkpoints"):
        if name.isdigit() and int(name) > 4:
            shutil.rmtree(workdir / "checkpoints" / name)
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    (workdir / "metrics.jsonl").write_text("".join(
        x + "\n" for x in lines if not (key in x and json.loads(x)["step"] == 8)))
    train(config, str(workdir))
    again = _scored(workdir, key)
    assert [r["step"] for r in again] == [4, 6, 10, 8]  # only 8 is new, after the others
    assert again[:3] == [r for r in first if r["step"] != 8]

    from jaxllm.eval import report

    report.main(["--workdir", str(workdir)])
    assert (workdir / "eval" / "tasks.png").stat().st_size > 10_000


def test_eval_tasks_bad_input_is_one_line_before_training(tmp_path):
    """An unknown task names the closest; a task whose data is not cached, offline, says so;
    stages.run without the evaluators the config asks for says how to get them."""
    from jaxllm.config.load import load_config
    from jaxllm.config.schema import ConfigError
    from jaxllm.eval import loop_evaluators
    from jaxllm.train import stages

    config = load_config("configs/tiny.py:smoke", ["eval_tasks=hellaswagg"])
    with pytest.raises(ConfigError, match="unknown lm-eval task 'hellaswagg'; closest: hellaswag"):
        loop_evaluators(config)
    with pytest.raises(ConfigError, match="no evaluator for it was handed to jaxllm.train.stages"):
        stages.run(config, str(tmp_path / "run"))
    out = subprocess.run(
        [sys.executable, "-m", "jaxllm.main", "--config=configs/tiny.py:smoke",
         f"--workdir={tmp_path / 'offline'}", "--config.eval_tasks=stdlib_ppl,arc_easy"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 2, out.stderr[-3000:]
    error = [x for x in out.stderr.splitlines() if x.startswith("error:")]
    assert len(error) == 1 and "task 'arc_easy' is not on this machine" in error[0], error
    assert not os.path.exists(tmp_path / "offline" / "checkpoints")


def test_eval_tasks_on_two_processes_equal_one_process(tmp_path):
    """Two processes over gloo (launch/local.sh, one device each, data 2) score the tasks on
    params spread over both, and log what one process with two devices logs."""
    from tests.helpers.runs import FAST_COMPILE, xla_flags

    args = ["--config=configs/tiny.py:smoke", "--config.mesh.data=2",
            "--config.stages.long_context.steps=0", "--config.stages.anneal.steps=0",
            "--config.eval_tasks=stdlib_next_line,stdlib_complete_line",
            "--config.eval_tasks_limit=2", "--config.eval_tasks_every=4"]
    env = dict(os.environ, XLA_FLAGS=FAST_COMPILE)
    env["PATH"] = os.path.dirname(sys.executable) + os.pathsep + env["PATH"]
    with open(tmp_path / "two.err", "w+") as two_err:
        two = subprocess.Popen(["bash", "launch/local.sh", "2", f"--workdir={tmp_path / 'two'}",
                                *args], cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                               stderr=two_err, text=True)
        try:
            one = subprocess.run([sys.executable, "-m", "jaxllm.main",
                                  f"--workdir={tmp_path / 'one'}", *args], cwd=ROOT,
                                 env=dict(env, XLA_FLAGS=xla_flags(2)), capture_output=True,
                                 text=True, timeout=600)
            two.wait(timeout=600)
        finally:
            two.kill()
            two.wait()
        two_err.seek(0)
        assert two.returncode == 0, two_err.read()[-3000:]
    assert one.returncode == 0, one.stderr[-3000:]
    key = "eval/stdlib_next_line/acc"
    scored = [_scored(tmp_path / run, key) for run in ("one", "two")]
    assert [r["step"] for r in scored[0]] == [4, 6]
    strip = [[{k: v for k, v in r.items() if k.startswith("eval/")} for r in s] for s in scored]
    assert strip[0] == strip[1]
