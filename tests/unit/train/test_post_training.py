"""Chat SFT and DPO stages in one run (tests/helpers/chat_config.py: pretrain → long_context →
anneal → sft → dpo on the conversations and pairs that ship with jaxllm): what each stage
trains on, DPO's start against its own starting weights, the export's chat template, the
one-line errors of bad settings, an SFT and a DPO step on 8 devices against one, the steps
compiled for a v5p slice, and what `plan` counts."""

from __future__ import annotations

import json
import math
import os

import jax
import numpy as np
import pytest

CHAT_CONFIG = "tests/helpers/chat_config.py"


def chat_config(*overrides: str):
    from jaxllm.config.load import load_config

    return load_config(CHAT_CONFIG, ["checkpoint.async=False", *overrides])


@pytest.fixture(scope="module")
def chat_run(tmp_path_factory):
    from jaxllm.train import stages
    from tests.helpers.runs import by_step, records

    workdir = str(tmp_path_factory.mktemp("chat") / "run")
    stages.run(chat_config(), workdir)
    evals = {r["step"]: r for r in records(workdir) if "eval_loss" in r}
    return workdir, by_step(workdir), evals


def test_sft_learns_the_replies_and_dpo_starts_at_log_2(chat_run):
    workdir, records, evals = chat_run
    assert [records[s]["stage"] for s in (8, 9, 12, 13, 16)] == [
        "anneal", "sft", "sft", "dpo", "dpo"]
    assert records[12]["loss"] < records[9]["loss"]
    # At a dpo stage's first step the policy is its reference: every margin is 0.
    first = records[13]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert first["reward_margin"] == pytest.approx(0, abs=1e-6)
    assert first["chosen_reward"] == pytest.approx(0, abs=1e-6)
    for key in ("chosen_logp", "rejected_logp", "reward_accuracy"):
        assert np.isfinite(first[key]), key
    assert records[16]["reward_margin"] > 0  # the policy has moved towards the chosen replies
    assert set(evals[16]) >= {"eval_loss", "eval_reward_accuracy", "eval_reward_margin"}
    assert os.path.exists(os.path.join(workdir, "references", "dpo", "model.json"))


def test_the_export_renders_chats_as_fine_tuning_saw_them(chat_run, tmp_path):
    transformers = pytest.importorskip("transformers")
    from jaxllm.convert.__main__ import main as convert
    from jaxllm.data.chat import render_text
    from jaxllm.data.records import CHAT_FIELDS, chat_of

    workdir, _, _ = chat_run
    convert(["export", f"--workdir={workdir}", f"--out={tmp_path / 'hf'}"])
    with open(tmp_path / "hf" / "tokenizer_config.json") as f:
        assert "chat_template" in json.load(f)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path / "hf"))
    with open(os.path.join(os.path.dirname(__import__("jaxllm").__file__), "data", "examples",
                           "chat.jsonl")) as f:
        records = [json.loads(line) for line in f.readlines()[:5]]
    for record in records:
        expected = render_text(chat_of(record, CHAT_FIELDS, "chat.jsonl"))
        assert hf.apply_chat_template(record["messages"], tokenize=False) == expected


def test_bad_post_training_settings_stop_before_compiling_with_one_line(tmp_path):
    from jaxllm.config.schema import ConfigError
    from jaxllm.train import stages

    def mixed(stage: str, source: str):
        config = chat_config()
        config.stages[stage].mixture[source] = 1.0
        return config

    with pytest.raises(ConfigError, match=r"^config.stages.dpo.mixture: a dpo stage learns "
                       "from preference pairs, but source 'chat' has none"):
        stages.run(mixed("dpo", "chat"), str(tmp_path / "a"))
    with pytest.raises(ConfigError, match=r"^config.stages.sft.mixture: source 'pairs' holds "
                       "preference pairs, which only a dpo stage learns from"):
        stages.run(mixed("sft", "pairs"), str(tmp_path / "b"))
    with pytest.raises(ConfigError, match=r"^config.dpo.reference=.*: no such directory"):
        stages.run(chat_config(f"dpo.reference={tmp_path / 'nowhere'}"), str(tmp_path / "c"))
    assert not os.path.exists(tmp_path / "c" / "checkpoints")


def test_a_reference_with_another_tokenizer_is_refused_before_compiling(chat_run, tmp_path):
    from jaxllm.config.schema import ConfigError
    from jaxllm.train import stages

    workdir, _, _ = chat_run
    config = chat_config("tokenizer.max_rank=512", "model.vocab_size=640",
                         f"dpo.reference={workdir}")
    with pytest.raises(ConfigError, match="the reference's tokenizer .* is not this run's"):
        stages.run(config, str(tmp_path / "a"))
    assert not os.path.exists(tmp_path / "a" / "checkpoints")


@pytest.mark.parametrize("stage", ["sft", "dpo"])
def test_an_sft_and_a_dpo_step_on_8_devices_equal_one_device(chat_run, stage):
    """The same step (a dpo step's policy and reference sharded alike) on one device and on
    data 2 × fsdp 2 × tensor 2: the same loss, gradient norm and (dpo) rewards."""
    from jaxllm.data import make_iterator
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.parallel import sharding
    from jaxllm.train.loop import stage_steps, to_global
    from jaxllm.train.stages import init_train_state, stage_model_config, stage_spans
    from jaxllm.train.teacher import load_frozen, load_reference
    from tests.helpers.runs import mesh_of

    workdir, _, _ = chat_run
    config = chat_config(f"dpo.reference={workdir}")
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    data = make_iterator(config, stage, tokenizer)
    batch = next(data)
    data.close()
    span = {s.name: s for s in stage_spans(config)}[stage]
    model_cfg = stage_model_config(config, stage)
    results = []
    for sizes in ({}, dict(data=2, fsdp=2, tensor=2)):
        mesh = mesh_of(**sizes)
        with sharding.use_mesh(mesh):
            state, state_sh = init_train_state(config, mesh)
            preference, frozen = None, ()
            if stage == "dpo":
                given = load_frozen(workdir, "config.dpo.reference", mesh, tokenizer)
                preference, reference = load_reference(config, workdir, "dpo", model_cfg, None,
                                                       False, None, given)
                frozen = (reference,)
            train_step, _, order = stage_steps(config, span, model_cfg, mesh, state_sh,
                                               preference=preference)
            _, metrics = train_step(state, to_global(batch, sharding.batch_sharding(mesh), order),
                                    *frozen)
            results.append(jax.device_get(metrics))
    one, eight = results
    keys = ("loss", "grad_norm") + (("reward_margin", "chosen_logp") if stage == "dpo" else ())
    for key in keys:
        np.testing.assert_allclose(eight[key], one[key], rtol=2e-5, err_msg=key)


def test_distill_sft_and_dpo_steps_compile_for_a_v5p_slice(chat_run):
    """Each post-training step, Pallas attention, compiled for v5p-8 (4 chips): Mosaic kernels,
    and in the dpo step more of them than in the sft step of the same shape (the reference's
    forward pass beside the policy's), as in the distill step the teacher's."""
    pytest.importorskip("libtpu", reason="libtpu not installed (pip install '.[aot]')")
    from jaxllm.compile.program import compile_stages
    from jaxllm.compile.targets import compile_only_devices, parse_target

    workdir, _, _ = chat_run
    config = chat_config("model.attention_impl=pallas", "stages.pretrain.objective=distill",
                         f"distill.teacher={workdir}", "stages.pretrain.seq_len=256")
    target = parse_target("v5p-8")
    reports = {r.stage: r for r in compile_stages(
        config, compile_only_devices(target), target.device_memory,
        ["pretrain", "anneal", "sft", "dpo"], eval_step=False)}
    assert all(r.fits and r.kernels["mosaic"] for r in reports.values()), reports
    assert reports["dpo"].kernels["mosaic"] > reports["sft"].kernels["mosaic"]
    assert reports["pretrain"].kernels["mosaic"] > reports["anneal"].kernels["mosaic"]


def test_plan_counts_the_teacher_and_the_reference(chat_run):
    """`plan` adds a distill stage's teacher and a dpo stage's reference: their params per
    device and their final hidden states (here on one device, the same model as the run's)."""
    from jaxllm.plan import make_plan

    workdir, _, _ = chat_run
    config = chat_config("stages.pretrain.objective=distill", f"distill.teacher={workdir}")
    plan = make_plan(config, 1)
    params = plan["bytes_per_device"]["params"]
    for name in ("pretrain", "dpo"):
        s = config.stages[name]
        hidden = s.batch_size * s.seq_len * config.model.hidden_size * 4
        assert plan["stages"][name]["frozen_model_bytes"] == params + hidden, name
    assert "frozen_model_bytes" not in plan["stages"]["sft"]


def test_the_spike_check_starts_afresh_with_each_stage(tmp_path):
    """With the spike check on, an lm stage after a dpo stage (losses near 7 after losses
    below 1) trains: a stage's first steps are not measured against the last stage's."""
    from jaxllm.config.schema import stage
    from jaxllm.train import stages
    from tests.helpers.runs import train_records

    config = chat_config("bad_steps.spike_factor=2.0", *(f"stages.{s}.steps=0" for s in (
        "pretrain", "long_context", "anneal", "sft")))
    config.stages.again = stage(3, 64, 8, 1e6, 1e-3, 1e-3, 0, "constant")
    stages.run(config, str(tmp_path / "run"))
    records = train_records(tmp_path / "run")
    assert [r["stage"] for r in records] == ["dpo"] * 4 + ["again"] * 3
    assert not any(r["skipped"] for r in records)
    assert records[4]["loss"] > 2 * records[3]["loss"]  # what the old average would have refused
