"""End to end: packing never lets a document see another. A packed batch's per-token losses
equal each document's own losses, run alone; a prompt's tokens are never targets of the loss.

B batch, T sequence length, V vocab.
"""

from __future__ import annotations

import os

import jax
import numpy as np

from jaxllm import data
from jaxllm.config.load import load_config
from jaxllm.config.schema import data_source
from jaxllm.model import forward, frozen, init_params
from jaxllm.train.loss import token_losses
from tests.helpers.data import ByteTokenizer, take, write_jsonl
from tests.helpers.runs import ROOT


def test_packed_batch_losses_equal_each_documents_own(tmp_path):
    tok, T = ByteTokenizer(), 32
    rng = np.random.default_rng(0)
    records = [{"q": f"Q{i}? ", "a": "".join(rng.choice(list("abcdefgh"), rng.integers(3, 50)))}
               for i in range(40)]  # some longer than a row: they carry on in the next
    cfg = load_config(os.path.join(ROOT, "jaxllm", "configs", "tiny.py:smoke"))
    cfg.data.sources = {"sft": data_source(
        "jsonl", write_jsonl(tmp_path / "sft.jsonl", records), text_field="a",
        prompt_field="q", heldout_fraction=0.0)}
    cfg.stages.pretrain.update(seq_len=T, batch_size=2)
    cfg.stages.pretrain.mixture = {"sft": 1.0}
    for name in ("long_context", "anneal"):
        cfg.stages[name].mixture = {"sft": 1.0}
    model = frozen(cfg.model)
    params = init_params(model, jax.random.key(0))
    nll_fn = jax.jit(lambda inputs, targets, positions, segments: token_losses(
        forward(model, params, inputs, positions, segments), targets)[0])
    n = 4  # batches of 2 rows
    batches = take(data.make_iterator(cfg, "pretrain", tok), n)
    # Alone: each document's tokens of a row from position 0, right-padded to T (causal: the
    # padding changes nothing before it). One forward pass: rows 0..2n-1 are the packed rows,
    # the rest one document each.
    segments = [(k, b, np.flatnonzero(batch["segment_ids"][b] == s))
                for k, batch in enumerate(batches) for b in range(2)
                for s in np.unique(batch["segment_ids"][b])]
    assert len(segments) > 10
    arrays = {key: np.zeros((64, T), np.int32)
              for key in ("inputs", "targets", "positions", "segment_ids")}
    for key in arrays:
        arrays[key][:2 * n] = np.concatenate([batch[key] for batch in batches])
    for row, (k, b, idx) in enumerate(segments, start=2 * n):
        arrays["inputs"][row, :len(idx)] = batches[k]["inputs"][b, idx]
        arrays["targets"][row, :len(idx)] = batches[k]["targets"][b, idx]
        arrays["positions"][row] = np.arange(T)
        arrays["segment_ids"][row] = 1
    nll = np.asarray(nll_fn(*arrays.values()))
    packed_nll, alone_nll = nll[:2 * n].reshape(n, 2, T), nll[2 * n:]
    for row, (k, b, idx) in enumerate(segments):
        np.testing.assert_allclose(packed_nll[k, b, idx], alone_nll[row, :len(idx)],
                                   rtol=1e-5, atol=1e-5)
    for batch in batches:  # prompts are never targets; completions and their EOS are
        prompt_targets = np.isin(batch["targets"], [ord("Q"), ord("?")])
        assert np.all(batch["loss_mask"][prompt_targets] == 0)
        completion = (batch["targets"] >= ord("a")) & (batch["targets"] <= ord("h"))
        assert np.all(batch["loss_mask"][completion & (batch["positions"] > 0)] == 1)
    # The check has teeth: without segment ids, later documents see earlier ones.
    arrays["segment_ids"][:2 * n] = 1
    unmasked = np.asarray(nll_fn(*arrays.values()))[:2 * n].reshape(n, 2, T)
    assert not np.allclose(unmasked, packed_nll, atol=1e-4)
