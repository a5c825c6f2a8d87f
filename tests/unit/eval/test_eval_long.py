"""Long-context evaluation (jaxllm/eval): needle in a haystack and perplexity by position.

The model is configs/tiny.py:smoke with random weights, saved as a Hugging Face directory
and as a params checkpoint; its answers are noise, so the tests check the machinery: the
prompt builder, exact-match scoring, the files written, and long_ppl against `forward`.
T tokens, V vocab.
"""

from __future__ import annotations

import json
import logging

import jax
import numpy as np
import pytest

import jaxllm
from jaxllm.checkpoint.run_dir import save_params
from jaxllm.config.load import load_config
from jaxllm.config.schema import ConfigError
from jaxllm.eval import long_ppl, niah
from jaxllm.eval.common import apply_setting
from jaxllm.model import init_params
from tests.helpers.runs import records

pytest.importorskip("matplotlib", reason="the eval plots need matplotlib: pip install -e .[eval]")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model config, params, tokenizer, hf dir, params-checkpoint dir)."""
    config = load_config("configs/tiny.py:smoke")
    tokenizer = jaxllm.load_tokenizer("qwen2", max_rank=config.tokenizer.max_rank)
    params = init_params(config.model, jax.random.key(0))
    root = tmp_path_factory.mktemp("eval")
    jaxllm.save_hf(config.model, params, str(root / "hf"), tokenizer)
    save_params(str(root / "params"), config.model, params)
    return config.model, params, tokenizer, str(root / "hf"), str(root / "params")


# ----------------------------------------------------------------------------- niah pieces

@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 1.0])
def test_the_needle_sits_at_the_requested_depth(depth):
    haystack, needle, question = list(range(1000, 1200)), [7, 8, 9], [5, 6]
    prompt, at = niah.build_prompt(haystack, needle, question, 100, depth)
    room = 100 - 3 - 2
    assert len(prompt) == 100 and at == round(depth * room)
    assert prompt[at:at + 3] == needle and prompt[-2:] == question
    assert prompt[:at] == haystack[:at] and prompt[at + 3:-2] == haystack[at:room]
    with pytest.raises(ValueError, match="cannot hold"):
        niah.build_prompt(haystack, needle, question, 4, depth)


def test_scoring_is_exact_match_of_the_value():
    assert niah.score(" 4721.", "4721") == niah.score("4721\nmore", "4721") == 1.0
    for wrong in ("", " 47210", " 472", " four", "x 4721"):
        assert niah.score(wrong, "4721") == 0.0
    needles = niah.make_needles(5, seed=3)
    assert needles == niah.make_needles(5, seed=3)
    assert all(n.value in n.sentence and n.color in n.question for n in needles)


def test_training_exercises_answer_every_needle_they_hide():
    """niah.training_document (benchmarks/long_context.py trains on them): the text's lines
    all kept in order with 1-4 needles of different colours between them, then (the second
    part) each needle's question answered with its value, as the evaluation's prompt expects
    it."""
    import re

    text = "".join(f"line {i}\n" for i in range(40))
    rng = np.random.default_rng(0)
    counts = set()
    for _ in range(20):
        context, answers = niah.training_document(text, rng)
        assert answers.startswith("\n\nWhat is") and "What is" not in context
        doc = context + answers
        hidden = re.findall(r"\nThe secret number of the (\w+) door is (\d{4})\.\n", doc)
        asked = re.findall(r"What is the secret number of the (\w+) door\? The secret number "
                           r"of the \1 door is (\d{4})\.", doc)
        counts.add(len(hidden))
        assert sorted(asked) == sorted(hidden) and len({c for c, _ in hidden}) == len(hidden)
        body = doc[:doc.index("\n\nWhat is")]
        for color, value in hidden:
            body = body.replace(f"\nThe secret number of the {color} door is {value}.\n", "")
        assert body == text
    assert counts == {1, 2, 3, 4}


def test_niah_cli_writes_the_grid(tiny, tmp_path, capsys):
    _, _, _, hf, _ = tiny
    niah.main([f"--hf={hf}", "--lengths=64,128", "--depths=0,0.5,1", "--samples=2",
               f"--out={tmp_path}"])
    result = json.loads((tmp_path / "niah.json").read_text())
    assert (tmp_path / "niah.png").stat().st_size > 1000
    assert result["lengths"] == [64, 128] and result["depths"] == [0, 0.5, 1]
    accuracy = np.array(result["accuracy"])
    assert accuracy.shape == (2, 3) and ((0 <= accuracy) & (accuracy <= 1)).all()
    assert len(result["answers"]) == 2 * 3 * 2
    for answer in result["answers"]:  # the cell's accuracy is the mean of its exact matches
        assert answer["correct"] == bool(niah.score(answer["generated"], answer["value"]))
    assert "niah: 12/12" in capsys.readouterr().err  # plain progress lines off a terminal


# ----------------------------------------------------------------------------- long_ppl

def test_long_ppl_equals_a_direct_computation_from_forward(tiny):
    model_config, params, tokenizer, _, _ = tiny
    doc_T1 = np.random.default_rng(0).integers(0, tokenizer.vocab_size, 97).astype(np.int32)
    result = long_ppl.perplexity(model_config, params, doc_T1[None], bucket_size=32)
    logits_TxV = np.asarray(jaxllm.forward(model_config, params, doc_T1[None, :-1]))[0]
    logp_TxV = np.asarray(jax.nn.log_softmax(logits_TxV.astype(np.float64), axis=-1))
    nll_T = -logp_TxV[np.arange(96), doc_T1[1:]]
    assert result["buckets"] == ["0-32", "32-64", "64-96"]
    assert result["tokens"] == [32, 32, 32]
    np.testing.assert_allclose(result["ppl"], np.exp(nll_T.reshape(3, 32).mean(1)), rtol=1e-5)


def test_bucket_labels_end_in_an_open_bucket():
    assert long_ppl.bucket_labels(40 * 1024, 1024)[:2] == ["0-1K", "1K-2K"]
    assert long_ppl.bucket_labels(40 * 1024, 1024)[-2:] == ["31K-32K", "32K+"]
    assert long_ppl.bucket_labels(100, 25) == ["0-25", "25-50", "50-75", "75-100"]


def test_long_ppl_cli_compares_settings(tiny, tmp_path):
    _, _, _, _, ckpt = tiny
    long_ppl.main([f"--workdir={ckpt}", "--tokenizer=qwen2", "--max_rank=1024", "--seq_len=128",
                   "--bucket_size=32", "--num_docs=2", "--batch_size=2", "--settings=base:",
                   "--settings=theta1e4:rope_theta=1e4", f"--out={tmp_path}"])
    result = json.loads((tmp_path / "long_ppl.json").read_text())
    assert (tmp_path / "long_ppl.png").stat().st_size > 1000
    assert result["buckets"] == ["0-32", "32-64", "64-96", "96-128"]
    assert result["num_docs"] == 2 and result["tokens"] == [64] * 4
    base, other = (np.array(result["settings"][n]["ppl"]) for n in ("base", "theta1e4"))
    assert np.isfinite(base).all() and np.isfinite(other).all() and (base > 1).all()
    assert not np.allclose(base, other)  # the rope base reaches the forward pass
    assert result["settings"]["theta1e4"]["overrides"] == ["rope_theta=1e4"]


def test_bad_input_gets_a_clear_error(tiny, tmp_path, capsys, caplog):
    model_config, _, _, _, _ = tiny
    with pytest.raises(ConfigError, match="yarn.*'nope=1'.*unknown config key"):
        apply_setting(model_config, ["nope=1"], "yarn")
    with pytest.raises(ConfigError, match="rope_theta"):
        apply_setting(model_config, ["rope_theta=-1"], "neg")
    with pytest.raises(SystemExit) as exit_info:
        long_ppl.main([f"--workdir={tmp_path}/missing"])
    assert exit_info.value.code == 2 and "is not a directory" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        niah.main([f"--workdir={tmp_path}", f"--hf={tmp_path}"])
    assert "exactly one of --workdir and --hf" in capsys.readouterr().err
    with caplog.at_level(logging.WARNING):
        from jaxllm.eval.common import check_length

        check_length(model_config, 2 * model_config.max_position_embeddings, "--lengths")
    assert "exceed model.max_position_embeddings" in caplog.text


# ----------------------------------------------------------------------------- in training

def test_eval_long_every_logs_during_the_long_context_stage(tmp_path):
    from jaxllm.main import train

    config = load_config("configs/tiny.py:smoke", [
        "stages.pretrain.steps=0", "stages.anneal.steps=0", "stages.long_context.steps=2",
        "stages.long_context.batch_size=8", "checkpoint.async=False",
        "eval_long_every=1", "eval_long.num_docs=2", "log_every=1", "eval_every=100"])
    train(config, str(tmp_path))
    long = [r for r in records(tmp_path) if any(k.startswith("long_ppl/") for k in r)]
    assert [r["step"] for r in long] == [1, 2] and {r["stage"] for r in long} == {"long_context"}
    keys = sorted(k for k in long[0] if k.startswith("long_ppl/"))
    assert keys == sorted(f"long_ppl/{b}" for b in ("0-16", "16-32", "32-48", "48-64"))
    assert all(np.isfinite(r[k]) and r[k] > 1 for r in long for k in keys)
