"""Reading and tokenizing documents off the training thread: threads or worker processes.

`submit(indices)` returns one Future per document index, resolved with the sequence's
`Document`. When a document is ready changes when a batch is ready, never what it holds.

  threads (data.workers = 0)  a pool shared by every iterator of the process: file reads and
      tiktoken release the GIL, so this scales over cores, but JSON and Parquet decoding hold it.
  processes (data.workers = N)  N spawned processes, each with its own copy of the sequence
      (sent once, at start); indices go to them in batches, so small documents cost little IPC.
Both count documents, tokens and the seconds spent loading them: `capacity()` is what the
loader could deliver, tokens per second, were it never idle.
"""

from __future__ import annotations

import concurrent.futures
import multiprocessing
import os
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

# Past a handful of threads, the documents one batch needs are done before more would help.
NUM_THREADS = max(2, min(8, os.cpu_count() or 2))
_MAX_GROUP = 64  # documents per request to a worker process
_POOL: concurrent.futures.ThreadPoolExecutor | None = None
_WORKER_SEQUENCE: Any = None  # in a worker process: the sequence it loads from


def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """One pool for every iterator, started on first use; its idle threads cost nothing."""
    global _POOL
    if _POOL is None:
        _POOL = concurrent.futures.ThreadPoolExecutor(NUM_THREADS, "jaxllm-data")
    return _POOL


class _Counter:
    def __init__(self, parallelism: int):
        self.parallelism = parallelism
        self._lock = threading.Lock()
        self.documents = self.tokens = 0
        self.seconds = 0.0

    def add(self, documents: int, tokens: int, seconds: float) -> None:
        with self._lock:
            self.documents += documents
            self.tokens += tokens
            self.seconds += seconds

    def capacity(self) -> float:
        """Tokens per second the loader would give if always busy; 0 before any document."""
        with self._lock:
            return self.tokens / self.seconds * self.parallelism if self.seconds else 0.0


def _timed(load: Callable[[int], Any], indices: Sequence[int]) -> tuple[list, float]:
    start = time.perf_counter()
    docs = [load(k) for k in indices]
    return docs, time.perf_counter() - start


class ThreadLoader:
    """`load(k)` on the shared thread pool."""

    def __init__(self, load: Callable[[int], Any]):
        self._load = load
        self.counter = _Counter(NUM_THREADS)

    def submit(self, indices: Sequence[int]) -> list[concurrent.futures.Future]:
        return [self._submit_one(k) for k in indices]

    def _submit_one(self, k: int) -> concurrent.futures.Future:
        out: concurrent.futures.Future = concurrent.futures.Future()

        def run():
            if not out.set_running_or_notify_cancel():
                return  # cancelled: a state was restored or the iterator closed
            try:
                (doc,), seconds = _timed(self._load, [k])
            except BaseException as e:
                out.set_exception(e)
                return
            self.counter.add(1, len(doc.ids), seconds)
            out.set_result(doc)

        _pool().submit(run)
        return out

    def capacity(self) -> float:
        return self.counter.capacity()

    def close(self) -> None:
        pass  # the pool is shared; pending documents were cancelled by their owner


def _init_worker(sequence: Any) -> None:
    global _WORKER_SEQUENCE
    _WORKER_SEQUENCE = sequence


def _load_in_worker(indices: Sequence[int]) -> tuple[list, float]:
    return _timed(_WORKER_SEQUENCE.__getitem__, indices)


class ProcessLoader:
    """`sequence[k]` in `workers` spawned processes (not forked: JAX's threads do not fork)."""

    def __init__(self, sequence: Any, workers: int):
        self._pool = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=(sequence,))
        self._workers = workers
        self.counter = _Counter(workers)

    def submit(self, indices: Sequence[int]) -> list[concurrent.futures.Future]:
        indices = list(indices)
        outs = [concurrent.futures.Future() for _ in indices]
        size = min(_MAX_GROUP, max(1, -(-len(indices) // self._workers)))
        for start in range(0, len(indices), size):
            group = self._pool.submit(_load_in_worker, indices[start:start + size])
            group.add_done_callback(self._deliver(outs[start:start + size]))
        return outs

    def _deliver(self, outs: list[concurrent.futures.Future]) -> Callable:
        def deliver(group: concurrent.futures.Future) -> None:
            live = [out for out in outs if out.set_running_or_notify_cancel()]
            if group.cancelled():
                for out in live:
                    out.set_exception(concurrent.futures.CancelledError())
                return
            if (error := group.exception()) is not None:
                if isinstance(error, concurrent.futures.process.BrokenProcessPool):
                    error = RuntimeError(f"a data worker process died ({error}); set "
                                         "data.workers=0 to load in threads and see why")
                for out in live:
                    out.set_exception(error)
                return
            docs, seconds = group.result()
            self.counter.add(len(docs), sum(len(d.ids) for d in docs), seconds)
            for out, doc in zip(outs, docs, strict=True):
                if not out.cancelled():
                    out.set_result(doc)

        return deliver

    def capacity(self) -> float:
        return self.counter.capacity()

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def make_loader(sequence: Any, workers: int) -> ThreadLoader | ProcessLoader:
    return ProcessLoader(sequence, workers) if workers > 0 else ThreadLoader(sequence.__getitem__)
