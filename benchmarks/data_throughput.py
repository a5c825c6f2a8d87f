"""Data pipeline throughput beside what training consumes, and `prepare` speed.

    python -m benchmarks.data_throughput [--config=configs/tiny.py] [--stage=pretrain]
        [--batches=300] [--workers=2] [--prepare_mb=100] [--train_steps=20]

Prints one table, all measured in this run on this machine:
  pipeline, threads         tokens/s of make_iterator(workers=0) in a tight loop (no training)
  pipeline, N processes     the same with N worker processes
  pipeline, ArrayRecord     the same reading `prepare`'s pre-tokenized shards (no tokenizing)
  training consumes         tokens/s of the config's model's jitted train step (the peer the
                            pipeline must outrun), and the seconds per step `next(data)`
                            blocked when both run together
  prepare                   MB/s of text → ArrayRecord on --prepare_mb of generated JSON lines
                            (the standard library's sources, repeated; nothing is downloaded)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import jax

from jaxllm.config.load import load_config
from jaxllm.config.schema import data_source
from jaxllm.data import formats, make_iterator, prepare
from jaxllm.data.tokenizer import load_tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pipeline_rate(config, stage: str, tokenizer, batches: int, workers: int) -> float:
    it = make_iterator(config, stage, tokenizer, workers=workers)
    for _ in range(5):  # worker start-up and the first documents are not the steady state
        next(it)
    start = time.perf_counter()
    for _ in range(batches):
        batch = next(it)
    elapsed = time.perf_counter() - start
    it.close()
    return batches * batch["inputs"].size / elapsed


def training(config, stage_name: str, tokenizer, steps: int) -> tuple[float, float]:
    """(train-step tokens/s, mean seconds per step that next(data) blocked) on real batches."""
    from jaxllm.model import frozen, init_params
    from jaxllm.train.optim import make_optimizer, make_schedule
    from jaxllm.train.step import TrainState, make_train_step

    stage = config.stages[stage_name]
    tx = make_optimizer(config.optimizer)
    params = init_params(config.model, jax.random.key(0))
    state = TrainState.create(params, tx.init(params))
    step_fn = jax.jit(make_train_step(frozen(config.model), tx, make_schedule(stage.lr, 1000),
                                      0, 1, 0.0), donate_argnums=0)
    data = make_iterator(config, stage_name, tokenizer)
    for _ in range(3):  # compile
        state, metrics = step_fn(state, next(data))
    jax.block_until_ready(metrics)
    data.stats()
    start = time.perf_counter()
    for _ in range(steps):
        state, metrics = step_fn(state, next(data))
        jax.block_until_ready(metrics)  # as a logging step would; the data must keep up
    elapsed = time.perf_counter() - start
    wait = data.stats()["data_wait_sec"] / steps
    data.close()
    return steps * stage.batch_size * stage.seq_len / elapsed, wait


def make_corpus(folder: str, megabytes: float) -> str:
    """JSON lines of the standard library's sources, repeated to `megabytes`."""
    files = formats.list_files("python_stdlib", "", "stdlib")
    path, written, copy = os.path.join(folder, "corpus.jsonl"), 0, 0
    with open(path, "w") as f:
        while written < megabytes * 2**20:
            for rel, file in files:
                with open(file, encoding="utf-8", errors="replace") as src:
                    line = json.dumps({"text": f"# copy {copy} of {rel}\n" + src.read()}) + "\n"
                f.write(line)
                written += len(line)
                if written >= megabytes * 2**20:
                    break
            copy += 1
    return path


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default=os.path.join(ROOT, "jaxllm", "configs", "tiny.py"))
    parser.add_argument("--stage", default="pretrain")
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--prepare_mb", type=float, default=100.0)
    parser.add_argument("--train_steps", type=int, default=20)
    args = parser.parse_args()
    config = load_config(args.config)
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    stage = config.stages[args.stage]
    rows = [("pipeline, threads (workers=0)",
             pipeline_rate(config, args.stage, tokenizer, args.batches, 0), "")]
    rows.append((f"pipeline, {args.workers} worker processes",
                 pipeline_rate(config, args.stage, tokenizer, args.batches, args.workers), ""))
    with tempfile.TemporaryDirectory() as tmp:
        if args.prepare_mb > 0:
            corpus = make_corpus(tmp, args.prepare_mb)
            manifest = prepare.prepare(corpus, os.path.join(tmp, "shards"),
                                       tokenizer=config.tokenizer.name,
                                       max_rank=config.tokenizer.max_rank, progress=False)
            run = manifest["run"]
            prepared = load_config(args.config)
            prepared.data.sources = {"prepared": data_source(
                "arrayrecord", os.path.join(tmp, "shards"))}
            for name in prepared.stages.keys():
                prepared.stages[name].mixture = {"prepared": 1.0}
            rows.append(("pipeline, ArrayRecord shards (threads)",
                         pipeline_rate(prepared, args.stage, tokenizer, args.batches, 0), ""))
    train_rate, wait = training(config, args.stage, tokenizer, args.train_steps)
    rows.append(("training consumes (train step)", train_rate,
                 f"next(data) blocked {wait * 1e3:.2f} ms/step"))
    print(f"\n{os.path.basename(args.config)} stage {args.stage}: batch {stage.batch_size} x "
          f"seq_len {stage.seq_len}; {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores, jax {jax.__version__} on {jax.devices()[0].platform}\n")
    print(f"| {'what':<40} | {'tokens/s':>12} | {'x training':>10} | note")
    print(f"|{'-' * 42}|{'-' * 13}:|{'-' * 11}:|------")
    for what, rate, note in rows:
        print(f"| {what:<40} | {rate:>12,.0f} | {rate / train_rate:>10.1f} | {note}")
    if args.prepare_mb > 0:
        print(f"\nprepare: {run['input_bytes'] / 2**20:.0f} MB of JSON lines, "
              f"{manifest['documents']:,} documents, {manifest['tokens']:,} tokens in "
              f"{run['seconds']:.1f} s on {os.cpu_count()} worker processes = "
              f"{run['mb_per_sec']:.1f} MB/s ({manifest['tokens'] / run['seconds']:,.0f} "
              "tokens/s)")


if __name__ == "__main__":
    main()
