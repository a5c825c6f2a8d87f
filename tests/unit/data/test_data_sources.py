"""Tests of jaxllm.data sources: every format reads the same documents, splits, orders, and
the errors and warnings bad input gets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from jaxllm import data
from jaxllm.config.schema import ConfigError, base_config, data_source
from jaxllm.config.validate import validate
from jaxllm.data import formats, mixture, sources
from tests.helpers.data import (
    ByteTokenizer,
    make_config,
    take,
    write_docs,
    write_jsonl,
    write_parquet,
)

DOCS = [f"document {i}: " + "xyz" * (i % 7) for i in range(60)]


def write_array_record(path: Path, docs: list[np.ndarray], masks=None) -> str:
    from array_record.python.array_record_module import ArrayRecordWriter

    writer = ArrayRecordWriter(str(path), "group_size:1")
    for i, ids in enumerate(docs):
        writer.write(formats.encode_record(ids, None if masks is None else masks[i]))
    writer.close()
    return str(path)


def all_documents(source: sources.Source) -> list:
    return [source[i] for i in range(len(source))]


@pytest.fixture
def every_format(tmp_path) -> dict:
    """The same 60 documents as text files, jsonl, jsonl.gz (two files), parquet, arrayrecord."""
    tok = ByteTokenizer()
    half = len(DOCS) // 2
    records = [{"content": d, "n": i} for i, d in enumerate(DOCS)]
    (tmp_path / "gz").mkdir()
    write_jsonl(tmp_path / "gz" / "a.jsonl.gz", records[:half], gz=True)
    write_jsonl(tmp_path / "gz" / "b.jsonl.gz", records[half:], gz=True)
    ar = [np.asarray(tok.encode(d), np.int32) for d in DOCS]
    kw = dict(heldout_fraction=0.0)
    return {
        "text": data_source("text", write_docs(tmp_path / "t", DOCS), **kw),
        "jsonl": data_source("jsonl", write_jsonl(tmp_path / "d.jsonl", records),
                                        text_field="content", **kw),
        "jsonl_gz": data_source("jsonl", str(tmp_path / "gz"), text_field="content",
                                           **kw),
        "parquet": data_source("parquet", write_parquet(tmp_path / "d.parquet", DOCS),
                                          text_field="body", **kw),
        "arrayrecord": data_source(
            "arrayrecord", write_array_record(tmp_path / "d.array_record", ar), **kw),
    }


def test_every_format_reads_the_same_documents_each_epoch(every_format):
    tok = ByteTokenizer()
    for name, cfg in every_format.items():
        source = sources.open_source(cfg, "train", name, seed=5)
        assert len(source) == len(DOCS), name
        for epoch in range(2):  # each epoch is a permutation of all documents, a new one
            texts = [source[epoch * len(DOCS) + i] for i in range(len(DOCS))]
            texts = [t.text if isinstance(t, formats.Text) else tok.decode(t.ids) for t in texts]
            assert sorted(texts) == sorted(DOCS), name
            if epoch == 0:
                first = texts
        assert texts != first and texts != DOCS, name


def test_chunked_formats_read_a_chunk_at_a_time(every_format):
    source = sources.open_source(every_format["parquet"], "train", "p", seed=1)
    assert [c.records for c in source.chunks] == [16, 16, 16, 12]
    chunks = [source.locate(i)[0] for i in range(len(DOCS))]
    changes = sum(a != b for a, b in zip(chunks, chunks[1:], strict=False))
    assert changes == 3  # one row group after another, each in a seeded order


def test_batches_of_every_format_are_identical_for_the_same_order(every_format):
    # text and arrayrecord share the random-access order: the same batches, token for token.
    tok, got = ByteTokenizer(), {}
    for name in ("text", "arrayrecord"):
        cfg = make_config(seq_len=32, batch_size=2, sources={"s": every_format[name]},
                          mixture={"s": 1.0})
        got[name] = take(data.make_iterator(cfg, "pretrain", tok), 3)
    for a, b in zip(got["text"], got["arrayrecord"], strict=True):
        np.testing.assert_array_equal(a["inputs"], b["inputs"])


def test_permute_is_a_bijection():
    for n in (1, 2, 3, 7, 64, 1000):
        assert sorted(sources.permute(i, n, 42) for i in range(n)) == list(range(n))
    assert [sources.permute(i, 1000, 1) for i in range(10)] != list(range(10))


def test_mixture_is_a_bijection_onto_each_source():
    mix = mixture.Mixture([0.5, 0.3, 0.2], seed=3, block=1000)
    located = [mix.locate(k) for k in range(3000)]
    for s, share in enumerate([0.5, 0.3, 0.2]):
        local = sorted(i for src, i in located if src == s)
        assert local == list(range(int(3000 * share)))
    assert list(mixture.quotas([1.0, 1e-9], 1000)) == [999, 1]  # a tiny weight still shows


def test_heldout_fraction_splits_every_chunk(tmp_path):
    records = [{"text": f"r{i}"} for i in range(1000)]
    cfg = data_source("jsonl", write_jsonl(tmp_path / "x.jsonl", records),
                                 heldout_fraction=0.1)
    train = {t.text for t in all_documents(sources.open_source(cfg, "train", "x"))}
    heldout = {t.text for t in all_documents(sources.open_source(cfg, "heldout", "x"))}
    assert len(heldout) == 100 and len(train) == 900
    assert train | heldout == {r["text"] for r in records}
    # Every 10th record, at a phase the file's name picks.
    assert len({int(t[1:]) % 10 for t in heldout}) == 1


def test_heldout_path_and_stdlib_split(tmp_path):
    cfg = data_source("text", write_docs(tmp_path / "tr", ["a", "b", "c"]),
                                 heldout_path=write_docs(tmp_path / "ho", ["z"]))
    assert len(sources.open_source(cfg, "train", "x")) == 3
    assert all_documents(sources.open_source(cfg, "heldout", "x")) == [formats.Text("z")]
    stdlib = base_config().data.sources.stdlib
    train = sources.open_source(stdlib, "train", "stdlib")
    heldout = sources.open_source(stdlib, "heldout", "stdlib")
    train_files = {c.path for c, n in zip(train.chunks, train.counts, strict=True) if n}
    heldout_files = {c.path for c, n in zip(heldout.chunks, heldout.counts, strict=True) if n}
    assert train_files and heldout_files and not train_files & heldout_files
    assert all(p.endswith(".py") and "site-packages" not in p for p in train_files)
    assert 0.005 < len(heldout_files) / (len(train_files) + len(heldout_files)) < 0.05


def test_prompt_field_masks_the_prompt(tmp_path):
    tok = ByteTokenizer()
    path = write_jsonl(tmp_path / "sft.jsonl", [{"q": "AB", "a": "cd"}])
    cfg = data_source("jsonl", path, text_field="a", prompt_field="q",
                                 heldout_fraction=0.0)
    sequence = mixture.DocumentSequence([sources.open_source(cfg, "train", "sft")], [1.0], 0, tok)
    doc = sequence[0]
    assert tok.decode(doc.ids) == "ABcd"
    np.testing.assert_array_equal(doc.mask, [0, 0, 1, 1])


def test_arrayrecord_masks_and_tokenizer_check(tmp_path):
    ids, mask = np.array([5, 6, 7], np.int32), np.array([0, 1, 1], np.uint8)
    path = write_array_record(tmp_path / "m.array_record", [ids], [mask])
    cfg = data_source("arrayrecord", path, heldout_fraction=0.0)
    (doc,) = all_documents(sources.open_source(cfg, "train", "m"))
    np.testing.assert_array_equal(doc.ids, ids)
    np.testing.assert_array_equal(doc.mask, mask)
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"complete": True, "tokenizer": {"name": "qwen2", "vocab_size": 151646, "eos_id": 1}}))
    with pytest.raises(data.DataError, match="tokenized with 'qwen2'"):
        sources.open_source(cfg, "train", "m", tokenizer=ByteTokenizer())


@pytest.mark.parametrize("case, match", [
    ("missing", r"data.sources.s.path: '.*nothing.jsonl' does not exist"),
    ("empty_glob", r"data.sources.s.path: '.*\*.jsonl' matches no files"),
    ("bad_json", r"bad.jsonl line 2 is not valid JSON"),
    ("no_field", r"bad.jsonl line 1: field 'text' \(text_field\) is absent.*fields present: "
                 r"body"),
    ("parquet_column", r"d.parquet has no column 'text' \(text_field\); its columns: id, body"),
    ("not_parquet", r"bad.parquet is not a readable Parquet file"),
    ("not_arrayrecord", r"bad.array_record is not a readable ArrayRecord file"),
    ("corrupt_record", r"c.array_record record \d+ is corrupt"),
    ("bad_format", r"data.sources.s.format: 'csv' is not one of"),
])
def test_bad_input_errors_name_the_file_and_record(case, match, tmp_path):
    fmt, path = "jsonl", str(tmp_path / "bad.jsonl")
    if case == "missing":
        path = str(tmp_path / "nothing.jsonl")
    elif case == "empty_glob":
        path = str(tmp_path / "*.jsonl")
    elif case == "bad_json":
        (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\n{"text": oops}\n')
    elif case == "no_field":
        write_jsonl(tmp_path / "bad.jsonl", [{"body": "x"}])
    elif case == "parquet_column":
        fmt, path = "parquet", write_parquet(tmp_path / "d.parquet", ["x"])
    elif case in ("not_parquet", "not_arrayrecord"):
        fmt = case.removeprefix("not_")
        path = str(tmp_path / f"bad.{'parquet' if fmt == 'parquet' else 'array_record'}")
        Path(path).write_bytes(b"garbage" * 100)
    elif case == "corrupt_record":
        fmt = "arrayrecord"
        path = write_array_record(tmp_path / "c.array_record",
                                  [np.arange(i, dtype=np.int32) for i in range(300)])
        raw = bytearray(Path(path).read_bytes())
        raw[2000:2100] = bytes(b ^ 0xFF for b in raw[2000:2100])
        Path(path).write_bytes(bytes(raw))
    elif case == "bad_format":
        fmt = "csv"
    cfg = data_source(fmt, path, heldout_fraction=0.0)
    with pytest.raises(data.DataError, match=match):
        source = sources.open_source(cfg, "train", "s")
        all_documents(source)  # a corrupt record shows only when it is read


def test_a_later_stage_bad_source_fails_before_training(tmp_path):
    cfg = make_config()
    cfg.data.sources.late = data_source("text", str(tmp_path / "gone" / "*.txt"))
    cfg.stages.anneal.steps = 5
    cfg.stages.anneal.mixture = {"late": 1.0}
    with pytest.raises(data.DataError, match="data.sources.late.path"):
        data.make_iterator(cfg, "pretrain", ByteTokenizer())


def test_zero_weight_and_unused_source_warn(tmp_path, caplog):
    cfg = make_config()
    cfg.data.sources.spare = data_source("text", str(tmp_path))
    cfg.data.sources.off = data_source("text", str(tmp_path))
    cfg.stages.pretrain.mixture = {"stdlib": 1.0, "off": 0.0}
    with caplog.at_level(logging.WARNING):
        validate(cfg)
    assert "config.stages.pretrain.mixture.off: weight 0" in caplog.text
    assert "config.data.sources.spare: no stage's mixture uses it" in caplog.text
    cfg.data.sources.spare.format = "csv"
    with pytest.raises(ConfigError, match="data.sources.spare.format"):
        validate(cfg)
