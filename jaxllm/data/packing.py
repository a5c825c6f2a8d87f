"""Packing documents into batches of B striped rows, with an exact, few-integer state.

Dimension letters (docs/glossary.md): Bp the rows this process reads ([lo, hi)), T1 = T + 1.

Row b of every batch is the next row of stream b, which packs documents d_b, d_{b+B},
d_{b+2B}, ... of the stage's sequence as doc, EOS, doc, EOS, ...; a process reading rows
[lo, hi) reads only those streams' documents. Row r holds the T + 1 stream tokens
[r·T, r·T + T]: inputs are the first T, targets the last T. Per input token: segment_ids
(1, 2, ... for the row's documents; 0 padding), positions (0 at every document and row start)
and loss_mask (1.0 where the target is in the input's document and its mask allows it).
A preference pair (a `split` document) lies whole in one row as two documents, chosen then
rejected, so that a row of pairs has segments 2k + 1 and 2k + 2 for its k-th pair; a pair
longer than a row is dropped.

State: {"batch_size": B, "rows": [lo, hi], "streams": [[k, offset], ...]}, one pair per row
read: the sequence index k of the document holding the stream's next row's first token, and
that token's offset in the document (tokens + EOS).
Design notes (rules in full, long documents): docs/data.md.
"""

from __future__ import annotations

import concurrent.futures
import time
from typing import Any

import grain
import numpy as np

_MAX_AHEAD = 64  # documents in flight per stream, however short they are
_MAX_DROPPED = 1 << 14  # dropped documents in a row after which a stream gives up


class _Doc:
    """A loaded document with its EOS: int32 tokens and uint8 mask (None: all ones); a
    dropped one is empty."""

    __slots__ = ("tokens", "mask", "align", "split")

    def __init__(self, doc: Any, eos_id: int):
        self.align, self.split = getattr(doc, "align", False), getattr(doc, "split", 0)
        if getattr(doc, "dropped", False):
            self.tokens, self.mask = np.empty(0, np.int32), None
            return
        self.tokens = np.empty(len(doc.ids) + 1, np.int32)
        self.tokens[:-1] = doc.ids
        self.tokens[-1] = eos_id
        # The end token is a target when the document's last token is one: not after a chat,
        # which ends in the "\n" after its last <|im_end|>.
        end = doc.mask[-1] if doc.mask is not None and len(doc.mask) else np.uint8(1)
        self.mask = None if doc.mask is None else np.append(doc.mask, end)

    def __len__(self) -> int:
        return len(self.tokens)


class StripedBatchIterator(grain.DatasetIterator):
    """Batches of rows [lo, hi) of B striped streams (see the module docstring).

    `loader.submit(indices)` returns a Future per document index, resolved with an object
    with `.ids` (int32) and `.mask` (uint8 or None). With `num_documents` the sequence is
    finite and the iteration ends at the first batch a stream cannot fill. `describe(ks)`,
    given the documents the streams are at, adds to `stats()`.
    """

    def __init__(self, loader: Any, batch_size: int, seq_len: int, eos_id: int,
                 rows: tuple[int, int] | None = None, num_documents: int | None = None,
                 prefetch: int = 2, gather_state: Any = None, describe: Any = None):
        super().__init__()
        self._loader, self._eos_id = loader, eos_id
        self._B, self._T, self._prefetch = batch_size, seq_len, prefetch
        self._lo, self._hi = rows or (0, batch_size)
        if not 0 <= self._lo < self._hi <= batch_size:
            raise ValueError(f"rows {rows} are not a non-empty range within [0, {batch_size})")
        self._num_documents, self._gather_state = num_documents, gather_state
        self._describe = describe
        self._mean_len = float(seq_len)  # of loaded documents: how many to load ahead
        self._seen = 0
        self._dropped_in_row = 0
        self._wait = 0.0
        self._ahead: list[list[concurrent.futures.Future]] = []
        self.set_state({"batch_size": batch_size, "rows": [self._lo, self._hi],
                        "streams": [[b, 0] for b in range(self._lo, self._hi)]})

    # Stream i (row lo + i) has loaded documents k_i, k_i + B, ... (self._docs[i]) and
    # futures for the ones after them (self._ahead[i]).

    def _next_index(self, i: int) -> int:
        return self._k[i] + self._B * (len(self._docs[i]) + len(self._ahead[i]))

    def _submit(self, wants: dict[int, int]) -> None:
        """wants: stream → documents to add to its look-ahead, all requested at once."""
        indices, owners = [], []
        for i, count in wants.items():
            first = self._next_index(i)
            for k in range(first, first + self._B * count, self._B):
                if self._num_documents is not None and k >= self._num_documents:
                    break
                indices.append(k)
                owners.append(i)
        if indices:
            for i, future in zip(owners, self._loader.submit(indices), strict=True):
                self._ahead[i].append(future)

    def _loaded_tokens(self, i: int) -> int:
        """Tokens loaded for stream i's rows; a row's lone closing EOS does not count when an
        aligned document follows (it may drop that EOS, and the row must still fill)."""
        docs, offset = self._docs[i], self._offset[i]
        lone_eos = bool(docs) and offset == len(docs[0]) - 1 and any(d.align for d in docs[1:])
        return sum(len(d) for d in docs) - offset - lone_eos

    def _fill(self) -> None:
        """Until every stream's loaded documents hold its next row (T + 1 tokens)."""
        while short := [i for i in range(len(self._k)) if self._loaded_tokens(i) <= self._T]:
            self._submit({i: 1 for i in short if not self._ahead[i]})
            if any(not self._ahead[i] for i in short):
                raise StopIteration
            for i in short:
                doc = _Doc(self._ahead[i].pop(0).result(), self._eos_id)
                if doc.split and len(doc) > self._T + 1:  # a pair is whole in a row, or not at all
                    doc.tokens, doc.mask = doc.tokens[:0], None
                self._seen += 1
                self._mean_len += (len(doc) - self._mean_len) / min(self._seen, 1000)
                self._dropped_in_row = 0 if len(doc) else self._dropped_in_row + 1
                if self._dropped_in_row > _MAX_DROPPED:
                    from jaxllm.data.formats import DataError

                    raise DataError(f"{_MAX_DROPPED} documents in a row were dropped: shorter "
                                    "than their source's min_tokens (lower it or set "
                                    "keep_short), or preference pairs longer than the stage's "
                                    "seq_len")
                if not len(doc) and not self._docs[i]:  # a dropped first document: skip it
                    if self._offset[i]:
                        raise ValueError(f"data state: stream {self._lo + i} is at offset "
                                         f"{self._offset[i]} of document {self._k[i]}, which "
                                         "holds no tokens; the state belongs to other data")
                    self._k[i] += self._B
                    continue
                self._docs[i].append(doc)

    def _look_ahead(self) -> None:
        """Requests what the next `prefetch` batches will probably need, at the mean length."""
        goal = (self._prefetch + 1) * self._T
        wants = {}
        for i in range(len(self._k)):
            missing = goal - self._loaded_tokens(i) - len(self._ahead[i]) * self._mean_len
            count = min(int(np.ceil(missing / self._mean_len)), _MAX_AHEAD - len(self._ahead[i]))
            if count > 0:
                wants[i] = count
        self._submit(wants)

    def __next__(self) -> dict[str, np.ndarray]:
        self._assert_not_closed()
        start = time.perf_counter()
        self._fill()
        Bp, T1 = len(self._k), self._T + 1
        tokens_BpxT1 = np.empty((Bp, T1), np.int32)
        segments_BpxT1 = np.empty((Bp, T1), np.int32)
        positions_BpxT1 = np.empty((Bp, T1), np.int32)
        mask_BpxT1 = np.ones((Bp, T1), np.float32)
        for i, docs in enumerate(self._docs):
            offset, filled = self._offset[i], 0
            if offset >= len(docs[0]):
                raise ValueError(f"data state: stream {self._lo + i} offset {offset} is past the "
                                 f"end of its document {self._k[i]} ({len(docs[0])} tokens with "
                                 "EOS); the state belongs to other data or another tokenizer")
            segment, eos_only = 0, offset == len(docs[0]) - 1
            for j, doc in enumerate(docs):
                if not len(doc):  # dropped
                    continue
                if doc.align and filled == 1 and eos_only:
                    filled = segment = 0  # the row held only the closing EOS (no target): drop it
                if doc.align and filled and len(doc) > T1 - filled:
                    # Pad the rest of the row: the document starts the next one.
                    pad = slice(filled, T1)
                    tokens_BpxT1[i, pad], segments_BpxT1[i, pad] = self._eos_id, 0
                    positions_BpxT1[i, pad], mask_BpxT1[i, pad] = 0, 0.0
                    offset, take, last = 0, 1, j
                    break
                segment += 1
                take = min(len(doc) - offset, T1 - filled)
                span = slice(filled, filled + take)
                tokens_BpxT1[i, span] = doc.tokens[offset:offset + take]
                segments_BpxT1[i, span] = segment
                positions_BpxT1[i, span] = np.arange(take)
                if doc.split:  # a pair: the rejected chat is a document of its own
                    second = np.arange(offset, offset + take) >= doc.split
                    segments_BpxT1[i, span] += second
                    positions_BpxT1[i, span] -= second * (doc.split - offset)
                    segment += 1
                if doc.mask is not None:
                    mask_BpxT1[i, span] = doc.mask[offset:offset + take]
                filled += take
                if filled == T1:
                    last = j
                    break
                offset = 0
            # The next row starts at this row's last token (the one-token overlap), or at the
            # aligned document that padding left for it.
            del docs[:last]
            self._k[i] += self._B * last
            self._offset[i] = offset + take - 1
        self._look_ahead()  # loaded while the caller trains on this batch
        same_doc_BpxT = segments_BpxT1[:, :-1] == segments_BpxT1[:, 1:]
        batch = {
            "inputs": np.ascontiguousarray(tokens_BpxT1[:, :-1]),
            "targets": np.ascontiguousarray(tokens_BpxT1[:, 1:]),
            "segment_ids": np.ascontiguousarray(segments_BpxT1[:, :-1]),
            "positions": np.ascontiguousarray(positions_BpxT1[:, :-1]),
            "loss_mask": same_doc_BpxT * mask_BpxT1[:, 1:],  # a token's mask is for it as a target
        }
        self._wait += time.perf_counter() - start
        return batch

    def stats(self) -> dict[str, Any]:
        """Since the last call: `data_wait_sec`, the seconds `next()` blocked, and
        `data_tokens_per_sec`, what the loader could deliver (tokens read and tokenized per
        second of its workers' time, times their number); then what `describe` adds."""
        out = {"data_wait_sec": self._wait, "data_tokens_per_sec": self._loader.capacity()}
        self._wait = 0.0
        return out | (self._describe(self._k) if self._describe else {})

    def _cancel_ahead(self) -> None:
        for futures in self._ahead:
            for future in futures:
                future.cancel()

    def get_state(self) -> dict[str, Any]:
        state = {"batch_size": self._B, "rows": [self._lo, self._hi],
                 "streams": [[int(k), int(o)] for k, o in zip(self._k, self._offset,
                                                               strict=True)]}
        return self._gather_state(state) if self._gather_state else state

    def set_state(self, state: dict[str, Any]) -> None:
        """Takes this iterator's rows from a state of the same rows or of more (the global
        state a multi-process run saves)."""
        streams = state.get("streams") if isinstance(state, dict) else None
        lo, hi = state.get("rows", [0, self._B]) if isinstance(state, dict) else (0, 0)
        if (not isinstance(streams, list) or len(streams) != hi - lo or lo > self._lo
                or hi < self._hi or state.get("batch_size", self._B) != self._B):
            found = (f"rows {lo}..{hi} of a batch of {state.get('batch_size', len(streams))}"
                     if isinstance(streams, list) else f"{state!r:.200}")
            raise ValueError(f"data state: expected {{'streams': [[k, offset], ...]}} with one "
                             f"pair per row of the batch ({self._B}) covering rows "
                             f"{self._lo}..{self._hi}, got {found}; resume with the batch size "
                             "that saved it")
        mine = streams[self._lo - lo:self._hi - lo]
        self._cancel_ahead()
        self._k = [int(k) for k, _ in mine]
        self._offset = [int(o) for _, o in mine]
        self._docs: list[list[_Doc]] = [[] for _ in mine]
        self._ahead = [[] for _ in mine]

    def close(self) -> None:
        self._cancel_ahead()
        self._loader.close()
        super().close()

    def __str__(self) -> str:
        return (f"StripedBatchIterator(batch_size={self._B}, seq_len={self._T}, "
                f"rows={self._lo}..{self._hi})")
