"""Long documents for the long_context stage: selecting them by token count (`min_tokens`,
`keep_short`) and packing them contiguously (`align_long`), with exact resume and process
shares as for every source; and the Qwen2 configs use it.

B batch (rows), T sequence length. Documents are bytes (test_data.ByteTokenizer): a long one is
"#<i>#" then its own letter, so where each of its tokens lands can be checked.
"""

from __future__ import annotations

import ml_collections as mc
import numpy as np
import pytest

from jaxllm import data
from jaxllm.config.load import load_config
from jaxllm.config.schema import ConfigError, base_config, data_source
from jaxllm.config.validate import validate
from jaxllm.data import iterator, packing
from tests.helpers.data import ByteTokenizer, assert_same, make_config, take, write_docs

T, B = 32, 4
TOK = ByteTokenizer()


def corpus(folder, n: int = 120) -> tuple[str, list[str]]:
    """Short documents of "s" (1..20 bytes) and long ones (60..150 bytes), mixed."""
    rng, docs = np.random.default_rng(0), []
    for i in range(n):
        if rng.random() < 0.4:
            body = chr(ord("A") + i % 26) * int(rng.integers(55, 145))
            docs.append(f"#{i:03d}#" + body)
        else:
            docs.append("s" * int(rng.integers(1, 21)))
    return write_docs(folder, docs), docs


def long_config(pattern: str, **long_docs) -> mc.ConfigDict:
    source = data_source("text", pattern, heldout_fraction=0.0, **long_docs)
    return make_config(seq_len=T, batch_size=B, sources={"docs": source},
                       mixture={"docs": 1.0})


def stream_tokens(batches: list[dict], b: int) -> list[int]:
    """Row b's input tokens, batch after batch."""
    return [t for batch in batches for t in batch["inputs"][b].tolist()]


def test_min_tokens_reads_only_long_documents(tmp_path):
    pattern, _ = corpus(tmp_path)
    batches = take(data.make_iterator(long_config(pattern, min_tokens=50), "pretrain", TOK), 8)
    tokens = np.concatenate([b["inputs"] for b in batches])
    assert not (tokens == ord("s")).any() and (tokens == ord("#")).any()
    sequence = iterator.document_sequence(long_config(pattern, min_tokens=50), "pretrain", TOK,
                                          "train")
    docs = [sequence[k] for k in range(60)]
    assert all(d.dropped == (len(d.ids) == 0) for d in docs)
    assert {len(d.ids) >= 50 for d in docs if not d.dropped} == {True}


def test_keep_short_keeps_a_seeded_share(tmp_path):
    pattern, _ = corpus(tmp_path, 400)
    cfg = long_config(pattern, min_tokens=50, keep_short=0.25)
    first = iterator.document_sequence(cfg, "pretrain", TOK, "train")
    again = iterator.document_sequence(cfg, "pretrain", TOK, "train")
    short = [k for k in range(400) if len(first.sources[0][first.source_index(k)[1]].text) < 50]
    kept = [not first[k].dropped for k in short]
    assert kept == [not again[k].dropped for k in short]  # every process and worker agrees
    assert 0.15 < np.mean(kept) < 0.35, np.mean(kept)


def test_aligned_long_documents_fill_consecutive_rows_from_their_start(tmp_path):
    pattern, docs = corpus(tmp_path)
    cfg = long_config(pattern, min_tokens=50, keep_short=1.0, align_long=True)
    batches = take(data.make_iterator(cfg, "pretrain", TOK), 30)
    by_header = {d[:5]: d.encode() for d in docs if d.startswith("#")}
    seen = 0
    for b in range(B):
        rows = [batch["inputs"][b] for batch in batches]
        for r, row in enumerate(rows):
            text = bytes(int(t) for t in row if t < 256)
            for header, doc in by_header.items():
                at = text.find(header.encode())
                if at < 0 or r + len(doc) // T + 1 > len(rows):
                    continue
                seen += 1
                assert row[0] == ord("#") and bytes(row[:5].tolist()) == header.encode(), \
                    "a long document starts a row"
                assert batches[r]["positions"][b][0] == 0
                # Its rows are windows [j·T, j·T + T] of the document, one after another.
                whole = np.concatenate(rows[r:r + len(doc) // T + 1])[:len(doc)]
                assert bytes(whole.tolist()) == doc
    assert seen >= 10
    pads = 0
    for batch in batches:  # padding before an aligned document is never trained on
        pad = batch["segment_ids"] == 0
        pads += pad.sum()
        assert (batch["loss_mask"][pad] == 0).all()
        assert ((batch["segment_ids"][:, 1:] == 0) <= (batch["loss_mask"][:, :-1] == 0)).all()
    assert pads > 0
    for batch in batches:  # a row is never a lone carried-over EOS and padding
        lone = (batch["inputs"][:, 0] == TOK.eos_id) & (batch["segment_ids"][:, 1:] == 0).all(1)
        assert not lone.any()


def test_exact_resume_and_process_shares_with_long_documents(tmp_path):
    pattern, _ = corpus(tmp_path)
    cfg = long_config(pattern, min_tokens=50, keep_short=0.3, align_long=True)
    it = data.make_iterator(cfg, "pretrain", TOK)
    take(it, 5)
    state = it.get_state()
    after = take(it, 6)
    resumed = data.make_iterator(cfg, "pretrain", TOK)
    resumed.set_state(state)
    assert_same(after, take(resumed, 6))
    whole = take(data.make_iterator(cfg, "pretrain", TOK), 6)
    halves = [take(data.make_iterator(cfg, "pretrain", TOK, process_index=p, process_count=2),
                   6) for p in range(2)]
    for i, batch in enumerate(whole):
        for key in batch:
            np.testing.assert_array_equal(
                batch[key], np.concatenate([halves[0][i][key], halves[1][i][key]]), key)


def test_without_the_options_nothing_changes(tmp_path):
    pattern, _ = corpus(tmp_path)
    plain = take(data.make_iterator(long_config(pattern), "pretrain", TOK), 4)
    cfg = long_config(pattern)
    for key in ("min_tokens", "keep_short", "align_long"):
        del cfg.data.sources.docs[key]  # a source written before these keys existed
    assert_same(plain, take(data.make_iterator(cfg, "pretrain", TOK), 4))


def test_a_source_with_no_long_document_fails_clearly(tmp_path, monkeypatch):
    pattern, _ = corpus(tmp_path)
    monkeypatch.setattr(packing, "_MAX_DROPPED", 50)
    it = data.make_iterator(long_config(pattern, min_tokens=10_000), "pretrain", TOK)
    with pytest.raises(data.DataError, match="min_tokens"):
        next(it)


def test_config_checks():
    cfg = base_config()
    cfg.data.sources.stdlib.keep_short = 0.5
    with pytest.raises(ConfigError, match="data.sources.stdlib.keep_short.*min_tokens"):
        validate(cfg)
    cfg.data.sources.stdlib.update(min_tokens=100, keep_short=1.5)
    with pytest.raises(ConfigError, match="data.sources.stdlib.keep_short"):
        validate(cfg)


@pytest.mark.parametrize("name", ["qwen2_0_5b", "qwen2_1_5b", "qwen2_7b", "qwen2_72b",
                                  "qwen2_57b_a14b"])
def test_every_qwen2_long_context_stage_reads_long_documents(name):
    cfg = load_config(f"configs/{name}.py")
    for stage in ("pretrain", "long_context", "anneal"):
        for source in cfg.stages[stage].mixture.keys():
            src = cfg.data.sources[source]
            long = src.get("min_tokens", 0) > 0 and src.get("align_long", False)
            assert long == (stage == "long_context"), (stage, source)
    tiny = load_config("configs/tiny.py")
    assert tiny.stages.long_context.mixture.to_dict() == {"stdlib": 1.0}
    assert tiny.data.sources.stdlib.min_tokens == 0


def test_a_dropped_closing_eos_never_leaves_a_row_short():
    """Row 1 is document 0 exactly, so row 2 would start with its closing EOS alone; the
    aligned document after it drops that EOS and, only 4 tokens long, leaves row 2 one token
    short unless one more document was loaded: row 2 is document 1 then document 2's first
    token."""
    from jaxllm.data import loader, mixture

    docs = [([1, 2, 3, 4], False), ([5, 6, 7], True), ([12, 13], False)]

    def load(k):
        ids, align = docs[k]
        return mixture.Document(np.asarray(ids, np.int32), None, 0, align=align)

    it = packing.StripedBatchIterator(loader.ThreadLoader(load), 1, seq_len=4, eos_id=0,
                                      num_documents=len(docs))
    first, second = next(it), next(it)
    np.testing.assert_array_equal(first["inputs"], [[1, 2, 3, 4]])
    np.testing.assert_array_equal(second["inputs"], [[5, 6, 7, 0]])
    np.testing.assert_array_equal(second["targets"], [[6, 7, 0, 12]])
    np.testing.assert_array_equal(second["positions"], [[0, 1, 2, 3]])
