"""A stage's document sequence: its sources mixed by weight, deterministically from the seed.

Mixture. The sequence d_0, d_1, ... is cut into blocks of BLOCK documents. Each block holds
a fixed quota of every source (its weight × BLOCK, rounded by largest remainder, at least 1
for a positive weight) in a seeded random arrangement, new each block. So d_k's source and its
index in that source are pure functions of (seed, k), computed from one block, and the
observed proportions are the weights to within 1 / BLOCK over any whole block (stratified
sampling: less spread than independent draws).

Dimension letters (docs/glossary.md): J the slots of one block (BLOCK of them).

Positions. A stage reads each source from where the stages before it left it (a `Position`):
the stage's j-th document of source s is that source's document `positions[s](j)`, so a
source's epochs and seeded orders run on across stages instead of restarting with each.
`Position.after` moves a position past what a stage's streams started (packing.py).

Document k, read and tokenized, is a `Document`: int32 ids and a uint8 loss mask or None
(every token trained on). EOS is not part of it; the packer adds it. A source's `long_docs`
(sources.py) marks it `dropped` (too short: the packer skips it, and it still counts as read)
or `align` (long: the packer starts it at a row's first token).
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxllm.data.chat import render_chat
from jaxllm.data.formats import Tokens
from jaxllm.data.records import Chat, DataError, Pair, Text
from jaxllm.data.sources import Source

BLOCK = 1 << 16


@dataclass(frozen=True)
class Position:
    """Where a stage begins one source: first the `pending` documents that an earlier stage
    placed but never started (see `after`), then documents start, start + 1, ... of the
    source's endless order (sources.py)."""

    start: int = 0
    pending: tuple[int, ...] = ()

    def __call__(self, j: int) -> int:
        """The source document that is this stage's j-th of the source."""
        return self.pending[j] if j < len(self.pending) else self.start + j - len(self.pending)

    def after(self, used: int, skipped: Sequence[int]) -> Position:
        """The position once a stage has started its documents 0..used-1 of the source
        except `skipped` (sorted): those come first next time, then the rest as before."""
        left = [self(j) for j in skipped] + list(self.pending[used:])
        return Position(self.start + max(0, used - len(self.pending)), tuple(left))

    def to_json(self) -> dict:
        return {"start": self.start, "pending": list(self.pending)}

    @classmethod
    def from_json(cls, state: dict) -> Position:
        return cls(int(state["start"]), tuple(int(p) for p in state["pending"]))


@dataclass(frozen=True)
class Document:
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray | None  # uint8 [n]; None: all ones
    source: int  # index into the sequence's sources
    dropped: bool = False  # shorter than the source's min_tokens: no tokens, not even EOS
    align: bool = False  # a long document that starts a row rather than be cut (packing.py)
    # A preference pair: ids[:split] are the chosen chat and its EOS, ids[split:] the rejected
    # one; packing keeps the two whole, in one row, as two documents.
    split: int = 0


def quotas(weights: Sequence[float], block: int = BLOCK) -> np.ndarray:
    """Documents per block of each source: largest remainder, at least 1 for weight > 0."""
    w = np.asarray(weights, np.float64)
    if len(w) == 0 or np.any(w <= 0) or len(w) > block:
        raise ValueError(f"mixture weights must be positive and at most {block}, got {weights}")
    exact = w / w.sum() * block
    counts = np.floor(exact).astype(np.int64)
    short = block - int(counts.sum())
    counts[np.argsort(-(exact - counts), kind="stable")[:short]] += 1
    while np.any(counts == 0):  # a tiny weight still gets a document per block
        counts[np.argmax(counts)] -= 1
        counts[np.argmin(counts)] += 1
    return counts


class Mixture:
    """k ↦ (source, index within that source), per the module docstring."""

    def __init__(self, weights: Sequence[float], seed: int, block: int = BLOCK):
        self.counts = quotas(weights, block)
        self.block, self.seed = block, seed
        self._blocks: collections.OrderedDict = collections.OrderedDict()
        self._lock = threading.Lock()

    def __getstate__(self) -> dict:
        return {"counts": self.counts, "block": self.block, "seed": self.seed}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._blocks, self._lock = collections.OrderedDict(), threading.Lock()

    def _arrangement(self, m: int) -> tuple[np.ndarray, np.ndarray]:
        """(source, rank among that source's documents in the block) of each slot of block m."""
        with self._lock:
            if m in self._blocks:
                self._blocks.move_to_end(m)
                return self._blocks[m]
        labels = np.repeat(np.arange(len(self.counts), dtype=np.int32), self.counts)
        source_J = np.random.default_rng([self.seed, m]).permutation(labels)
        rank_J = np.empty(self.block, np.int64)
        for s in range(len(self.counts)):
            slots = np.flatnonzero(source_J == s)
            rank_J[slots] = np.arange(len(slots))
        with self._lock:
            self._blocks[m] = source_J, rank_J
            while len(self._blocks) > 8:
                self._blocks.popitem(last=False)
        return source_J, rank_J

    def locate(self, k: int) -> tuple[int, int]:
        if len(self.counts) == 1:
            return 0, k
        m, q = divmod(k, self.block)
        source_J, rank_J = self._arrangement(m)
        s = int(source_J[q])
        return s, m * int(self.counts[s]) + int(rank_J[q])

    def counts_before(self, k: int) -> np.ndarray:
        """Documents of each source among d_0 .. d_{k-1}."""
        if len(self.counts) == 1:
            return np.array([k], np.int64)
        m, q = divmod(k, self.block)
        return m * self.counts + np.bincount(self._arrangement(m)[0][:q],
                                             minlength=len(self.counts))


class DocumentSequence:
    """The endless, random-access documents of one stage; picklable for worker processes."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], seed: int,
                 tokenizer: Any, positions: Sequence[Position] | None = None):
        self.sources, self.tokenizer = list(sources), tokenizer
        self.mixture = Mixture(weights, seed)
        self.positions = list(positions or [Position()] * len(self.sources))

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def source_index(self, k: int) -> tuple[int, int]:
        """(source, index in that source's endless order) of document k."""
        s, j = self.mixture.locate(k)
        return s, self.positions[s](j)

    def epochs(self, ks: Sequence[int]) -> dict[str, int]:
        """Each source's epoch: the newest among documents `ks` and where the stage began."""
        out = {name: p(0) // len(src)
               for name, p, src in zip(self.names, self.positions, self.sources, strict=True)}
        for k in ks:
            s, i = self.source_index(k)
            out[self.names[s]] = max(out[self.names[s]], i // len(self.sources[s]))
        return out

    def __getitem__(self, k: int) -> Document:
        s, i = self.source_index(k)
        raw = self.sources[s][i]
        if isinstance(raw, Tokens):
            vocab = self.tokenizer.vocab_size
            if len(raw.ids) and (raw.ids.min() < 0 or raw.ids.max() >= vocab):
                chunk, record = self.sources[s].locate(i)
                raise DataError(f"data.sources.{self.names[s]}: "
                                f"{self.sources[s].chunks[chunk].path} record {record} has "
                                f"token ids outside [0, {vocab}) of the tokenizer")
            doc = Document(raw.ids, raw.mask, s)
        else:
            doc = self.tokenize(raw, s)
        if doc.split:
            return doc
        long_docs = self.sources[s].long_docs
        if not long_docs.keeps(len(doc.ids), self.sources[s].seed, i):
            return Document(np.zeros(0, np.int32), None, s, dropped=True)
        if long_docs.aligns(len(doc.ids)):
            return Document(doc.ids, doc.mask, s, align=True)
        return doc

    def tokenize(self, text: Text | Chat | Pair, s: int) -> Document:
        if isinstance(text, Chat):
            return Document(*render_chat(text, self.tokenizer), s)
        if isinstance(text, Pair):
            (chosen, c_mask), (rejected, r_mask) = (render_chat(c, self.tokenizer)
                                                    for c in (text.chosen, text.rejected))
            eos = np.asarray([self.tokenizer.eos_id], np.int32)
            return Document(np.concatenate([chosen, eos, rejected]),
                            np.concatenate([c_mask, np.zeros(1, np.uint8), r_mask]), s,
                            align=True, split=len(chosen) + 1)
        ids = np.asarray(self.tokenizer.encode(text.text), np.int32)
        if not text.prompt:
            return Document(ids, None, s)
        prompt = np.asarray(self.tokenizer.encode(text.prompt), np.int32)
        mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(ids), np.uint8)])
        return Document(np.concatenate([prompt, ids]), mask, s)

