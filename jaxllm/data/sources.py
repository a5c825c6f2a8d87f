"""One data source: its documents, the train / held-out split, and a seeded order per epoch.

Split. With `heldout_path` set, that path is the held-out part and `path` is all training data.
Otherwise every M-th record of each chunk is held out, M = round(1 / heldout_fraction), at a
phase that a stable hash of the chunk's relative path picks: a one-document chunk (a text
file) is held out with probability 1/M, a chunk of many records gives exactly its share, and
adding files never moves a record from one split to the other.

Order. Document i of a split (i = 0, 1, ... without end; epoch e = i // N of N documents) is
  random-access formats (text, arrayrecord): a seeded permutation of all N documents, new
      each epoch;
  chunked formats (jsonl, parquet): the chunks in a seeded order, new each epoch, and the
      records of each chunk in a seeded order, so reading keeps to a few loaded chunks.
Both are pure functions of (seed, i): a position in the source is one integer.

Long documents. A source with `min_tokens` (a long-context stage's) keeps its order and its
positions; a document shorter than that is dropped when it is read (`LongDocs.keeps`), unless
a seeded draw keeps it (`keep_short`). Nothing needs an index of lengths up front, at the cost
of reading the dropped documents.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxllm.data import formats, records
from jaxllm.data.formats import Chunk, DataError, Text, Tokens

SPLITS = ("train", "heldout")
DEFAULT_HELDOUT_FRACTION = 0.02


@dataclass(frozen=True)
class LongDocs:
    """Which documents a source gives and how they are packed (config.data_source): with
    `min_tokens` > 0, documents of fewer tokens are dropped, except a `keep_short` share of
    them; with `align_long`, a document of at least `min_tokens` tokens that does not fit in
    the rest of a row starts the next one (packing.py)."""

    min_tokens: int = 0
    keep_short: float = 0.0
    align_long: bool = False

    def keeps(self, num_tokens: int, seed: int, i: int) -> bool:
        """Whether the source's document i (in its endless order) of `num_tokens` is read:
        the draw is a pure function of (seed, i), so every process and worker agrees."""
        if num_tokens >= self.min_tokens:
            return True
        return mix(seed, i, 0x10C) < self.keep_short * 2.0**64

    def aligns(self, num_tokens: int) -> bool:
        return self.align_long and num_tokens >= self.min_tokens


class EmptySplitError(DataError):
    """A source has documents, but none of them fall in the requested split."""


def mix(*parts: int) -> int:
    """A 64-bit hash of integers (splitmix64 steps): seeds from seeds, without np.random."""
    x = 0x9E3779B97F4A7C15
    for part in parts:
        x = (x ^ (int(part) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x


def stable_hash(text: str) -> int:
    """Not Python's salted hash(): every process and every run agrees."""
    return int.from_bytes(hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest(), "big")


def permute(index: int, n: int, seed: int) -> int:
    """A seeded bijection of range(n): a 4-round Feistel network with cycle walking."""
    if n <= 1:
        return 0
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    mask = (1 << half) - 1
    while True:  # the domain is < 4n, so the expected number of walks is under 4
        left, right = index >> half, index & mask
        for r in range(4):
            left, right = right, left ^ (mix(seed, r, right) & mask)
        index = (left << half) | right
        if index < n:
            return index


def _get(cfg: Mapping[str, Any] | Any, key: str, default: Any) -> Any:
    try:
        value = cfg[key]
    except (KeyError, AttributeError):
        return default
    return default if value is None else value


class Source:
    """The documents of one split of one source: `len()` per epoch, `source[i]` for any i.
    `long_docs` selects and aligns long ones; the mixture applies it once documents are
    tokenized (their length is known only then)."""

    long_docs = LongDocs()

    def __init__(self, name: str, fmt: str, chunks: list[Chunk], split: str, period: int,
                 fields: tuple[str, ...], seed: int):
        self.name, self.fmt, self.split, self.seed = name, fmt, split, seed
        self.period = period  # M; 0: the whole chunk is in this split
        self.chunks = chunks
        self.phase = np.array([stable_hash(c.key) % period if period else 0 for c in chunks],
                              np.int64)
        records = np.array([c.records for c in chunks], np.int64)
        heldout = (self.phase + records) // period if period else np.zeros_like(records)
        self.counts = heldout if split == "heldout" and period else records - heldout
        self.ends = np.cumsum(self.counts)  # documents in chunks 0..c
        self.reader = formats.Reader(fmt, fields, f"data.sources.{name}")
        self.__setstate__(self.__dict__.copy())

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("_lock", "_epoch_orders")}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()
        self._epoch_orders: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def _record(self, c: int, t: int) -> int:
        """Record of chunk c that is the split's t-th there (see the module docstring)."""
        if not self.period:
            return t
        M, o = self.period, int(self.phase[c])
        if self.split == "heldout":  # x = j + o runs over M - 1, 2M - 1, ...
            return t * M + M - 1 - o
        x = t + o  # the (t + o)-th x that is not M - 1 mod M; x < o are all such
        return x + x // (M - 1) - o

    def _epoch_order(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """The chunks in epoch order, and the documents up to and including each."""
        with self._lock:
            if epoch not in self._epoch_orders:
                if len(self._epoch_orders) > 2:  # streams span an epoch boundary, not three
                    self._epoch_orders.clear()
                order = np.random.default_rng([self.seed, epoch, 1]).permutation(len(self.chunks))
                self._epoch_orders[epoch] = order, np.cumsum(self.counts[order])
            return self._epoch_orders[epoch]

    def locate(self, i: int) -> tuple[int, int]:
        """(chunk, record) of document i."""
        n = len(self)
        epoch, r = divmod(i, n)
        if self.fmt in formats.RANDOM_ACCESS:
            g = permute(r, n, mix(self.seed, epoch))
            c = int(np.searchsorted(self.ends, g, side="right"))
            t = g - (int(self.ends[c - 1]) if c else 0)
        else:
            order, ends = self._epoch_order(epoch)
            p = int(np.searchsorted(ends, r, side="right"))
            c = int(order[p])
            q = r - (int(ends[p - 1]) if p else 0)
            t = permute(q, int(self.counts[c]), mix(self.seed, epoch, c))
        return c, self._record(c, t)

    def __getitem__(self, i: int) -> Text | Tokens:
        c, record = self.locate(i)
        return self.reader.read(self.chunks[c], record)


def open_source(source_cfg: Mapping[str, Any], split: str, name: str, seed: int = 0,
                tokenizer: Any = None) -> Source:
    """Lists, scans and checks one source's split; raises DataError naming what is wrong.

    Nothing but metadata is read, except jsonl files, which are parsed whole to count and
    check their records (prepare them into ArrayRecord shards to skip that at scale).
    """
    where = f"data.sources.{name}"
    if split not in SPLITS:
        raise DataError(f"split {split!r} is not one of {', '.join(map(repr, SPLITS))}")
    fmt = _get(source_cfg, "format", "python_stdlib")
    if fmt not in formats.FORMATS:
        raise DataError(f"{where}.format: {fmt!r} is not one of "
                        f"{', '.join(map(repr, formats.FORMATS))}")
    fields = (_get(source_cfg, "text_field", "text"), _get(source_cfg, "prompt_field", ""))
    if _get(source_cfg, "chat", False):
        fields = records.CHAT_FIELDS
    if _get(source_cfg, "pairs", False):
        fields = records.PAIR_FIELDS
    if fmt not in ("jsonl", "parquet"):
        fields = ("", "")
    heldout_path = _get(source_cfg, "heldout_path", "")
    fraction = float(_get(source_cfg, "heldout_fraction", DEFAULT_HELDOUT_FRACTION))
    path, key, period = _get(source_cfg, "path", ""), f"{where}.path", 0
    if heldout_path and split == "heldout":
        path, key = heldout_path, f"{where}.heldout_path"
    elif not heldout_path:
        if not 0 <= fraction <= 0.5:
            raise DataError(f"{where}.heldout_fraction: {fraction} is outside [0, 0.5]")
        if fraction > 0:
            period = max(2, round(1 / fraction))
        elif split == "heldout":
            raise EmptySplitError(f"{where}: heldout_fraction is 0 and no heldout_path is set, "
                                  "so it has no held-out documents")
    files = formats.list_files(fmt, path, key)
    chunks = formats.scan(fmt, files, fields, where)
    if fmt == "arrayrecord" and tokenizer is not None:
        check_manifest(sorted({os.path.dirname(c.path) for c in chunks}), tokenizer, where)
    source = Source(name, fmt, chunks, split, period, fields, seed)
    long_docs = LongDocs(int(_get(source_cfg, "min_tokens", 0)),
                         float(_get(source_cfg, "keep_short", 0.0)),
                         bool(_get(source_cfg, "align_long", False)))
    if long_docs != LongDocs():
        source.long_docs = long_docs
    if not len(source):
        raise EmptySplitError(f"{where}: the {split!r} split of {path or formats.stdlib_root()!r}"
                              f" is empty ({sum(c.records for c in chunks)} records in "
                              f"{len(files)} files, heldout_fraction={fraction})")
    return source


def check_manifest(folders: list[str], tokenizer: Any, where: str) -> None:
    """Pre-tokenized shards must come from the tokenizer the model trains with."""
    for folder in folders:
        path = os.path.join(folder, "manifest.json")
        if not os.path.exists(path):
            continue
        try:
            with open(path) as f:
                manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise DataError(f"{where}: cannot read {path}: {e}") from None
        made_with = manifest.get("tokenizer", {})
        ours = {"vocab_size": tokenizer.vocab_size, "eos_id": tokenizer.eos_id}
        theirs = {k: made_with.get(k) for k in ours}
        if theirs != ours:
            raise DataError(f"{where}: the shards in {folder} were tokenized with "
                            f"{made_with.get('name')!r} {theirs}, but training uses "
                            f"{getattr(tokenizer, 'name', '?')!r} {ours}; prepare them again "
                            "with this tokenizer (--tokenizer, --max_rank)")
        if not manifest.get("complete", False):
            raise DataError(f"{where}: {path} says its prepare run did not finish; run "
                            "python -m jaxllm.data.prepare again with the same flags")
