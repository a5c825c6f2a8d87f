"""A stage's batches: config → sources → mixture → loader → striped packing, per process.

B batch (config.stages.<stage>.batch_size), T sequence length (.seq_len), P processes that
read distinct rows (`process_count`), R = B / P rows per process.

Everything is a pure function of (config.seed, seed_offset, stage name, split, k, and the
sources' positions): the same config gives the same batches on any number of processes and
workers, and a restored state continues exactly where it was saved. A training source's
order is its own (its seed does not include the stage), and each stage reads it from where
the stages before left it (`positions`, carried in checkpoints): the long_context and anneal
stages go on to documents that pretraining has not trained on, and a source first named in a
later stage starts at its beginning. A source that runs out starts its next epoch in a new
order.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

import ml_collections as mc
import numpy as np

from jaxllm.config.schema import ConfigError
from jaxllm.data import formats, loader, mixture, sources
from jaxllm.data.packing import StripedBatchIterator


def _seed(config: mc.ConfigDict, seed_offset: int, *names: str) -> int:
    return sources.mix(config.seed, seed_offset, *(sources.stable_hash(n) for n in names))


def stage_mixture(config: mc.ConfigDict, stage_name: str) -> dict[str, float]:
    """The stage's sources with positive weight, checked against config.data.sources."""
    if stage_name not in config.stages:
        raise ConfigError(f"config.stages.{stage_name}: no such stage; config.stages has "
                          f"{', '.join(config.stages.keys())}")
    weights = dict(config.stages[stage_name].mixture.items())
    for name, weight in weights.items():
        if name not in config.data.sources:
            raise ConfigError(f"config.stages.{stage_name}.mixture.{name}: no such source; "
                              f"data.sources has {', '.join(sorted(config.data.sources.keys()))}")
        if not isinstance(weight, int | float) or weight < 0:
            raise ConfigError(f"config.stages.{stage_name}.mixture.{name}: weight {weight!r} "
                              "is not a number >= 0")
    weights = {name: float(w) for name, w in sorted(weights.items()) if w > 0}
    if not weights:
        raise ConfigError(f"config.stages.{stage_name}.mixture: needs at least one source "
                          "with a positive weight")
    return weights


Positions = Mapping[str, mixture.Position]  # source name → where a stage begins it
MAX_PENDING = 1 << 16  # unstarted documents one stage hands to the next (see positions_after)


def document_sequence(config: mc.ConfigDict, stage_name: str, tokenizer: Any, split: str,
                      seed_offset: int = 0, skip_empty: bool = False,
                      positions: Positions | None = None) -> mixture.DocumentSequence:
    """The stage's endless, mixed, random-access documents; only metadata is read.
    `positions`: where to begin each source (absent: at its start)."""
    opened, weights, starts = [], [], []
    for name, weight in stage_mixture(config, stage_name).items():
        try:
            opened.append(sources.open_source(
                config.data.sources[name], split, name,
                _source_seed(config, seed_offset, stage_name, split, name), tokenizer))
        except sources.EmptySplitError:
            if not skip_empty:
                raise
            logging.warning("data source %r has no %r documents; left out of eval", name, split)
            continue
        weights.append(weight)
        starts.append((positions or {}).get(name, mixture.Position()))
    if not opened:
        raise formats.DataError(f"no source of config.stages.{stage_name}.mixture has a "
                                f"{split!r} split; set data.sources.<name>.heldout_fraction "
                                "or heldout_path")
    return mixture.DocumentSequence(opened, weights, _mixture_seed(config, seed_offset,
                                                                   stage_name, split),
                                    tokenizer, starts)


def _source_seed(config: mc.ConfigDict, seed_offset: int, stage_name: str, split: str,
                 name: str) -> int:
    """A training source's order is the source's own, whichever stage reads it (positions
    carry across stages); each stage evaluates on held-out documents in an order of its own,
    as its eval batches have its own shape."""
    stage = (stage_name,) if split == "heldout" else ()
    return _seed(config, seed_offset, *stage, split, name)


def _mixture_seed(config: mc.ConfigDict, seed_offset: int, stage_name: str, split: str) -> int:
    return _seed(config, seed_offset, stage_name, split, "mixture")


def positions_after(config: mc.ConfigDict, stage_name: str, positions: Positions,
                    data_state: dict[str, Any], seed_offset: int = 0
                    ) -> dict[str, mixture.Position]:
    """Every source's position once stage `stage_name`, begun at `positions`, has trained
    up to `data_state` (the global state of its train iterator, as checkpoints hold it).

    A document counts as used once a stream has started it. Streams run at different
    speeds, so below the furthest stream some documents were placed but never started:
    they are the next stage's first documents of their source, so that none is skipped. The
    spread between streams grows with the square root of the steps, so after a long stage of
    a large batch these can be millions: past MAX_PENDING, the rest wait for their sources'
    next epoch, with a warning.
    """
    B, streams = int(data_state["batch_size"]), data_state["streams"]
    if list(data_state.get("rows", [0, B])) != [0, B] or len(streams) != B:
        raise ValueError(f"data state of rows {data_state.get('rows')}: the positions after a "
                         f"stage need all {B} rows (the gathered state)")
    weights = stage_mixture(config, stage_name)
    mix = mixture.Mixture(list(weights.values()),
                          _mixture_seed(config, seed_offset, stage_name, "train"))
    firsts = np.array([k + B if offset else k for k, offset in streams], np.int64)
    end = cut = int(firsts.max())  # each stream's next unstarted document; the furthest
    unstarted_below = lambda t: int(np.maximum(0, -((firsts - t) // B)).sum())
    if unstarted_below(end) > MAX_PENDING:
        lo, hi = int(firsts.min()), end  # the last cut with at most MAX_PENDING below it
        while lo < hi:
            mid = (lo + hi + 1) // 2
            lo, hi = (mid, hi) if unstarted_below(mid) <= MAX_PENDING else (lo, mid - 1)
        cut = lo
        logging.warning("stage %s: %d documents that its streams placed but did not reach are "
                        "left to their sources' next epoch (more than %d to carry over)",
                        stage_name, unstarted_below(end) - unstarted_below(cut), MAX_PENDING)
    skipped: list[list[int]] = [[] for _ in weights]
    for first in firsts.tolist():
        for k in range(first, cut, B):
            s, j = mix.locate(k)
            skipped[s].append(j)
    out = dict(positions)
    for s, (name, used) in enumerate(zip(weights, mix.counts_before(end), strict=True)):
        out[name] = out.get(name, mixture.Position()).after(int(used), sorted(skipped[s]))
    return out


_CHECKED: set[str] = set()  # configs whose sources were checked in this process


def check_sources(config: mc.ConfigDict, tokenizer: Any) -> None:
    """Opens every source some stage with steps trains on, so that a missing path, an empty
    glob, a corrupt jsonl line or a missing field fails before the first step, not hours
    later at the stage that uses it."""
    memo = json.dumps([config.data.sources.to_dict(), tokenizer.vocab_size, tokenizer.eos_id,
                       {n: [s.steps, s.mixture.to_dict()] for n, s in config.stages.items()}],
                      sort_keys=True, default=str)
    if memo in _CHECKED:
        return
    for stage_name in config.stages.keys():
        if not config.stages[stage_name].steps:
            continue
        for name in stage_mixture(config, stage_name):
            for split in sources.SPLITS:
                try:
                    sources.open_source(config.data.sources[name], split, name, 0, tokenizer)
                except sources.EmptySplitError:
                    if split == "train":
                        raise
    _CHECKED.add(memo)


def process_share(sharding: Any, batch_size: int) -> tuple[int, int]:
    """(index, count): this process's devices hold rows [index·R, (index + 1)·R) of a batch
    sharded by `sharding` on its first axis, R = batch_size / count."""
    spans = sorted({index[0].indices(batch_size)[:2] if index else (0, batch_size)
                    for index in sharding.addressable_devices_indices_map((batch_size,)).values()})
    lo, hi = spans[0][0], max(stop for _, stop in spans)
    covered = lo
    for start, stop in spans:
        if start > covered:
            break
        covered = max(covered, stop)
    rows = hi - lo
    if covered != hi or batch_size % rows or lo % rows:
        raise ConfigError(f"config.mesh: this process's devices hold batch rows {spans}, not one "
                          "contiguous, evenly sized block; order the mesh so that each "
                          "process's devices are adjacent on the data and fsdp axes")
    return lo // rows, batch_size // rows


def _allgather_state(state: dict[str, Any]) -> dict[str, Any]:
    """Every process's rows → the global state (a collective: every process must call it)."""
    from jax.experimental import multihost_utils

    lo = state["rows"][0]
    # int32 halves: JAX arrays are 32-bit unless x64 is on, and k may pass 2**31.
    local_Rx4 = np.array([[lo + i, k >> 31, k & 0x7FFFFFFF, o]
                          for i, (k, o) in enumerate(state["streams"])], np.int32)
    gathered = np.asarray(multihost_utils.process_allgather(local_Rx4)).reshape(-1, 4)
    streams = {int(row): [(int(hi) << 31) | int(low), int(o)] for row, hi, low, o in gathered}
    B = state["batch_size"]
    if sorted(streams) != list(range(B)):
        raise RuntimeError(f"data state: the processes' rows {sorted(streams)} are not the "
                           f"batch's {B} rows")
    return {"batch_size": B, "rows": [0, B], "streams": [streams[b] for b in range(B)]}


def make_iterator(config: mc.ConfigDict, stage_name: str, tokenizer: Any, split: str = "train",
                  seed_offset: int = 0, *, process_index: int = 0, process_count: int = 1,
                  sharding: Any = None, workers: int | None = None,
                  positions: Positions | None = None,
                  _skip_empty: bool = False) -> StripedBatchIterator:
    """Endless batches of this process's rows of a stage: dicts of `inputs`, `targets`,
    `segment_ids`, `positions` (int32 [R, T]) and `loss_mask` (float32 [R, T]).

    Process `process_index` of `process_count` reads rows [index·R, (index + 1)·R) of every
    batch, and only the documents those rows need. With `sharding` (the batch sharding of the
    mesh), the share comes from where this process's devices are, and on more than one process
    `get_state()` gathers every process's rows (call it on all of them, as checkpoints do).
    `get_state()` returns a JSON-serialisable dict; `set_state(state)` resumes with exactly
    the batches the uninterrupted run would have given. `split` is "train" or "heldout";
    `seed_offset` gives another, equally deterministic order; `workers` overrides
    config.data.workers (0: threads; N: worker processes); `positions` says where the stage
    begins each source (`positions_after` of the stage before). `stats()` adds `epoch`, each
    source's epoch (0 until it has run out once).
    """
    stage = config.stages[stage_name]
    B = int(stage.batch_size)
    if sharding is not None:
        process_index, process_count = process_share(sharding, B)
    if not 0 <= process_index < process_count or B % process_count:
        raise ConfigError(f"config.stages.{stage_name}.batch_size: {B} rows do not split over "
                          f"{process_count} processes (process {process_index})")
    if split == "train":
        check_sources(config, tokenizer)
    sequence = document_sequence(config, stage_name, tokenizer, split, seed_offset, _skip_empty,
                                 positions)
    data = config.data
    R = B // process_count
    return StripedBatchIterator(
        loader.make_loader(sequence, int(data.workers if workers is None else workers)),
        B, int(stage.seq_len), tokenizer.eos_id, rows=(process_index * R, process_index * R + R),
        prefetch=int(data.prefetch),
        gather_state=_allgather_state if sharding is not None and process_count > 1 else None,
        describe=lambda ks: {"epoch": sequence.epochs(ks)})


def eval_batches(config: mc.ConfigDict, stage_name: str, tokenizer: Any, **share: Any
                 ) -> list[dict[str, np.ndarray]]:
    """`config.data.eval_batches` fixed batches of held-out documents, the same on every call;
    `share` as for make_iterator. Sources of the stage's mixture whose held-out split is
    empty are left out, with a warning."""
    it = make_iterator(config, stage_name, tokenizer, "heldout", workers=0, _skip_empty=True,
                       **share)
    batches = [next(it) for _ in range(config.data.eval_batches)]
    it.close()
    return batches

