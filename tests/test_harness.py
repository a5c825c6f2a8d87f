"""jaxllm as an lm-evaluation-harness model: per request, the numbers of lm-eval's own `hf`
model on the same Hugging Face checkpoint (a transformers Qwen2 at a trained model's scale,
with the Qwen2 tokenizer cut to 257 ranks), and the same on a 4-device mesh as on one.

Needs lm-eval (`pip install -e '.[eval]'`); without it the module skips, saying so.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
import transformers
from test_hf import CASES, _hf_config, _trained_scale

import jaxllm
from jaxllm.tokenizer import save_hf_tokenizer_files

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval not installed (pip install -e "
                              "'.[eval]'): the harness model is not checked")
from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.models.huggingface import HFLM  # noqa: E402

from jaxllm.eval.harness import JaxLLM, bucket  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LENGTH = 48  # short, so that long requests are cut and rolling texts take several windows
CODE = open(os.path.join(os.path.dirname(os.__file__), "textwrap.py")).read()


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("harness_qwen2"))
    tokenizer = jaxllm.load_tokenizer("qwen2", max_rank=257)  # 260 ids: split over tensor 2
    config = _hf_config(*CASES["qwen2_untied"])
    config.vocab_size = tokenizer.vocab_size  # no rows past the tokenizer's ids
    config.eos_token_id = tokenizer.eos_id  # as Qwen2's config.json: generation stops at EOS
    torch.manual_seed(0)
    model = transformers.Qwen2ForCausalLM(config).eval()
    _trained_scale(model, 0)
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


def _task_files(tmp_path) -> list[str]:
    """Three offline tasks over local JSONL (absolute paths: lm-eval resolves data_files
    against the working directory): multiple choice, generation, perplexity."""
    rows = {"mc": [{"question": q, "choices": c, "label": 0} for q, c in [
                ("1 + 1 =", ["2", "3"]), ("import", ["os", "))"]), ("def", ["main():", "=="]),
                ("for i in", ["range(3):", "]]"])]],
            "gen": [{"question": q, "answer": a} for q, a in [
                ("def main(", "argv):"), ("import ", "os"), ("x = [", "1, 2]")]],
            "ppl": [{"text": CODE[i:i + 300]} for i in (0, 700, 1400)]}
    bodies = {
        "mc": 'output_type: multiple_choice\ndoc_to_text: "{{question}}"\n'
              'doc_to_choice: "{{choices}}"\ndoc_to_target: label\n'
              "metric_list:\n  - metric: acc\n  - metric: acc_norm\n",
        "gen": 'output_type: generate_until\ndoc_to_text: "{{question}}"\n'
               'doc_to_target: "{{answer}}"\ngeneration_kwargs:\n  until: ["\\n"]\n'
               "  max_gen_toks: 8\n  do_sample: false\n"
               "metric_list:\n  - metric: exact_match\n",
        "ppl": 'output_type: loglikelihood_rolling\ndoc_to_text: ""\n'
               'doc_to_target: "{{text}}"\nmetric_list:\n  - metric: word_perplexity\n'
               "  - metric: bits_per_byte\n"}
    paths = []
    for name, docs in rows.items():
        data = tmp_path / f"{name}.jsonl"
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
        path = tmp_path / f"{name}.yaml"
        path.write_text(f"task: jaxllm_test_{name}\ndataset_path: json\ndataset_kwargs:\n"
                        f"  data_files:\n    test: {data}\ntest_split: test\n{bodies[name]}"
                        "metadata:\n  version: 1.0\n")
        paths.append(str(path))
    return paths


def test_task_scores_equal_hf(models, tmp_path, monkeypatch):
    """lm_eval.simple_evaluate over the three kinds of task: every score the hf model's."""
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    tasks = _task_files(tmp_path)
    scores = [lm_eval.simple_evaluate(model=m, tasks=tasks, bootstrap_iters=0)["results"]
              for m in models]
    for task in ("jaxllm_test_mc", "jaxllm_test_gen", "jaxllm_test_ppl"):
        ours, theirs = ({k: v for k, v in r[task].items() if isinstance(v, float)}
                        for r in scores)
        assert ours.keys() == theirs.keys() and ours, task
        for key in ours:
            assert ours[key] == pytest.approx(theirs[key], rel=1e-5), (task, key)


def test_cli_runs_a_task_yaml_offline(hf_dir, tmp_path):
    """`python -m jaxllm.eval.harness --model jaxllm` with lm_eval's flags, on the multiple-choice
    task over local JSONL; lm_eval's own flags (here --batch_size) reach the model."""
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf_home")}
    out = subprocess.run(
        [sys.executable, "-m", "jaxllm.eval.harness", "--model", "jaxllm", "--model_args",
         f"hf={hf_dir}", "--batch_size", "2", "--tasks", _task_files(tmp_path)[0],
         "--output_path", str(tmp_path / "out")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "jaxllm_test_mc" in out.stdout and "acc" in out.stdout


# ----------------------------------------------------------------------------- in training

def test_eval_tasks_in_training_through_every_stage_and_no_repeat_on_resume(tmp_path,
                                                                            monkeypatch):
    """config.eval_tasks on tiny:smoke over the 8 test devices (data 8: the harness runs on
    the training mesh with the live params): scores at every eval_tasks_every-th step and at
    each stage's end, as eval/<task>/<metric> in metrics.jsonl; running the finished run again
    evaluates nothing twice; an unknown task is one clear error."""
    import json

    from jaxllm.config import load_config
    from jaxllm.train import pipeline

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    task = _task_files(tmp_path)[0]
    overrides = [*(f"stages.{s}.batch_size=8" for s in ("pretrain", "long_context", "anneal")),
                 "checkpoint.async=False", f"eval_tasks={task}", "eval_tasks_every=4",
                 "eval_tasks_limit=3", "eval_every=100"]
    config = load_config("configs/tiny.py:smoke", overrides)
    workdir = tmp_path / "run"
    pipeline.run(config, str(workdir))
    pipeline.run(config, str(workdir))  # finished: resumes at the end, repeats nothing
    records = [json.loads(x) for x in (workdir / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in records if "eval/jaxllm_test_mc/acc" in r]
    spans = {s: config.stages[s].steps for s in ("pretrain", "long_context", "anneal")}
    ends = np.cumsum(list(spans.values())).tolist()
    assert [r["step"] for r in scored] == sorted({4, 8, *ends}), [r["step"] for r in scored]
    assert [r["stage"] for r in scored][-1] == "anneal"
    assert all(0 <= r["eval/jaxllm_test_mc/acc"] <= 1 for r in scored)
    with pytest.raises(ValueError, match="unknown lm-eval task 'hellaswagg'; closest: hellaswag"):
        pipeline.run(load_config("configs/tiny.py:smoke", [*overrides[:3],
                                                            "eval_tasks=hellaswagg"]),
                     str(tmp_path / "bad"))
