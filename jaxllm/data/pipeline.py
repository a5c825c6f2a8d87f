"""Deterministic, checkpointable training batches: documents → mixture → B striped streams.

B batch (rows per batch, config.stages.<stage>.batch_size), T sequence length (.seq_len).

Documents. Per source: `MapDataset.source(paths).shuffle(seed).repeat()`, so every epoch is
shuffled differently; the sources are combined with `MapDataset.mix` (a fixed interleave in
proportion to the stage's mixture weights). The result is an endless document sequence
d_0, d_1, ... of paths with random access, a pure function of (config.seed, seed_offset, k).

Streams. Row b of every batch is the next row of stream b, and stream b packs d_b, d_{b+B},
d_{b+2B}, ...: the B rows of a batch come from B different documents (unless streams drift an
epoch apart and meet the same file), and together the streams use every document once per
epoch of the sequence. Nothing is read up front: the documents a batch needs are read and
tokenized in parallel on a few threads, and those the next batch will need are started in the
background meanwhile.

Packing, per stream. The stream is doc_1, EOS, doc_2, EOS, ... Row r holds the T + 1 stream
tokens [r·T, r·T + T]: inputs are the first T, targets the last T. Consecutive rows overlap by
that one token, so every adjacent pair of the stream is trained exactly once and nothing is lost
at a row boundary. Per input token:
  segment_ids  1, 2, ... for the documents of the row's inputs in order; a document cut by a row
               boundary carries on in the next row as that row's segment 1.
  positions    the index within its segment: 0 at every document start and at every row start.
  loss_mask    1.0 where the target is in the same document as the input, which includes
               predicting a document's closing EOS; 0.0 exactly where the input is that EOS and
               the target is the first token of the next document.

State: {"streams": [[k, offset], ...]}, one pair per stream: the sequence index k of the document
holding the stream's next row's first token, and that token's offset in the document (its
tokens + EOS). Restoring re-reads and re-tokenizes one document per stream.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import zlib
from collections.abc import Callable, Sequence
from typing import Any

import grain
import ml_collections as mc
import numpy as np

from jaxllm.config import ConfigError
from jaxllm.data import corpus

# tiktoken releases the GIL while encoding, so threads scale to the cores; past a handful the
# documents one batch needs (at most B) are done before more threads would help.
NUM_THREADS = max(2, min(8, os.cpu_count() or 2))
_POOL: concurrent.futures.ThreadPoolExecutor | None = None


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """One pool for every iterator, started on first use; its idle threads cost nothing."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(NUM_THREADS, "jaxllm-data")
    return _POOL


class StripedBatchIterator(grain.DatasetIterator):
    """Batches of B packed rows; row b is the next row of stream b (see the module docstring).

    `documents` is a MapDataset with random access; `load(documents[k])` returns the token ids
    of document k, without EOS. A finite `documents` ends the iteration at the first batch a
    stream cannot fill; the training sequence is endless.
    """

    def __init__(self, documents: grain.MapDataset, load: Callable[[Any], Sequence[int]],
                 batch_size: int, seq_len: int, eos_id: int):
        super().__init__()
        self._documents, self._load = documents, load
        self._B, self._T, self._eos_id = batch_size, seq_len, eos_id
        self._pending: dict[int, concurrent.futures.Future] = {}  # by document index
        self.set_state({"streams": [[b, 0] for b in range(batch_size)]})

    def _tokens(self, index: int) -> np.ndarray:
        ids = self._load(self._documents[index])
        tokens = np.empty(len(ids) + 1, np.int32)
        tokens[:-1] = ids
        tokens[-1] = self._eos_id
        return tokens

    def _submit(self, index: int) -> concurrent.futures.Future:
        future = self._pending.pop(index, None)
        if future is None:
            future = _pool().submit(self._tokens, index)
        return future

    def _wanted(self) -> dict[int, int]:
        """Stream b by the index of the document it needs next, for each stream whose loaded
        documents do not yet hold its next row."""
        wanted = {}
        for b, docs in enumerate(self._loaded):
            if sum(len(d) for d in docs) - self._offset[b] <= self._T:
                wanted[self._k[b] + self._B * len(docs)] = b
        return wanted

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        # Rounds, because how many documents a row needs is known only once they are tokenized.
        while wanted := self._wanted():
            if max(wanted) >= len(self._documents):
                raise StopIteration
            futures = {index: self._submit(index) for index in wanted}
            for index, future in futures.items():
                self._loaded[wanted[index]].append(future.result())
        B, T1 = self._B, self._T + 1
        tokens_BT1 = np.empty((B, T1), np.int32)
        segments_BT1 = np.empty((B, T1), np.int32)
        positions_BT1 = np.empty((B, T1), np.int32)
        for b, docs in enumerate(self._loaded):
            start, filled = self._offset[b], 0
            if start >= len(docs[0]):
                raise ValueError(f"data state: stream {b} offset {start} is past the end of its "
                                 f"document {self._k[b]} ({len(docs[0])} tokens with EOS); the "
                                 "state belongs to other data or another tokenizer")
            for segment, doc in enumerate(docs, start=1):
                take = min(len(doc) - start, T1 - filled)
                tokens_BT1[b, filled:filled + take] = doc[start:start + take]
                segments_BT1[b, filled:filled + take] = segment
                positions_BT1[b, filled:filled + take] = np.arange(take)
                filled += take
                if filled == T1:
                    break
                start = 0
            # The next row starts at this row's last token: the one-token overlap.
            del docs[:segment - 1]
            self._k[b] += B * (segment - 1)
            self._offset[b] = start + take - 1
        for index in self._wanted():  # tokenized while the caller trains on this batch
            if index < len(self._documents):
                self._pending[index] = self._submit(index)
        return {
            "inputs": np.ascontiguousarray(tokens_BT1[:, :-1]),
            "targets": np.ascontiguousarray(tokens_BT1[:, 1:]),
            "segment_ids": np.ascontiguousarray(segments_BT1[:, :-1]),
            "positions": np.ascontiguousarray(positions_BT1[:, :-1]),
            "loss_mask": (segments_BT1[:, :-1] == segments_BT1[:, 1:]).astype(np.float32),
        }

    def _drop_pending(self) -> None:
        for future in self._pending.values():
            future.cancel()
        self._pending = {}

    def get_state(self) -> dict[str, Any]:
        return {"streams": [[int(k), int(o)] for k, o in zip(self._k, self._offset, strict=True)]}

    def set_state(self, state: dict[str, Any]) -> None:
        streams = state.get("streams") if isinstance(state, dict) else None
        if not isinstance(streams, list) or len(streams) != self._B:
            found = (f"{len(streams)} streams" if isinstance(streams, list)
                     else f"keys {sorted(state) if isinstance(state, dict) else state!r}")
            raise ValueError(f"data state: expected {{'streams': [[k, offset], ...]}} with one "
                             f"pair per row of the batch ({self._B}), got {found}; resume "
                             "with the batch size and code version that saved it")
        self._drop_pending()
        self._k = [int(k) for k, _ in streams]
        self._offset = [int(o) for _, o in streams]
        self._loaded: list[list[np.ndarray]] = [[] for _ in streams]  # docs k, k + B, ...

    def close(self) -> None:
        self._drop_pending()
        super().close()

    def __str__(self) -> str:
        return f"StripedBatchIterator(batch_size={self._B}, seq_len={self._T})"


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


def _documents(config: mc.ConfigDict, stage_name: str, split: str, seed_offset: int,
               skip_empty: bool) -> grain.MapDataset:
    """The stage's endless, shuffled and mixed sequence of document paths; nothing is read."""
    mixture = _mixture(config, stage_name)
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
        datasets.append(ds.repeat())
        weights.append(weight)
    if not datasets:
        raise corpus.DataError(f"no source of config.stages.{stage_name}.mixture has a {split!r} "
                               "split; raise data.sources.<name>.heldout_fraction")
    return datasets[0] if len(datasets) == 1 else grain.MapDataset.mix(datasets, weights)


def _iterator(config: mc.ConfigDict, stage_name: str, tokenizer: Any, split: str,
              seed_offset: int, skip_empty: bool) -> StripedBatchIterator:
    documents = _documents(config, stage_name, split, seed_offset, skip_empty)
    stage = config.stages[stage_name]

    def load(path: str) -> list[int]:
        return tokenizer.encode(corpus.read_document(path))

    return StripedBatchIterator(documents, load, stage.batch_size, stage.seq_len,
                                tokenizer.eos_id)


def make_iterator(config: mc.ConfigDict, stage_name: str, tokenizer: Any, split: str = "train",
                  seed_offset: int = 0) -> StripedBatchIterator:
    """Endless batches for a stage: dicts of `inputs`, `targets`, `segment_ids`, `positions`
    (int32 [B, T]) and `loss_mask` (float32 [B, T]).

    The iterator is a grain DatasetIterator: `get_state()` returns a JSON-serialisable dict and
    `set_state(state)` resumes with exactly the batches the uninterrupted run would have given.
    `split` is "train" or "heldout"; `seed_offset` gives another, equally deterministic order.
    """
    return _iterator(config, stage_name, tokenizer, split, seed_offset, skip_empty=False)


def eval_batches(config: mc.ConfigDict, stage_name: str, tokenizer: Any) -> list[dict]:
    """`config.data.eval_batches` fixed batches of held-out documents, the same on every call.

    Sources of the stage's mixture whose held-out split is empty are left out, with a warning.
    """
    it = _iterator(config, stage_name, tokenizer, "heldout", 0, skip_empty=True)
    batches = [next(it) for _ in range(config.data.eval_batches)]
    it.close()
    return batches
