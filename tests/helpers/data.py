"""Fakes and files for the data pipeline's tests: a byte-level tokenizer (keeps them
independent of the real Qwen2 one), a small config, text/jsonl/parquet sources on disk, and
batches taken and compared.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np

from jaxllm.config.schema import base_config, data_source

KEYS = ("inputs", "targets", "segment_ids", "positions", "loss_mask")


class ByteTokenizer:
    """UTF-8 bytes as ids 0..255, EOS 256."""

    name = "bytes"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(int(i) for i in ids if i < 256).decode("utf-8", errors="replace")


def make_config(seq_len: int = 32, batch_size: int = 4, seed: int = 0, sources=None,
                mixture=None):
    cfg = base_config()
    if sources is not None:
        cfg.data.sources = sources
    cfg.stages.pretrain.update(seq_len=seq_len, batch_size=batch_size, steps=1)
    if mixture is not None:
        cfg.stages.pretrain.mixture = mixture
    cfg.seed = seed
    return cfg


def write_docs(folder: Path, docs: list[str]) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    for i, doc in enumerate(docs):
        (folder / f"doc{i:04d}.txt").write_text(doc)
    return str(folder / "*.txt")


def take(it, n: int) -> list[dict]:
    return [next(it) for _ in range(n)]


def assert_same(batches_a: list[dict], batches_b: list[dict]) -> None:
    assert len(batches_a) == len(batches_b)
    for a, b in zip(batches_a, batches_b, strict=True):
        for key in KEYS:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def two_text_sources(folder: Path, docs_per_source: int = 400) -> dict:
    """Sources "a" and "b" of 1 to 5 repeats of their own letter per document."""
    rng, sources = np.random.default_rng(0), {}
    for name in ("a", "b"):
        docs = [name * int(n) for n in rng.integers(1, 6, size=docs_per_source)]
        sources[name] = data_source("text", write_docs(folder / name, docs),
                                               heldout_fraction=0.0)
    return sources


def write_jsonl(path: Path, records: list, gz: bool = False) -> str:
    lines = "".join(json.dumps(r) + "\n" for r in records)
    if gz:
        with gzip.open(path, "wt") as f:
            f.write(lines)
    else:
        path.write_text(lines)
    return str(path)


def write_parquet(path: Path, texts: list[str], row_group_size: int = 16) -> str:
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"id": list(range(len(texts))), "body": texts}), path,
                   row_group_size=row_group_size)
    return str(path)
