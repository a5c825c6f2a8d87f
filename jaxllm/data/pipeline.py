"""Deterministic, checkpointable training batches: documents → tokens → mixture → packed rows.

B batch (rows per batch, config.stages.<stage>.batch_size), T sequence length (.seq_len).

Per source: `MapDataset.source(paths).shuffle(seed).repeat().map(read + tokenize)`, so nothing
is read or tokenized until a batch asks for it and every epoch is shuffled differently. The
sources are combined with `MapDataset.mix` (a fixed interleave in proportion to the stage's
mixture weights), turned into an `IterDataset` read by a couple of threads, packed by
`PackIterDataset` and batched. Every element is a pure function of (config.seed, seed_offset,
index), so the whole iterator state is a few integers.

Packing. The stream is doc_1, EOS, doc_2, EOS, ... Row r holds the T + 1 stream tokens
[r·T, r·T + T]: inputs are the first T, targets the last T. Consecutive rows overlap by that
one token, so every adjacent pair of the stream is trained exactly once and nothing is lost at
a row boundary. Per input token:
  segment_ids  1, 2, ... for the documents of the row's inputs in order; a document cut by a row
               boundary carries on in the next row as that row's segment 1.
  positions    the index within its segment: 0 at every document start and at every row start.
  loss_mask    1.0 where the target is in the same document as the input, which includes
               predicting a document's closing EOS; 0.0 exactly where the input is that EOS and
               the target is the first token of the next document.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Iterator
from typing import Any

import grain
import ml_collections as mc
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data import corpus

# Tokenizing is the costly step; two threads match the 2-core machines this must run on, and
# a small buffer of documents keeps memory flat.
READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


class PackIterDataset(grain.IterDataset):
    """Packs a stream of token arrays into rows of T tokens (see the module docstring)."""

    def __init__(self, parent: grain.IterDataset, seq_len: int, eos_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._eos_id = eos_id

    def __iter__(self) -> grain.DatasetIterator:
        return _PackIterator(self._parent.__iter__(), self._seq_len, self._eos_id)

    def __str__(self) -> str:
        return f"PackIterDataset(seq_len={self._seq_len}, eos_id={self._eos_id})"


class _PackIterator(grain.DatasetIterator):
    """State: the parent's state just before it yields the document holding the next row's first
    token, and that token's offset in the document (its tokens + EOS). Restoring re-reads that
    one document instead of storing tokens in the checkpoint."""

    def __init__(self, parent: grain.DatasetIterator, seq_len: int, eos_id: int):
        super().__init__(parent)
        self._seq_len = seq_len
        self._eos = np.array([eos_id], np.int32)
        self._doc: np.ndarray | None = None  # fetched lazily, after a restore too
        self._doc_state: dict[str, Any] | None = None
        self._offset = 0

    def _fetch(self) -> tuple[dict[str, Any], np.ndarray]:
        state = self._parent.get_state()
        tokens = np.asarray(next(self._parent), np.int32)
        return state, np.concatenate([tokens, self._eos])

    def __next__(self) -> dict[str, np.ndarray]:
        if self._doc is None:
            self._doc_state, self._doc = self._fetch()
            # A fresh iterator starts at offset 0; a restored one keeps its offset.
        doc_state, doc, start = self._doc_state, self._doc, self._offset
        tokens, segments, positions = [], [], []
        need, segment = self._seq_len + 1, 1
        while True:
            take = min(len(doc) - start, need)
            tokens.append(doc[start:start + take])
            segments.append(np.full(take, segment, np.int32))
            positions.append(np.arange(take, dtype=np.int32))
            need -= take
            if need == 0:
                break
            doc_state, doc = self._fetch()
            start, segment = 0, segment + 1
        # The next row starts at this row's last token: the one-token overlap.
        self._doc_state, self._doc, self._offset = doc_state, doc, start + take - 1
        tokens_T1, segments_T1 = np.concatenate(tokens), np.concatenate(segments)
        return {
            "inputs": tokens_T1[:-1],
            "targets": tokens_T1[1:],
            "segment_ids": segments_T1[:-1],
            "positions": np.concatenate(positions)[:-1],
            "loss_mask": (segments_T1[:-1] == segments_T1[1:]).astype(np.float32),
        }

    def get_state(self) -> dict[str, Any]:
        parent = self._parent.get_state() if self._doc_state is None else self._doc_state
        return {"parent": parent, "offset": int(self._offset)}

    def set_state(self, state: dict[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._doc_state, self._doc, self._offset = state["parent"], None, int(state["offset"])


def _source_seed(seed: int, seed_offset: int, name: str) -> int:
    """Keyed by the source's name, so adding a source leaves the others' order unchanged."""
    entropy = [seed % 2**32, seed_offset % 2**32, zlib.crc32(name.encode("utf-8"))]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])


def _mixture(config: mc.ConfigDict, stage_name: str) -> dict[str, float]:
    """The stage's sources with positive weight, checked against config.data.sources."""
    if stage_name not in config.stages:
        raise ConfigError(f"config.stages.{stage_name}: no such stage; config.stages has "
                          f"{', '.join(config.stages.keys())}")
    mixture = dict(config.stages[stage_name].mixture.items())
    sources = config.data.sources
    for name, weight in mixture.items():
        if name not in sources:
            raise ConfigError(f"config.stages.{stage_name}.mixture.{name}: no such source; "
                              f"data.sources has {', '.join(sorted(sources.keys()))}")
        if weight < 0:
            raise ConfigError(f"config.stages.{stage_name}.mixture.{name}: weight {weight} "
                              "is negative")
    mixture = {name: float(w) for name, w in sorted(mixture.items()) if w > 0}
    if not mixture:
        raise ConfigError(f"config.stages.{stage_name}.mixture: needs at least one source "
                          "with a positive weight")
    return mixture


def _build(config: mc.ConfigDict, stage_name: str, tokenizer: Any, split: str,
           seed_offset: int, skip_empty: bool) -> grain.IterDataset:
    mixture = _mixture(config, stage_name)
    stage = config.stages[stage_name]

    def encode(path: str) -> np.ndarray:
        return np.asarray(tokenizer.encode(corpus.read_document(path)), np.int32)

    datasets, weights = [], []
    for name, weight in mixture.items():
        try:
            paths = corpus.documents(config.data.sources[name], split, name)
        except corpus.EmptySplitError:
            if not skip_empty:
                raise
            logging.warning("data source %r has no %r documents; left out of eval", name, split)
            continue
        ds = grain.MapDataset.source(paths).shuffle(_source_seed(config.seed, seed_offset, name))
        datasets.append(ds.repeat().map(encode))
        weights.append(weight)
    if not datasets:
        raise corpus.DataError(f"no source of config.stages.{stage_name}.mixture has a {split!r} "
                               "split; raise data.sources.<name>.heldout_fraction")
    mixed = datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)
    ds = PackIterDataset(mixed.to_iter_dataset(READ_OPTIONS), stage.seq_len, tokenizer.eos_id)
    # No batch-level ThreadPrefetchIterDataset: packing is a few numpy copies per row, and in
    # grain 0.2.18 its iterator raises from __del__ when still alive at interpreter exit.
    return ds.batch(stage.batch_size, drop_remainder=True)


def make_iterator(config: mc.ConfigDict, stage_name: str, tokenizer: Any, split: str = "train",
                  seed_offset: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Endless batches for a stage: dicts of `inputs`, `targets`, `segment_ids`, `positions`
    (int32 [B, T]) and `loss_mask` (float32 [B, T]).

    The iterator is a grain DatasetIterator: `get_state()` returns a JSON-serialisable dict and
    `set_state(state)` resumes with exactly the batches the uninterrupted run would have given.
    `split` is "train" or "heldout"; `seed_offset` gives another, equally deterministic order.
    """
    return iter(_build(config, stage_name, tokenizer, split, seed_offset, skip_empty=False))


def eval_batches(config: mc.ConfigDict, stage_name: str, tokenizer: Any) -> list[dict]:
    """`config.data.eval_batches` fixed batches of held-out documents, the same on every call.

    Sources of the stage's mixture whose held-out split is empty are left out, with a warning.
    """
    it = iter(_build(config, stage_name, tokenizer, "heldout", 0, skip_empty=True))
    batches = [next(it) for _ in range(config.data.eval_batches)]
    it.close()
    return batches
