"""`python -m jaxllm.data.prepare`: shards and manifest, restart without duplicates, errors."""

from __future__ import annotations

import collections
import json
import os

import numpy as np
import pytest

from jaxllm.config.schema import data_source
from jaxllm.data import formats, prepare, sources
from jaxllm.data.tokenizer import load_tokenizer
from tests.helpers.data import write_jsonl, write_parquet

MAX_RANK = 1024


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("qwen2", max_rank=MAX_RANK)


def make_inputs(folder) -> list[str]:
    """30 documents: a plain jsonl file, a gzipped one, a text file and a Parquet file."""
    folder.mkdir()
    texts = [f"document {i}: " + "lorem ipsum " * (i % 9) for i in range(30)]
    write_jsonl(folder / "a.jsonl", [{"text": t} for t in texts[:12]])
    write_jsonl(folder / "b.jsonl.gz", [{"text": t} for t in texts[12:20]], gz=True)
    (folder / "c.txt").write_text(texts[20])
    write_parquet(folder / "d.parquet", texts[21:], row_group_size=4)
    # The parquet writer's column is "body": one field name for all, as the CLI takes.
    return texts


def read_all(out) -> list[tuple[int, ...]]:
    cfg = data_source("arrayrecord", str(out), heldout_fraction=0.0)
    source = sources.open_source(cfg, "train", "prepared")
    return [tuple(source[i].ids.tolist()) for i in range(len(source))]


def run(inp, out, **kw):
    kw = {"text_field": "text", "max_rank": MAX_RANK, "workers": 1, "shard_mb": 0.0002,
          "progress": False, **kw}
    return prepare.prepare(str(inp), str(out), **kw)


def test_prepare_writes_shards_and_a_manifest(tmp_path, tok):
    texts = make_inputs(tmp_path / "in")
    os.remove(tmp_path / "in" / "d.parquet")  # parquet has its own test below
    manifest = run(tmp_path / "in", tmp_path / "out")
    assert manifest["complete"] and manifest["documents"] == 21
    shards = manifest["shards"]
    assert len(shards) > 2  # the 200-byte units cut the jsonl file by byte ranges
    assert sum(s["documents"] for s in shards.values()) == 21
    assert manifest["tokens"] == sum(len(tok.encode(t)) for t in texts[:21])
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["shards"] == shards and on_disk["tokenizer"]["vocab_size"] == tok.vocab_size
    got = collections.Counter(read_all(tmp_path / "out"))
    assert got == collections.Counter(tuple(tok.encode(t)) for t in texts[:21])


def test_parquet_and_prompt_masks(tmp_path, tok):
    (tmp_path / "in").mkdir()
    write_parquet(tmp_path / "in" / "d.parquet", ["x y", "z"], row_group_size=1)
    manifest = run(tmp_path / "in", tmp_path / "p", text_field="body")
    assert manifest["documents"] == 2
    write_jsonl(tmp_path / "sft.jsonl", [{"q": "Why?", "a": "Because."}])
    run(tmp_path / "sft.jsonl", tmp_path / "s", text_field="a", prompt_field="q")
    cfg = data_source("arrayrecord", str(tmp_path / "s"), heldout_fraction=0.0)
    doc = sources.open_source(cfg, "train", "s", tokenizer=tok)[0]
    prompt, answer = tok.encode("Why?"), tok.encode("Because.")
    assert doc.ids.tolist() == prompt + answer
    assert doc.mask.tolist() == [0] * len(prompt) + [1] * len(answer)


def test_an_interrupted_run_continues_without_duplicates(tmp_path, tok):
    texts = make_inputs(tmp_path / "in")
    os.remove(tmp_path / "in" / "d.parquet")
    out = tmp_path / "out"
    first = run(tmp_path / "in", out, max_units=2)  # as if killed after two shards
    assert not first["complete"] and len(first["shards"]) == 2
    name = sorted(first["shards"])[0].replace("00000", "00003", 1)
    (out / (name + ".tmp")).write_bytes(b"half-written")  # killed while writing
    cfg = data_source("arrayrecord", str(out))
    with pytest.raises(formats.DataError, match="did not finish"):
        sources.open_source(cfg, "train", "x", tokenizer=tok)
    done = {name: os.stat(out / name).st_mtime_ns for name in first["shards"]}
    second = run(tmp_path / "in", out)
    assert second["complete"] and second["run"]["shards"] == len(second["shards"]) - 2
    assert {name: os.stat(out / name).st_mtime_ns for name in done} == done  # not redone
    got = collections.Counter(read_all(out))
    assert got == collections.Counter(tuple(tok.encode(t)) for t in texts[:21])
    assert run(tmp_path / "in", out)["run"]["shards"] == 0  # finished: nothing to do
    (tmp_path / "in" / "c.txt").write_text("changed")
    with pytest.raises(formats.DataError, match="holds shards of other inputs"):
        run(tmp_path / "in", out)


def test_a_run_that_failed_before_its_first_shard_can_be_rerun_with_other_options(tmp_path,
                                                                                  tok):
    texts = make_inputs(tmp_path / "in")
    os.remove(tmp_path / "in" / "d.parquet")
    out = tmp_path / "out"
    with pytest.raises(formats.DataError, match="field 'body' .* is absent"):
        run(tmp_path / "in", out, text_field="body")  # a.jsonl's field is "text"
    assert (out / "manifest.json").exists()
    assert any(name.endswith(".tmp") for name in os.listdir(out))  # the shard it stopped in
    manifest = run(tmp_path / "in", out)  # the corrected command, the same --out
    assert manifest["complete"] and manifest["documents"] == 21
    assert not any(name.endswith(".tmp") for name in os.listdir(out))
    got = collections.Counter(read_all(out))
    assert got == collections.Counter(tuple(tok.encode(t)) for t in texts[:21])


def test_bad_input_names_file_and_line(tmp_path, capsys):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "x.jsonl").write_text('{"text": "a"}\n\n{"txt": "b"}\n')
    with pytest.raises(SystemExit) as e:
        prepare.main([f"--input={tmp_path / 'in'}", f"--out={tmp_path / 'out'}",
                      f"--max_rank={MAX_RANK}", "--workers=1"])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "x.jsonl line 3: field 'text' (text_field) is absent" in err
    with pytest.raises(SystemExit) as e:
        prepare.main([f"--input={tmp_path / 'none*'}", f"--out={tmp_path / 'o2'}"])
    assert e.value.code == 2
    assert "matches no files" in capsys.readouterr().err


def test_cli_prints_the_rate(tmp_path, capsys):
    make_inputs(tmp_path / "in")
    prepare.main([f"--input={tmp_path / 'in' / '*.jsonl'}", f"--out={tmp_path / 'o'}",
                  f"--max_rank={MAX_RANK}", "--workers=2"])
    out = capsys.readouterr().out
    assert "12 documents" in out and "MB/s" in out
    assert np.isfinite(float(out.split("=")[-1].split()[0]))
