"""Perplexity by position bucket over long held-out documents, for one or more model settings.

    python -m jaxllm.eval.long_ppl --workdir=DIR | --hf=DIR [--seq_len=32768]
        [--bucket_size=1024] [--num_docs=8] [--batch_size=1]
        [--settings=base: --settings=theta1e4:rope_theta=1e4 ...] [--data=FORMAT[:PATH]]

Each document is cut to its first T + 1 tokens (T = `--seq_len`, default the model's
max_position_embeddings; only held-out documents at least that long are used) and run as one
sequence of T inputs, as a training row. The prediction at position p (p = 0 .. T-1: of token
p + 1, from tokens 0 .. p) adds its negative log-likelihood to bucket
min(p // bucket_size, cap // bucket_size), so with 1K buckets they are 0-1K, 1K-2K, ..., and
32K+ for every position from `cap` (default 32 buckets) on. A bucket's perplexity is exp(its
mean NLL over all documents' predictions there).

Settings are named model-config overrides (jaxllm.config syntax, keys relative to
config.model): `base:` is the model as saved, `yarn:rope_scaling.type=yarn,rope_scaling.factor=4`
or `dca:dca.enabled=true` compare position-extension methods on the same documents.
Writes long_ppl.json and long_ppl.png (one line per setting) to `--out`.

`config.eval_long_every` runs the same computation during training (`LongPplEvaluator`).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections as mc
import numpy as np

from jaxllm.eval import common
from jaxllm.model.transformer import apply, frozen
from jaxllm.train.loss import token_losses

CAP_BUCKETS = 32  # positions from 32 buckets on share the last one ("32K+" for 1K buckets)


def _short(n: int) -> str:
    return f"{n // 1024}K" if n and n % 1024 == 0 else str(n)


def bucket_labels(seq_len: int, bucket_size: int, cap: int = 0) -> list[str]:
    """Labels of the buckets that positions 0 .. seq_len-1 fall in."""
    cap = cap or CAP_BUCKETS * bucket_size
    last = min((seq_len - 1) // bucket_size, cap // bucket_size)
    return [f"{_short(cap)}+" if i * bucket_size >= cap else
            f"{_short(i * bucket_size)}-{_short((i + 1) * bucket_size)}" for i in range(last + 1)]


def bucket_sums(nll_BxT: np.ndarray, positions_BxT: np.ndarray, bucket_size: int,
                num_buckets: int, cap: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(Σ nll, prediction count) per bucket of the predictions' positions."""
    cap = cap or CAP_BUCKETS * bucket_size
    index = np.minimum(positions_BxT // bucket_size, cap // bucket_size).ravel()
    sums = np.bincount(index, weights=np.asarray(nll_BxT, np.float64).ravel(),
                       minlength=num_buckets)
    return sums[:num_buckets], np.bincount(index, minlength=num_buckets)[:num_buckets]


@functools.partial(jax.jit, static_argnums=0)
def _token_nll(model_config: mc.FrozenConfigDict, params: dict, inputs_BxT: jax.Array,
               targets_BxT: jax.Array, positions_BxT: jax.Array) -> jax.Array:
    """Each target's negative log-likelihood, float32 [B, T]; only [B, T] leaves the device."""
    logits_BxTxV = apply(model_config, params, inputs_BxT, positions_BxT,
                         jnp.ones_like(inputs_BxT))
    return token_losses(logits_BxTxV, targets_BxT)[0]


def perplexity(model_config: Any, params: dict, docs_BxT: np.ndarray, bucket_size: int,
               batch_size: int = 1, cap: int = 0, place=None, order: np.ndarray | None = None
               ) -> dict[str, Any]:
    """Perplexity by position bucket of documents `docs_BxT` (int32, one per row, T + 1
    tokens: T predictions).

    `place` puts a host array onto the devices (default: as is); `order` (training's ring
    attention layout, blocks.row_order) permutes each row's tokens first: every
    token's loss is its own, so neither changes a number."""
    docs_BxT = np.asarray(docs_BxT, np.int32)
    T = docs_BxT.shape[1] - 1
    if T < 1:
        raise ValueError(f"documents of {T + 1} tokens have nothing to predict")
    labels = bucket_labels(T, bucket_size, cap)
    sums, counts = np.zeros(len(labels)), np.zeros(len(labels), np.int64)
    cfg = frozen(model_config)
    positions_T = np.arange(T, dtype=np.int32)
    for start in range(0, len(docs_BxT), batch_size):
        rows = docs_BxT[start:start + batch_size]
        batch = {"inputs": rows[:, :-1], "targets": rows[:, 1:],
                 "positions": np.broadcast_to(positions_T, rows[:, :-1].shape)}
        if order is not None:
            batch = {k: v[:, order] for k, v in batch.items()}
        put = place or (lambda x: x)
        nll = np.asarray(jax.device_get(_token_nll(cfg, params, put(batch["inputs"]),
                                                   put(batch["targets"]),
                                                   put(batch["positions"]))))
        s, c = bucket_sums(nll, batch["positions"], bucket_size, len(labels), cap)
        sums, counts = sums + s, counts + c
    nll_mean = sums / np.maximum(counts, 1)
    return {"buckets": labels, "tokens": counts.tolist(), "nll": nll_mean.tolist(),
            "ppl": np.exp(nll_mean).tolist()}


def collect_documents(docs, num_docs: int, seq_len: int) -> np.ndarray:
    """The first `num_docs` documents of the iterable `docs` with at least `seq_len` tokens,
    cut to `seq_len`: int32 [B, seq_len] (B < num_docs when there are fewer)."""
    rows = []
    for ids in docs:
        if len(ids) >= seq_len:
            rows.append(np.asarray(ids[:seq_len], np.int32))
            if len(rows) == num_docs:
                break
    return np.stack(rows) if rows else np.zeros((0, seq_len), np.int32)


class LongPplEvaluator:
    """`config.eval_long_every` in the training loop (a jaxllm.train.loop.Evaluator): long_ppl
    of held-out documents of the long_context stage's mixture at its seq_len, on the training
    mesh → {"long_ppl/<bucket>": ppl}."""

    config_key, prefix = "eval_long_every", "long_ppl/"

    def __init__(self, config: mc.ConfigDict, max_scan: int = 2000):
        self.config, self.every, self.max_scan = config, int(config.eval_long_every), max_scan

    def for_stage(self, stage: Any):
        from jaxllm.data.iterator import document_sequence
        from jaxllm.parallel import sharding

        if stage.name != "long_context":
            return None
        T = int(self.config.stages[stage.name].seq_len)  # predictions a document: a row's
        bucket_size = int(self.config.eval_long.bucket_size) or max(1, T // 4)
        sequence = document_sequence(self.config, stage.name, stage.tokenizer, "heldout",
                                     skip_empty=True)
        docs = collect_documents(_each_once(sequence, self.max_scan),
                                 int(self.config.eval_long.num_docs), T + 1)
        if not len(docs):
            logging.warning("eval_long_every: no held-out document of stage %s among the first "
                            "%d has %d tokens; long_ppl is off", stage.name, self.max_scan, T + 1)
            return None
        replicated = sharding.replicated(stage.mesh)

        def place(x):
            return jax.make_array_from_process_local_data(replicated, np.ascontiguousarray(x))

        def evaluate(params: dict) -> dict[str, float]:
            result = perplexity(stage.model_cfg, params, docs, bucket_size,
                                batch_size=len(docs), place=place, order=stage.order)
            return {f"long_ppl/{b}": p for b, p in zip(result["buckets"], result["ppl"],
                                                       strict=True)}

        return evaluate


def _each_once(sequence: Any, max_scan: int):
    """Token ids of the sequence's documents, each source document once (the held-out split
    is small, and its epochs repeat it)."""
    seen, total = set(), sum(len(s) for s in sequence.sources)
    for k in range(min(max_scan, 2 * total)):
        s, i = sequence.source_index(k)
        key = (s, i % len(sequence.sources[s]))
        if key not in seen:
            seen.add(key)
            yield sequence[k].ids


def plot(result: dict, path: str) -> None:
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for name, setting in result["settings"].items():
        ax.plot(range(len(result["buckets"])), setting["ppl"], marker="o", label=name)
    ax.set_xticks(range(len(result["buckets"])), result["buckets"], rotation=45, ha="right")
    ax.set_yscale("log")
    ax.set_xlabel("position (tokens of context before the prediction)")
    ax.set_ylabel("perplexity")
    ax.set_title(f"{result['num_docs']} held-out documents of {result['seq_len']} tokens")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def evaluate(model_config: mc.ConfigDict, params: dict, tokenizer: Any, settings: list[str],
             seq_len: int = 0, bucket_size: int = 1024, num_docs: int = 8, batch_size: int = 1,
             data: str = "python_stdlib", seed: int = 0, cap: int = 0) -> dict[str, Any]:
    """The JSON record of `python -m jaxllm.eval.long_ppl` (see the module docstring)."""
    named = [common.parse_setting(s) for s in settings]
    if len({n for n, _ in named}) != len(named):
        raise ValueError(f"--settings: names must differ, got {[n for n, _ in named]}")
    configs = {name: common.apply_setting(model_config, o, name) for name, o in named}
    seq_len = seq_len or int(model_config.max_position_embeddings)
    if bucket_size < 1:
        raise ValueError(f"--bucket_size must be >= 1, got {bucket_size}")
    docs = collect_documents(common.heldout_documents(tokenizer, data, seq_len + 1, seed),
                             num_docs, seq_len + 1)
    if not len(docs):
        raise ValueError(f"--data={data}: no held-out document has {seq_len + 1} tokens; "
                         "lower --seq_len or give longer documents")
    if len(docs) < num_docs:
        logging.warning("only %d held-out documents have %d tokens (asked for %d)", len(docs),
                        seq_len + 1, num_docs)
    record = {"seq_len": seq_len, "bucket_size": bucket_size,
              "cap": cap or CAP_BUCKETS * bucket_size, "num_docs": len(docs), "data": data,
              "buckets": bucket_labels(seq_len, bucket_size, cap), "settings": {}}
    progress = common.Progress(len(configs), "long_ppl")
    for (name, overrides), cfg in zip(named, configs.values(), strict=True):
        common.check_length(cfg, seq_len, f"--settings {name}")
        result = perplexity(cfg, params, docs, bucket_size, batch_size, cap)
        record["tokens"] = result["tokens"]
        record["settings"][name] = {"overrides": overrides, "nll": result["nll"],
                                    "ppl": result["ppl"]}
        progress.update(1, f"{name}: ppl {np.exp(np.mean(result['nll'])):.4g}")
    progress.close()
    return record


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.eval.long_ppl",
                                     description="Perplexity by position bucket.")
    common.add_model_flags(parser)
    parser.add_argument("--seq_len", type=int, default=0,
                        help="tokens per document (default: max_position_embeddings)")
    parser.add_argument("--bucket_size", type=int, default=1024)
    parser.add_argument("--num_docs", type=int, default=8)
    parser.add_argument("--batch_size", type=int, default=1, help="documents per forward pass")
    parser.add_argument("--settings", action="append", default=None,
                        help="NAME:KEY=VALUE,... model-config overrides; repeat to compare "
                             "(default: base:)")

    def body(args):
        model_config, params, tokenizer = common.load(args)
        record = evaluate(model_config, params, tokenizer, args.settings or ["base:"],
                          args.seq_len, args.bucket_size, args.num_docs, args.batch_size,
                          args.data, args.seed)
        out = common.out_dir(args)
        common.write_json(os.path.join(out, "long_ppl.json"), record)
        plot(record, os.path.join(out, "long_ppl.png"))
        for name, setting in record["settings"].items():
            print(name, " ".join(f"{b}={p:.4g}" for b, p in zip(record["buckets"],
                                                                setting["ppl"], strict=True)))
        print(f"wrote {out}/long_ppl.json and long_ppl.png")

    common.run_cli(body, parser, argv)


if __name__ == "__main__":
    main()
