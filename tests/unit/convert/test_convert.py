"""`python -m jaxllm.convert export|import` against transformers, on tiny models.

A tiny Qwen2 (configs/tiny.py:smoke) is trained 20 steps on Python sources and saved as a real
run directory; its export must give transformers the same logits (float32, 1e-4), the same
greedy continuation (transformers' generate vs jaxllm's KV-cache decoding) and a tokenizer
that encodes the 420-string corpus of test_tokenizer.py identically.
HF -> import -> export gives back bitwise-identical tensors.
Dimension letters: B batch, T length, V vocab.
"""

from __future__ import annotations

import json
import os
import pathlib
import runpy
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import linen as nn

from jaxllm.checkpoint.average import main as checkpoint_main
from jaxllm.convert import export_run_checkpoint, load_hf, save_hf
from jaxllm.convert.__main__ import main as convert_main
from jaxllm.convert.load import load_model
from jaxllm.model.decode import generate_ids
from tests.helpers.corpus import CORPUS
from tests.helpers.hf import CASES, assert_bitwise_equal, hf_greedy, make_hf, tensors
from tests.helpers.runs import ROOT as ROOT_DIR

ROOT = pathlib.Path(ROOT_DIR)
STEPS, B, T = 20, 4, 32



def generate_main(argv: list[str]) -> None:
    """`python -m jaxllm.generate ARGV` in this process. Importing the command module would
    make `jaxllm.generate` name it instead of the API function, so it is run, not imported."""
    runpy.run_module("jaxllm.generate")["main"](argv)


def _batches(tokenizer, steps: int):
    import argparse
    import dataclasses

    text = "".join(pathlib.Path(m.__file__).read_text() for m in (argparse, dataclasses))
    ids = np.asarray(tokenizer.encode(text), np.int32)
    for s in range(steps):
        rows = np.stack([ids[(s * B + b) * (T + 1):(s * B + b + 1) * (T + 1)] for b in range(B)])
        yield {"inputs": rows[:, :-1], "targets": rows[:, 1:],
               "positions": np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)),
               "segment_ids": np.ones((B, T), np.int32), "loss_mask": np.ones((B, T), np.int32)}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """A run directory as `python -m jaxllm.main` leaves it, after 20 pretrain steps."""
    from jaxllm import load_config
    from jaxllm.checkpoint.run_dir import run_model_config
    from jaxllm.checkpoint.state import Checkpointer
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.model import frozen, init_params
    from jaxllm.train.optim import make_optimizer, make_schedule
    from jaxllm.train.step import TrainState, make_train_step

    workdir = str(tmp_path_factory.mktemp("run"))
    config = load_config(str(ROOT / "jaxllm" / "configs" / "tiny.py") + ":smoke")
    config.checkpoint["async"] = False
    stage = config.stages.pretrain
    # The pretrain stage's rope base (1e4) differs from config.model's (1e6): the export must
    # carry the one the weights were trained with.
    assert stage.rope_theta != config.model.rope_theta
    model_cfg = frozen(run_model_config(config, "pretrain"))
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    tx = make_optimizer(config.optimizer)
    params = init_params(config.model, jax.random.key(0))
    state = TrainState.create(params, tx.init(params))
    step = jax.jit(make_train_step(model_cfg, tx, make_schedule(stage.lr, STEPS), 0, 1, 0.0))
    losses = []
    for batch in _batches(tokenizer, STEPS):
        state, metrics = step(state, batch)
        losses.append(float(metrics["loss"]))
    assert losses[-1] < losses[0] - 0.5, losses  # it trained
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    checkpointer = Checkpointer(workdir, config)
    checkpointer.save(STEPS, state, {"stage": "pretrain", "data_state": {}})
    checkpointer.close()
    return workdir, config, model_cfg, state.params, tokenizer


@pytest.fixture(scope="module")
def exported(trained_run, tmp_path_factory):
    workdir = trained_run[0]
    out = str(tmp_path_factory.mktemp("hf32"))
    convert_main(["export", f"--workdir={workdir}", f"--out={out}", "--dtype=float32"])
    return out


def test_export_of_a_trained_run_matches_transformers(trained_run, exported):
    from jaxllm.model import forward

    _, _, model_cfg, params, tokenizer = trained_run
    hf_config = json.load(open(os.path.join(exported, "config.json")))
    assert hf_config["rope_parameters"]["rope_theta"] == hf_config["rope_theta"] == 1e4
    assert hf_config["vocab_size"] == 1280 and hf_config["tie_word_embeddings"] is True
    assert hf_config["eos_token_id"] == tokenizer.eos_id == 1024
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        exported, output_loading_info=True, attn_implementation="eager")
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    model.eval()
    tokens_BxT = np.asarray(next(_batches(tokenizer, 1))["inputs"])
    with torch.no_grad():
        want_BxTxV = model(torch.tensor(tokens_BxT, dtype=torch.long)).logits.numpy()
    got_BxTxV = np.asarray(forward(model_cfg, params, tokens_BxT))
    np.testing.assert_allclose(got_BxTxV, want_BxTxV, atol=1e-4, rtol=1e-4)

    # Greedy continuation of 32 tokens: transformers' generate and jaxllm's KV-cache decoding.
    prompt = tokenizer.encode("def main(argv):\n    ")
    assert generate_ids(model_cfg, params, [prompt], 32)[0] == hf_greedy(model, prompt, 32)


def test_generate_from_the_run_directory_equals_from_its_export(trained_run, exported,
                                                                 capsys):
    workdir = trained_run[0]
    model_cfg, _, tokenizer = load_model(workdir=workdir)
    assert model_cfg.rope_theta == 1e4 and tokenizer.vocab_size == trained_run[4].vocab_size
    outputs = []
    for source in (f"--workdir={workdir}", f"--hf={exported}"):
        generate_main([source, "--prompt=def main(argv):", "--prompt=import os",
                       "--max_new_tokens=16"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1] and outputs[0].startswith("def main(argv):")


def test_exported_tokenizer_encodes_like_jaxllm(trained_run, exported):
    tokenizer = trained_run[4]
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert len(CORPUS) >= 300
    assert hf_tokenizer.eos_token_id == tokenizer.eos_id
    for text in CORPUS:
        assert hf_tokenizer.encode(text, add_special_tokens=False) == tokenizer.encode(text), \
            repr(text)


def test_export_during_training_equals_the_cli(trained_run, exported):
    # In-memory params sharded over 8 devices (FSDP), gathered a block at a time.
    from jaxllm.convert.from_hf import import_shardings

    workdir, config, model_cfg, params, _ = trained_run
    sharded = jax.device_put(params, import_shardings(model_cfg))
    assert len(sharded["embed"]["embedding"].sharding.device_set) == 8
    out = export_run_checkpoint(workdir, STEPS, config, "pretrain", sharded, dtype="float32")
    assert out == os.path.join(workdir, "hf", str(STEPS))
    assert not os.path.exists(out + ".tmp")
    assert_bitwise_equal(tensors(exported), tensors(out))
    assert json.load(open(os.path.join(out, "config.json"))) == \
        json.load(open(os.path.join(exported, "config.json")))
    assert os.path.exists(os.path.join(out, "vocab.json"))


def test_default_export_is_bfloat16_and_sharded(trained_run, tmp_path):
    workdir, _, _, params, _ = trained_run
    convert_main(["export", f"--workdir={workdir}", f"--step={STEPS}", f"--out={tmp_path}",
                  "--max_shard_size=100KB"])
    hf_config = json.load(open(tmp_path / "config.json"))
    assert hf_config["dtype"] == hf_config["torch_dtype"] == "bfloat16"
    index = json.load(open(tmp_path / "model.safetensors.index.json"))
    files = set(index["weight_map"].values())
    # The embedding (164 KB) is bigger than a shard: it gets a file of its own.
    assert len(files) > 2 and all(os.path.getsize(tmp_path / f) <= 170_000 for f in files)
    _, loaded = load_hf(str(tmp_path))
    want = jax.tree.map(lambda x: np.asarray(x).astype(jnp.bfloat16), params)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), loaded, want)
    model = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path))
    assert model.dtype == torch.bfloat16


@pytest.mark.parametrize("case", list(CASES))
def test_cli_round_trip_is_bitwise(tmp_path, case):
    from jaxllm.checkpoint.run_dir import load_model_config, load_params
    from jaxllm.model import abstract_params

    src, ckpt, out = (str(tmp_path / d) for d in ("src", "ckpt", "out"))
    make_hf(src, case)
    convert_main(["import", f"--hf={src}", f"--out={ckpt}"])
    m = load_model_config(ckpt)  # what config.init.checkpoint reads
    assert (m.family, m.tie_embeddings, m.rope_theta) == (CASES[case][0], *CASES[case][1:3])
    restored = load_params(ckpt, jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(abstract_params(m))))
    _, direct = load_hf(src)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 restored, direct)
    convert_main(["export", f"--workdir={ckpt}", f"--out={out}", "--dtype=float32"])
    assert_bitwise_equal(tensors(src), tensors(out))
    want, got = (json.load(open(os.path.join(d, "config.json"))) for d in (src, out))
    for key in ("vocab_size", "tie_word_embeddings", "bos_token_id",
                "eos_token_id", "num_key_value_heads", "head_dim"):
        assert got[key] == want[key], key
    assert got["rope_parameters"]["rope_theta"] == CASES[case][2]


def test_bfloat16_round_trip_through_the_clis(tmp_path):
    src, ckpt, out = (str(tmp_path / d) for d in ("src", "ckpt", "out"))
    make_hf(str(tmp_path / "f32"), "qwen2_untied").to(torch.bfloat16).save_pretrained(
        src, max_shard_size="100KB")
    convert_main(["import", f"--hf={src}", f"--out={ckpt}"])
    convert_main(["export", f"--workdir={ckpt}", f"--out={out}", "--max_shard_size=100KB"])
    assert_bitwise_equal(tensors(src), tensors(out))


def _small(tmp_path, tie: bool):
    from jaxllm import load_config
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.model import init_params

    config = load_config(str(ROOT / "jaxllm" / "configs" / "tiny.py") + ":smoke",
                         [f"model.tie_embeddings={tie}"])
    tokenizer = load_tokenizer("qwen2", max_rank=config.tokenizer.max_rank)
    return config.model, init_params(config.model, jax.random.key(1)), tokenizer


@pytest.mark.parametrize("tie", [True, False])
def test_vocab_rows_rule(tmp_path, tie):
    from jaxllm.model import forward

    m, params, tokenizer = _small(tmp_path, tie)
    ids = tokenizer.vocab_size
    assert m.vocab_size == 1280 and ids == 1027
    tokens_1xT = np.arange(40, dtype=np.int32)[None] * 17 % ids
    want_1xTxV = np.asarray(forward(m, params, tokens_1xT))
    for rows in ("tokenizer", 1536):
        out = str(tmp_path / str(rows))
        save_hf(m, params, out, tokenizer=tokenizer, dtype="float32", vocab_rows=rows)
        model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
        n = ids if rows == "tokenizer" else rows
        assert model.config.vocab_size == n
        with torch.no_grad():
            got_1xTxV = model(torch.tensor(tokens_1xT, dtype=torch.long)).logits.numpy()
        assert got_1xTxV.shape[-1] == n
        keep = min(n, m.vocab_size)
        np.testing.assert_allclose(got_1xTxV[..., :keep], want_1xTxV[..., :keep], atol=1e-4)
        assert not np.any(got_1xTxV[..., keep:])  # padded rows: zero logits
    with pytest.raises(ValueError, match="below the tokenizer's 1027 ids"):
        save_hf(m, params, str(tmp_path / "x"), tokenizer=tokenizer, vocab_rows=1000)
    with pytest.raises(ValueError, match="trimming needs the tokenizer"):
        save_hf(m, params, str(tmp_path / "y"), vocab_rows=1100)


def test_cli_errors_name_the_problem(trained_run, tmp_path, capsys):
    workdir = trained_run[0]
    for argv, message in [
        ([f"--workdir={workdir}", "--step=7"], f"--step=7: {workdir} has checkpoints at steps"),
        ([f"--workdir={tmp_path}"], "is neither a run directory"),
        ([f"--workdir={workdir}", "--vocab_rows=some"], "--vocab_rows='some'"),
        ([f"--workdir={workdir}", "--tokenizer=qwen2"], "the tokenizer has 151646 ids"),
    ]:
        with pytest.raises(SystemExit) as e:
            convert_main(["export", *argv, f"--out={tmp_path / 'out'}"])
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    with pytest.raises(SystemExit):
        convert_main(["import", f"--hf={tmp_path}", f"--out={tmp_path / 'ckpt'}"])
    assert "config.json does not exist" in capsys.readouterr().err


def test_out_may_be_neither_the_source_nor_a_run_directory(trained_run, tmp_path, capsys):
    workdir = trained_run[0]
    run_config = pathlib.Path(workdir, "config.json").read_text()
    src = str(tmp_path / "src")
    make_hf(src, "qwen2_tied")
    for argv, message in [
        (["export", f"--workdir={workdir}", f"--out={workdir}"],
         f"--out={workdir} is the --workdir it reads"),
        (["import", f"--hf={src}", f"--out={workdir}"],
         f"--out={workdir} is a jaxllm run directory (config.json + checkpoints/)"),
        (["import", f"--hf={src}", f"--out={src}/"], f"--out={src}/ is the --hf it reads"),
    ]:
        with pytest.raises(SystemExit) as e:
            convert_main(argv)
        assert e.value.code == 2 and message in capsys.readouterr().err, argv
    assert pathlib.Path(workdir, "config.json").read_text() == run_config
    assert not os.path.exists(os.path.join(workdir, "model.json"))


def test_a_run_directory_whose_config_json_is_not_a_runs_says_so(trained_run, exported,
                                                                  tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    for config_json, why in [(pathlib.Path(exported, "config.json").read_text(), "has no 'model'"),
                             ("{not json", "is not JSON")]:
        (run / "config.json").write_text(config_json)
        for main in (lambda: convert_main(["export", f"--workdir={run}",
                                           f"--out={tmp_path / 'out'}"]),
                     lambda: generate_main([f"--workdir={run}", "--prompt=x"])):
            with pytest.raises(SystemExit) as e:
                main()
            err = capsys.readouterr().err
            assert e.value.code == 2 and f"--workdir={run} is not a jaxllm run directory" in err
            assert why in err and len(err.splitlines()) == 1, err


def test_an_average_generates_and_exports_with_the_runs_tokenizer(trained_run, exported,
                                                                   tmp_path, capsys):
    # The average of one checkpoint is that checkpoint: everything must come back as it was.
    workdir = trained_run[0]
    avg, out = tmp_path / "avg", str(tmp_path / "hf")
    checkpoint_main(["average", f"--workdir={workdir}", "--last=1", f"--out={avg}"])
    printed = capsys.readouterr().out.splitlines()
    assert len(printed) == 1 and printed[0].startswith(
        f"averaged steps [{STEPS}] of {workdir} into {avg}")
    outputs = []
    for source in (workdir, avg):
        generate_main([f"--workdir={source}", "--prompt=def main(argv):", "--max_new_tokens=16"])
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    convert_main(["export", f"--workdir={avg}", f"--out={out}", "--dtype=float32"])
    assert_bitwise_equal(tensors(exported), tensors(out))
    for name in ("config.json", "vocab.json", "merges.txt", "tokenizer_config.json"):
        got, want = (pathlib.Path(d, name).read_text() for d in (out, exported))
        assert got == want, name  # the run's rope base, eos id and tokenizer


def test_python_api_names():
    import jaxllm
    import jaxllm.convert

    assert jaxllm.load_hf is load_hf and jaxllm.save_hf is save_hf
    assert callable(jaxllm.convert.import_hf) and callable(jaxllm.convert.export_checkpoint)


def test_import_reads_any_sharding_block_by_block(tmp_path):
    # Every param split on its first and last axes (head_dim included, which no rule shards):
    # the blocks that are not contiguous in the Hugging Face layout take the slow path.
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    make_hf(str(tmp_path), "qwen2_untied")
    _, whole = load_hf(str(tmp_path))
    mesh = Mesh(np.asarray(jax.devices()[:4]).reshape(2, 2), ("a", "b"))

    def split(x):
        spec = [None] * x.ndim
        spec[0] = "a" if x.shape[0] % 2 == 0 else None
        if x.ndim > 1 and x.shape[-1] % 2 == 0:
            spec[-1] = "b"
        return NamedSharding(mesh, PartitionSpec(*spec))

    _, sharded = load_hf(str(tmp_path), shardings=jax.tree.map(split, whole))
    assert sharded["layers"]["attn"]["q_proj"]["kernel"].sharding.spec == \
        PartitionSpec("a", None, None, "b")
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)),
                 sharded, whole)
