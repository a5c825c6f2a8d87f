"""Tests of jaxllm.data's pipeline: determinism, exact resume, striped packing, mixture,
stage switches, prompt masks, worker processes.

B batch (rows), T sequence length. A byte-level fake tokenizer keeps these independent of the
real Qwen2 one; one test uses the real tokenizer.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from jaxllm import data
from jaxllm.config.schema import ConfigError, data_source
from jaxllm.data import iterator, loader, mixture, packing
from tests.helpers.data import (
    KEYS,
    ByteTokenizer,
    assert_same,
    make_config,
    take,
    two_text_sources,
    write_docs,
)


def test_same_seed_same_batches_other_seed_differs():
    tok = ByteTokenizer()
    a = take(data.make_iterator(make_config(seed=3), "pretrain", tok), 3)
    b = take(data.make_iterator(make_config(seed=3), "pretrain", tok), 3)
    c = take(data.make_iterator(make_config(seed=4), "pretrain", tok), 3)
    d = take(data.make_iterator(make_config(seed=3), "pretrain", tok, seed_offset=1), 3)
    assert_same(a, b)
    assert not np.array_equal(a[0]["inputs"], c[0]["inputs"])
    assert not np.array_equal(a[0]["inputs"], d[0]["inputs"])


@pytest.mark.parametrize("k, corpus_kind", [(1, "stdlib"), (5, "stdlib"), (7, "mixture")])
def test_restore_mid_run_is_bitwise_exact(k, corpus_kind, tmp_path):
    tok, cfg = ByteTokenizer(), make_config(seq_len=64, batch_size=3, seed=1)
    if corpus_kind == "mixture":  # many short documents: the state moves across documents
        cfg = make_config(seq_len=64, batch_size=3, seed=1, sources=two_text_sources(tmp_path),
                          mixture={"a": 0.7, "b": 0.3})
    it = data.make_iterator(cfg, "pretrain", tok)
    take(it, k)
    state = it.get_state()
    expected = take(it, 4)

    restored = data.make_iterator(cfg, "pretrain", tok)
    restored.set_state(state)
    assert_same(take(restored, 4), expected)

    via_json = data.make_iterator(cfg, "pretrain", tok)
    take(via_json, 2)  # restoring must also work on an iterator that has already moved
    via_json.set_state(json.loads(json.dumps(state)))
    assert_same(take(via_json, 4), expected)


def hand_packer(docs, masks=None, batch_size=2, loads=None):
    def load(k):
        if loads is not None:
            loads.append(k)
        return mixture.Document(np.asarray(docs[k], np.int32),
                                None if masks is None or masks[k] is None
                                else np.asarray(masks[k], np.uint8), 0)

    return data.StripedBatchIterator(loader.ThreadLoader(load), batch_size, seq_len=4, eos_id=0,
                                     num_documents=len(docs))


def test_pack_hand_made_rows():
    docs = [[1, 2, 3], [11, 12, 13, 14, 15, 16, 17], [4], [18], [5, 6, 7, 8, 9, 10], [19, 20]]
    loads = []
    it = hand_packer(docs, loads=loads)
    assert not loads  # nothing is read before a batch asks for it
    # Stream 0 is docs 0, 2, 4: 1 2 3 0 | 4 0 | 5 6 7 8 9 10 0; stream 1 is docs 1, 3, 5:
    # 11 12 13 14 15 16 17 0 | 18 0 | 19 20 0. Rows overlap by one token.
    expected = [
        [dict(inputs=[1, 2, 3, 0], targets=[2, 3, 0, 4], segment_ids=[1, 1, 1, 1],
              positions=[0, 1, 2, 3], loss_mask=[1, 1, 1, 0]),
         dict(inputs=[11, 12, 13, 14], targets=[12, 13, 14, 15], segment_ids=[1, 1, 1, 1],
              positions=[0, 1, 2, 3], loss_mask=[1, 1, 1, 1])],
        [dict(inputs=[4, 0, 5, 6], targets=[0, 5, 6, 7], segment_ids=[1, 1, 2, 2],
              positions=[0, 1, 0, 1], loss_mask=[1, 0, 1, 1]),
         dict(inputs=[15, 16, 17, 0], targets=[16, 17, 0, 18], segment_ids=[1, 1, 1, 1],
              positions=[0, 1, 2, 3], loss_mask=[1, 1, 1, 0])],
        [dict(inputs=[7, 8, 9, 10], targets=[8, 9, 10, 0], segment_ids=[1, 1, 1, 1],
              positions=[0, 1, 2, 3], loss_mask=[1, 1, 1, 1]),
         dict(inputs=[18, 0, 19, 20], targets=[0, 19, 20, 0], segment_ids=[1, 1, 2, 2],
              positions=[0, 1, 0, 1], loss_mask=[1, 0, 1, 1])],
    ]
    batches = list(it)  # a finite document sequence ends at the first batch it cannot fill
    assert len(batches) == len(expected)
    for batch, want in zip(batches, expected, strict=True):
        for key in KEYS:
            assert batch[key].shape == (2, 4)
            np.testing.assert_array_equal(batch[key], [row[key] for row in want], err_msg=key)
    assert sorted(loads) == list(range(len(docs)))  # each document read once
    # Restoring from every intermediate state gives the same remaining batches.
    it = hand_packer(docs)
    for i in range(len(expected)):
        state = it.get_state()
        assert len(state["streams"]) == 2
        rest = hand_packer(docs)
        rest.set_state(json.loads(json.dumps(state)))
        assert_same(list(rest), batches[i:])
        next(it)
    with pytest.raises(ValueError, match="one pair per row"):
        hand_packer(docs, batch_size=3).set_state(state)


def test_document_masks_reach_the_loss_mask():
    # Doc 0 is a prompt (1 2) + completion (3); its EOS is a target. Doc 1 has no mask.
    docs, masks = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10, 11]], [[0, 0, 1], None]
    it = hand_packer([docs[0], docs[1], [12] * 9, [13] * 9], [masks[0], None, None, None])
    first = next(it)
    np.testing.assert_array_equal(first["inputs"][0], [1, 2, 3, 0])
    np.testing.assert_array_equal(first["targets"][0], [2, 3, 0, 12])
    # 1→2 is prompt (0); 2→3 and 3→EOS are the completion (1); EOS→next document is 0.
    np.testing.assert_array_equal(first["loss_mask"][0], [0, 1, 1, 0])
    np.testing.assert_array_equal(first["loss_mask"][1], [1, 1, 1, 1])


def test_streams_pack_their_documents(tmp_path):
    tok, T, B = ByteTokenizer(), 8, 2
    docs = ["a", "bcd", "efghi", "jklmnopqrstu", "vwxyzABCDEFGHIJKLMNOP", "QR"]
    sources = {"hand": data_source("text", write_docs(tmp_path, docs),
                                              heldout_fraction=0.0)}
    cfg = make_config(seq_len=T, batch_size=B, sources=sources, mixture={"hand": 1.0})
    batches = take(data.make_iterator(cfg, "pretrain", tok), 12)
    # The document sequence: every epoch a permutation of the documents.
    sequence = data.document_sequence(cfg, "pretrain", tok, "train")
    texts = [tok.decode(sequence[k].ids) for k in range(8 * len(docs))]
    for epoch_start in range(0, len(texts), len(docs)):
        assert sorted(texts[epoch_start:epoch_start + len(docs)]) == sorted(docs)
    for b in range(B):
        rows = [{key: batch[key][b] for key in KEYS} for batch in batches]
        for row in rows:
            for key in KEYS:
                assert row[key].shape == (T,)
                assert row[key].dtype == (np.float32 if key == "loss_mask" else np.int32)
        # Stream b's rows chain with a one-token overlap...
        stream = list(rows[0]["inputs"]) + [rows[0]["targets"][-1]]
        for prev, row in zip(rows, rows[1:], strict=False):
            assert row["inputs"][0] == prev["targets"][-1]
            np.testing.assert_array_equal(row["inputs"][1:], row["targets"][:-1])
            stream += list(row["targets"])
        # ...into exactly documents b, b + B, b + 2B, ... of the sequence, joined with EOS.
        joined = [t for text in texts[b::B] for t in [*tok.encode(text), tok.eos_id]]
        assert len(joined) > len(stream)
        assert stream == joined[:len(stream)]

        # A plain reference: document of every stream token (the EOS belongs to its document).
        doc_of = np.cumsum([0] + [t == tok.eos_id for t in stream[:-1]])
        for r, row in enumerate(rows):
            idx = np.arange(r * T, r * T + T)  # the row's inputs; targets are idx + 1
            np.testing.assert_array_equal(row["segment_ids"], doc_of[idx] - doc_of[idx[0]] + 1)
            starts = np.array([i == r * T or doc_of[i] != doc_of[i - 1] for i in idx])
            last_start = np.maximum.accumulate(np.where(starts, idx, 0))
            np.testing.assert_array_equal(row["positions"], idx - last_start)
            np.testing.assert_array_equal(row["loss_mask"], doc_of[idx] == doc_of[idx + 1])
            # Zero exactly where the input is an EOS, i.e. the target starts the next document.
            np.testing.assert_array_equal(row["loss_mask"] == 0, row["inputs"] == tok.eos_id)


def test_rows_of_a_batch_come_from_different_documents(tmp_path):
    tok, T, B = ByteTokenizer(), 16, 4
    lengths = np.random.default_rng(0).integers(2 * T, 4 * T, size=20)  # longer than a row
    docs = [chr(ord("A") + i) * int(n) for i, n in enumerate(lengths)]
    sources = {"hand": data_source("text", write_docs(tmp_path, docs),
                                              heldout_fraction=0.0)}
    cfg = make_config(seq_len=T, batch_size=B, sources=sources, mixture={"hand": 1.0})
    # 8 batches use under 8·T + 1 tokens per stream, within its first five documents: no repeats.
    for batch in take(data.make_iterator(cfg, "pretrain", tok), 8):
        letters = [set(np.concatenate([inputs, targets]).tolist()) - {tok.eos_id}
                   for inputs, targets in zip(batch["inputs"], batch["targets"], strict=True)]
        assert all(0 < len(row) <= 2 for row in letters)
        for b in range(B):
            for c in range(b):
                assert not letters[b] & letters[c]


def test_mixture_proportions_over_10000_documents(tmp_path):
    tok, sources = ByteTokenizer(), two_text_sources(tmp_path)
    cfg = make_config(seq_len=256, batch_size=8, sources=sources, mixture={"a": 0.7, "b": 0.3})
    counts = {"a": 0, "b": 0}
    for batch in take(data.make_iterator(cfg, "pretrain", tok), 24):
        ends = batch["targets"] == tok.eos_id  # one per document, rows never repeat a pair
        for name in counts:
            counts[name] += int(np.sum(ends & (batch["inputs"] == ord(name))))
    total = counts["a"] + counts["b"]
    assert total > 10_000
    assert abs(counts["a"] / total - 0.7) < 0.02
    # The sequence itself: within 1/BLOCK of the weights over every whole block.
    sequence = data.document_sequence(cfg, "pretrain", tok, "train")
    names = [sequence.names[sequence.mixture.locate(k)[0]] for k in range(mixture.BLOCK)]
    assert abs(names.count("a") / mixture.BLOCK - 0.7) < 1 / mixture.BLOCK
    for k in range(0, 20_000, 1000):  # documents come from the sources named
        assert tok.decode(sequence[k].ids)[0] == names[k]


def test_a_new_stage_switches_mixture_at_its_first_step(tmp_path):
    tok = ByteTokenizer()
    cfg = make_config(seq_len=64, batch_size=4, sources=two_text_sources(tmp_path),
                      mixture={"a": 1.0, "b": 0.0})
    cfg.stages.anneal.update(steps=1, seq_len=64, batch_size=4)
    cfg.stages.anneal.mixture = {"b": 1.0}
    first = next(data.make_iterator(cfg, "pretrain", tok))
    assert set(np.unique(first["inputs"])) <= {ord("a"), tok.eos_id}
    after = next(data.make_iterator(cfg, "anneal", tok))
    assert set(np.unique(after["inputs"])) <= {ord("b"), tok.eos_id}


def test_eval_batches_fixed_and_shaped():
    cfg = make_config(seq_len=16, batch_size=2)
    cfg.data.eval_batches = 3
    first = data.eval_batches(cfg, "pretrain", ByteTokenizer())
    assert len(first) == 3
    assert first[0]["inputs"].shape == (2, 16)
    assert_same(first, data.eval_batches(cfg, "pretrain", ByteTokenizer()))


def test_worker_processes_give_the_same_batches_and_report_throughput():
    cfg, tok = make_config(seq_len=64, batch_size=4, seed=2), ByteTokenizer()
    threads = data.make_iterator(cfg, "pretrain", tok, workers=0)
    processes = data.make_iterator(cfg, "pretrain", tok, workers=2)
    assert isinstance(processes._loader, loader.ProcessLoader)
    expected = take(threads, 6)
    assert_same(take(processes, 3), expected[:3])
    state = processes.get_state()
    processes.set_state(state)  # drops what was loaded ahead, then loads it again
    assert_same(take(processes, 3), expected[3:])
    stats = processes.stats()
    assert stats["data_wait_sec"] > 0 and stats["data_tokens_per_sec"] > 0
    assert processes.stats()["data_wait_sec"] == 0  # reset by the call before
    processes.close()


def test_loading_runs_ahead_of_the_batches():
    docs = [[1 + k % 200] * 5 for k in range(400)]
    requested = []

    class Recording(loader.ThreadLoader):
        def submit(self, indices):
            requested.extend(indices)
            return super().submit(indices)

    def load(k):
        return mixture.Document(np.asarray(docs[k], np.int32), None, 0)

    it = packing.StripedBatchIterator(Recording(load), 2, seq_len=4, eos_id=0, prefetch=2)
    next(it)
    # A row of 4 needs one 6-token document; the next two batches' are requested already.
    assert len(requested) == 2 * 3
    assert sorted(requested) == list(range(6))


def test_real_tokenizer():
    from jaxllm.data.tokenizer import load_tokenizer

    tok = load_tokenizer("qwen2", max_rank=4096)
    batch = next(data.make_iterator(make_config(seq_len=64, batch_size=2), "pretrain", tok))
    assert batch["inputs"].max() < tok.vocab_size
    assert np.all(batch["inputs"][batch["loss_mask"] == 0] == tok.eos_id)


def test_stage_mixture_errors():
    with pytest.raises(ConfigError, match="mixture.nope"):
        iterator.stage_mixture(make_config(mixture={"nope": 1.0}), "pretrain")
    with pytest.raises(ConfigError, match="positive weight"):
        iterator.stage_mixture(make_config(mixture={"stdlib": 0.0}), "pretrain")
