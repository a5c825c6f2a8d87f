"""A stage's document sequence: its sources mixed by weight, deterministically from the seed.

Mixture. The sequence d_0, d_1, ... is cut into blocks of BLOCK documents. Each block holds
a fixed quota of every source (its weight × BLOCK, rounded by largest remainder, at least 1
for a positive weight) in a seeded random arrangement, new each block. So d_k's source and its
index in that source are pure functions of (seed, k), computed from one block, and the
observed proportions are the weights to within 1 / BLOCK over any whole block (stratified
sampling: less spread than independent draws).

Q: the slots of one block (BLOCK of them).

Document k, read and tokenized, is a `Document`: int32 ids and a uint8 loss mask or None
(every token trained on). EOS is not part of it; the packer adds it.
"""

from __future__ import annotations

import collections
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxllm.data.formats import DataError, Text, Tokens
from jaxllm.data.sources import Source

BLOCK = 1 << 16


@dataclass(frozen=True)
class Document:
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray | None  # uint8 [n]; None: all ones
    source: int  # index into the sequence's sources


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
        source_Q = np.random.default_rng([self.seed, m]).permutation(labels)
        rank_Q = np.empty(self.block, np.int64)
        for s in range(len(self.counts)):
            slots = np.flatnonzero(source_Q == s)
            rank_Q[slots] = np.arange(len(slots))
        with self._lock:
            self._blocks[m] = source_Q, rank_Q
            while len(self._blocks) > 8:
                self._blocks.popitem(last=False)
        return source_Q, rank_Q

    def locate(self, k: int) -> tuple[int, int]:
        if len(self.counts) == 1:
            return 0, k
        m, q = divmod(k, self.block)
        source_Q, rank_Q = self._arrangement(m)
        s = int(source_Q[q])
        return s, m * int(self.counts[s]) + int(rank_Q[q])


class DocumentSequence:
    """The endless, random-access documents of one stage; picklable for worker processes."""

    def __init__(self, sources: Sequence[Source], weights: Sequence[float], seed: int,
                 tokenizer: Any):
        self.sources, self.tokenizer = list(sources), tokenizer
        self.mixture = Mixture(weights, seed)

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.sources]

    def __getitem__(self, k: int) -> Document:
        s, i = self.mixture.locate(k)
        raw = self.sources[s][i]
        if isinstance(raw, Tokens):
            vocab = self.tokenizer.vocab_size
            if len(raw.ids) and (raw.ids.min() < 0 or raw.ids.max() >= vocab):
                chunk, record = self.sources[s].locate(i)
                raise DataError(f"data.sources.{self.names[s]}: "
                                f"{self.sources[s].chunks[chunk].path} record {record} has "
                                f"token ids outside [0, {vocab}) of the tokenizer")
            return Document(raw.ids, raw.mask, s)
        return self.tokenize(raw, s)

    def tokenize(self, text: Text, s: int) -> Document:
        ids = np.asarray(self.tokenizer.encode(text.text), np.int32)
        if not text.prompt:
            return Document(ids, None, s)
        prompt = np.asarray(self.tokenizer.encode(text.prompt), np.int32)
        mask = np.concatenate([np.zeros(len(prompt), np.uint8), np.ones(len(ids), np.uint8)])
        return Document(np.concatenate([prompt, ids]), mask, s)

