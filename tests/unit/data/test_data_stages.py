"""A source continues across stages: each stage reads it from where the stages before left
it, a source that runs out starts a new epoch, and resuming stays bit-for-bit exact.

B batch (rows), T sequence length, N documents of a source. The data-level tests read
stages with `make_iterator(..., positions=)` and `positions_after`, as the train loop does;
the end-to-end tests run `stages.run` on the smoke model.
"""

from __future__ import annotations

import os
import shutil

import numpy as np
import pytest

from jaxllm import data
from jaxllm.config.schema import data_source
from jaxllm.data import iterator as data_iterator
from jaxllm.data.iterator import positions_after
from jaxllm.data.mixture import Position
from jaxllm.train import stages
from tests.helpers.data import ByteTokenizer, make_config, write_docs
from tests.helpers.runs import by_step, pretrain_smoke

STAGES = (("pretrain", 4, 16, 2), ("long_context", 2, 24, 3), ("anneal", 3, 20, 3))  # B, T, steps


def stage_config(sources: dict, stages=STAGES, mixtures=None):
    cfg = make_config(sources=sources)
    for name, B, T, steps in stages:
        cfg.stages[name].update(batch_size=B, seq_len=T, steps=steps)
        cfg.stages[name].mixture = (mixtures or {}).get(name, {n: 1.0 for n in sources})
    return cfg


def visits(cfg, tok, stage_name: str, positions=None, steps=None):
    """The documents each stream started, in order: (batch, stream, first character) per
    start (every document here begins with a character of its own), with the final stats and
    data state. Each stream of a stage begins at a document's start, so its inputs split at
    EOS are whole documents, the last perhaps cut short."""
    stage = cfg.stages[stage_name]
    it = data.make_iterator(cfg, stage_name, tok, positions=positions)
    batches = [next(it) for _ in range(steps or stage.steps)]
    out = []
    for b in range(stage.batch_size):
        stream = np.concatenate([batch["inputs"][b] for batch in batches])
        starts = [0] + [i + 1 for i in np.flatnonzero(stream == tok.eos_id)]
        for start in starts:
            if start < len(stream):
                out.append((start // stage.seq_len, b, chr(stream[start])))
    stats, state = it.stats(), it.get_state()
    it.close()
    return out, stats, state


def run_stages(cfg, tok, stages=STAGES):
    """Every stage in order, positions carried; the visits of each and the last stats."""
    positions, per_stage, stats = {}, [], None
    for name, *_ in stages:
        seen, stats, state = visits(cfg, tok, name, positions)
        per_stage.append(seen)
        positions = positions_after(cfg, name, positions, state)
    return per_stage, stats, positions


def test_no_document_is_read_twice_before_every_one_is_read_once(tmp_path):
    # Equal lengths keep the streams in step, so within a stage documents start in source
    # order batch by batch (7 tokens a document: stages end mid-document and mid-batch).
    tok, N = ByteTokenizer(), 23
    docs = [chr(65 + i) * 6 for i in range(N)]
    cfg = stage_config({"s": data_source("text", write_docs(tmp_path, docs),
                                                    heldout_fraction=0.0)})
    per_stage, stats, positions = run_stages(cfg, tok)
    timeline = sorted(((stage, batch), text) for stage, seen in enumerate(per_stage)
                      for batch, _, text in seen)
    count: dict[str, int] = {}
    rounds: list[dict[str, tuple]] = []  # round r: document → when it was started the r-th time
    for when, name in timeline:
        r = count.get(name, 0)
        count[name] = r + 1
        if r == len(rounds):
            rounds.append({})
        rounds[r][name] = when
    assert len(rounds) == 3, "the stages read the source two and some times"
    for r in range(1, len(rounds)):
        assert len(rounds[r - 1]) == N
        assert min(rounds[r].values()) >= max(rounds[r - 1].values()), (
            f"a document was read a {r + 1}th time before every one was read {r} times")
    assert stats["epoch"] == {"s": 2}
    assert positions["s"].start > 2 * N
    # Pretraining ends with its streams at different documents: some were placed but not
    # started, and the next stage must read them first.
    assert positions_after(cfg, "pretrain", {}, visits(cfg, tok, "pretrain")[2])["s"].pending


def test_a_carried_stage_differs_from_a_fresh_one_only_in_what_it_has_read(tmp_path):
    tok = ByteTokenizer()
    rng = np.random.default_rng(0)
    docs = [chr(65 + i) + "x" * int(n) for i, n in enumerate(rng.integers(8, 30, size=40))]
    cfg = stage_config({"s": data_source("text", write_docs(tmp_path, docs),
                                                    heldout_fraction=0.0)})
    per_stage, _, _ = run_stages(cfg, tok)
    read = [text for seen in per_stage for _, _, text in seen]
    assert len(docs) / 3 < len(read) < len(docs)  # most of one pass over the source
    assert len(set(read)) == len(read), "a document was read twice within the first pass"
    fresh, _, _ = visits(cfg, tok, "long_context")
    assert {t for _, _, t in fresh} & {t for _, _, t in per_stage[0]}, (
        "without carried positions, long_context would re-read pretraining's documents")


def test_a_source_named_first_in_a_later_stage_starts_at_its_beginning(tmp_path):
    tok = ByteTokenizer()
    # Source a's 40 documents begin with "!".."H", b's 30 with "I".."f"; the three stages
    # read less than all of a.
    sources = {name: data_source(
        "text", write_docs(tmp_path / name, [chr(ord(first) + i) + name * (i % 5 + extra)
                                              for i in range(n)]), heldout_fraction=0.0)
        for name, first, n, extra in (("a", "!", 40, 10), ("b", "I", 30, 0))}
    cfg = stage_config(sources, mixtures={"pretrain": {"a": 1.0}, "long_context": {"a": 1.0},
                                          "anneal": {"a": 1.0, "b": 1.0}})
    per_stage, _, positions = run_stages(cfg, tok)
    fresh, _, _ = visits(cfg, tok, "anneal")  # every source at its start
    carried = per_stage[2]
    for stream in range(cfg.stages.anneal.batch_size):
        b_carried = [t for _, s, t in carried if s == stream and t >= "I"]
        b_fresh = [t for _, s, t in fresh if s == stream and t >= "I"]
        shorter = min(len(b_carried), len(b_fresh))
        assert shorter and b_carried[:shorter] == b_fresh[:shorter]
    a_before = {t for seen in per_stage[:2] for _, _, t in seen}
    assert not a_before & {t for _, _, t in carried if t < "I"}
    assert set(positions) == {"a", "b"}


def test_positions_after_counts_what_streams_started(monkeypatch, caplog):
    # B = 2 streams: stream 0 is inside document 6, stream 1 at the start of document 3.
    cfg = stage_config({"s": data_source("python_stdlib")}, stages=(
        ("pretrain", 2, 8, 1),))
    after = positions_after(cfg, "pretrain", {"s": Position(100, (7, 9))},
                            {"batch_size": 2, "rows": [0, 2], "streams": [[6, 5], [3, 0]]})
    # The stage's documents 0..7 are placed (0, 1 were the pending 7 and 9; j >= 2 is
    # 100 + j - 2); stream 1 did not start its 3, 5 and 7.
    assert after["s"] == Position(106, (101, 103, 105))
    # Past MAX_PENDING, the furthest unstarted documents wait for the next epoch.
    monkeypatch.setattr(data_iterator, "MAX_PENDING", 2)
    after = positions_after(cfg, "pretrain", {"s": Position(100, (7, 9))},
                            {"batch_size": 2, "rows": [0, 2], "streams": [[6, 5], [3, 0]]})
    assert after["s"] == Position(106, (101, 103))
    assert "1 documents that its streams placed but did not reach" in caplog.text
    with pytest.raises(ValueError, match="all 2 rows"):
        positions_after(cfg, "pretrain", {}, {"batch_size": 2, "rows": [0, 1],
                                              "streams": [[0, 0]]})


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def three_stage_run(tmp_path_factory):
    """The smoke model through all three stages on a small text source, a checkpoint every
    step and all kept, with a pass over the source ending in the anneal stage."""
    root = tmp_path_factory.mktemp("stages")
    rng = np.random.default_rng(1)
    words = ["alpha", "beta", "gamma", "delta", "omega", "sigma", "kappa", "theta"]
    docs = [" ".join(rng.choice(words, size=10)) + f" {i}" for i in range(60)]
    pattern = write_docs(root / "docs", docs)
    config = pretrain_smoke("checkpoint.every_steps=1", "checkpoint.keep=100",
                   "stages.long_context.steps=2", "stages.anneal.steps=2",
                   "stages.long_context.batch_size=8", "stages.anneal.batch_size=8")
    config.data.sources = {"small": data_source("text", pattern,
                                                           heldout_fraction=0.1)}
    for name in config.stages.keys():
        config.stages[name].mixture = {"small": 1.0}
    workdir = str(root / "run")
    stages.run(config, workdir)
    return config, workdir


def test_a_three_stage_run_reads_on_into_a_new_epoch(three_stage_run):
    _, workdir = three_stage_run
    records = by_step(workdir)
    epochs = {step: r["epoch"]["small"] for step, r in records.items()}
    assert epochs[6] == 0 and epochs[10] == 1, epochs  # anneal alone would still be in epoch 0


@pytest.mark.parametrize("resume_at", [6, 7], ids=["stage_boundary", "mid_stage"])
def test_resume_across_stages_is_bitwise_exact(three_stage_run, tmp_path, resume_at):
    config, workdir = three_stage_run
    copy = str(tmp_path / "run")
    shutil.copytree(workdir, copy)
    for step in os.listdir(os.path.join(copy, "checkpoints")):
        if step.isdigit() and int(step) > resume_at:
            shutil.rmtree(os.path.join(copy, "checkpoints", step))
    stages.run(config, copy)
    before, after = by_step(workdir), by_step(copy)
    assert sorted(after) == sorted(before) == list(range(1, 11))
    for step in range(resume_at + 1, 11):
        assert after[step]["loss"] == before[step]["loss"], step
        assert after[step]["epoch"] == before[step]["epoch"], step
