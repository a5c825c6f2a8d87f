"""A small model that retrieves needles, and what long-context evaluation shows about it: the
README's needle-in-a-haystack heatmaps and perplexity-by-position plot.

    python benchmarks/long_context.py --workdir=DIR [--train_len=1024] [--steps_scale=1.0]

1. Data. Retrieval exercises (`jaxllm.eval.niah.training_document`: up to `--max_needles`
   key/value needles between the lines of a text, then their questions and answers) over
   windows of the Python standard library's *training* split, written to
   DIR/needles/{short,long}.jsonl: windows of 16-192 tokens for the first stage, of 192 up to
   about train_len for the others. The evaluation's haystacks come from the held-out split,
   so no haystack is seen in training.
2. Training. configs/tiny.py (about 5M parameters) with those exercises in every stage's
   mixture: pretrain at 256 tokens (rope base 1e4), long_context and anneal at train_len
   (rope base 1e6), model.max_position_embeddings = train_len. Resumes if DIR/run exists.
3. Evaluation, within and beyond the trained length (up to 4 × train_len), for three
   settings: base (plain rope), yarn (factor 4 over train_len) and yarn + dual chunk
   attention (chunk + local = train_len, so no position index leaves the trained range):
   `python -m jaxllm.eval.niah` once per setting and `python -m jaxllm.eval.long_ppl` with all
   three; JSON and PNGs in DIR/eval, and a markdown table of NIAH accuracy by length.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import numpy as np

from jaxllm.config import data_source, load_config
from jaxllm.eval import long_ppl, niah

_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs",
                     "tiny.py")
SHORT = (16, 192)  # window tokens of the pretrain stage's exercises


def write_exercises(path: str, tokenizer, windows: tuple[int, int], count: int, seed: int,
                    max_tokens: int, max_needles: int) -> int:
    """Writes `count` exercises over training-split windows of windows[0]..windows[1] tokens,
    keeping those of at most `max_tokens` tokens (so that a row holds one whole); returns the
    tokens written."""
    from jaxllm.data.sources import open_source

    source = open_source(data_source("python_stdlib"), "train", "needles", seed)
    rng = np.random.default_rng([seed, windows[1]])
    encoded: dict[int, list[int]] = {}  # each file is read many times
    written = tokens = 0
    with open(path, "w") as f:
        for i in range(10 * count):
            j = i % len(source)
            if j not in encoded:
                encoded[j] = tokenizer.encode(source[j].text)
            ids = encoded[j]
            size = int(rng.integers(windows[0], windows[1] + 1))
            if len(ids) < size:
                continue
            start = int(rng.integers(0, len(ids) - size + 1))
            text = niah.training_document(tokenizer.decode(ids[start:start + size]), rng,
                                          max_needles)
            n = len(tokenizer.encode(text))
            if n > max_tokens:
                continue
            f.write(json.dumps({"text": text}) + "\n")
            written, tokens = written + 1, tokens + n
            if written == count:
                break
    return tokens


def demo_config(train_len: int, data_dir: str, scale: float):
    """configs/tiny.py with the exercises in each stage's mixture, trained at `train_len`."""
    config = load_config(_TINY)
    config.model.max_position_embeddings = train_len
    # Weights count documents: a source file holds ~4,700 tokens on average, an exercise
    # ~170 (pretrain) or ~600, so these give exercises 90 % and 70 % of the tokens.
    config.data.sources.needles_short = data_source("jsonl", os.path.join(data_dir, "short.jsonl"),
                                                    min_tokens=1, align_long=True)
    config.data.sources.needles_long = data_source("jsonl", os.path.join(data_dir, "long.jsonl"),
                                                   min_tokens=1, align_long=True)
    steps = lambda n: max(1, round(n * scale))  # noqa: E731
    s = config.stages
    s.pretrain.update(steps=steps(2400), seq_len=256, batch_size=8,
                      mixture={"stdlib": 0.004, "needles_short": 0.996})
    s.pretrain.lr.update(peak=3e-3, end=3e-4, warmup_steps=min(50, s.pretrain.steps // 2))
    s.long_context.update(steps=steps(300), seq_len=train_len, batch_size=4,
                          mixture={"stdlib": 0.05, "needles_long": 0.95})
    s.long_context.lr.update(peak=1e-3, end=1e-3)
    s.anneal.update(steps=steps(50), seq_len=train_len, batch_size=4,
                    mixture={"stdlib": 0.05, "needles_long": 0.95})
    s.anneal.lr.update(peak=1e-3, end=1e-4)
    config.log_every = 50
    config.eval_every = 250
    config.checkpoint.every_steps = 250
    return config


def settings(train_len: int) -> list[str]:
    local = train_len // 8
    return ["base:",
            f"yarn:rope_scaling.type=yarn,rope_scaling.factor=4,"
            f"rope_scaling.original_max_position_embeddings={train_len}",
            f"yarn_dca:rope_scaling.type=yarn,rope_scaling.factor=4,"
            f"rope_scaling.original_max_position_embeddings={train_len},dca.enabled=true,"
            f"dca.chunk_size={train_len - local},dca.local_size={local}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True)
    parser.add_argument("--train_len", type=int, default=1024)
    parser.add_argument("--steps_scale", type=float, default=1.0,
                        help="multiplies every stage's steps (and the exercises written)")
    parser.add_argument("--samples", type=int, default=8, help="needles per NIAH cell")
    parser.add_argument("--max_needles", type=int, default=1,
                        help="needles per exercise (1: plain copying; more: match the key)")
    args = parser.parse_args()
    from jaxllm.tokenizer import load_tokenizer
    from jaxllm.train.pipeline import run

    data_dir = os.path.join(args.workdir, "needles")
    run_dir, out = os.path.join(args.workdir, "run"), os.path.join(args.workdir, "eval")
    os.makedirs(data_dir, exist_ok=True)
    config = demo_config(args.train_len, data_dir, args.steps_scale)
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    start = time.time()
    for name, windows, count, max_tokens in (
            ("short", SHORT, 60_000, 255),
            ("long", (SHORT[1], args.train_len - 100), 8_000, args.train_len - 1)):
        path = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.exists(path):
            n = round(count * max(args.steps_scale, 0.05))
            tokens = write_exercises(path, tokenizer, windows, n, 0, max_tokens,
                                     args.max_needles)
            print(f"wrote {path}: {n} exercises, {tokens:,} tokens", flush=True)
    run(config, run_dir)
    trained = time.time() - start

    lengths = [n for n in (256, 512, 1024, 2048, 4096) if n <= 4 * args.train_len]
    lengths = sorted({*lengths, args.train_len, 2 * args.train_len, 4 * args.train_len})
    flags = ["--workdir", run_dir, "--out", out]
    rows = {}
    for setting in settings(args.train_len):
        name = setting.split(":")[0]
        niah.main([*flags, "--lengths", ",".join(map(str, lengths)), "--samples",
                   str(args.samples), "--settings", setting])
        for ext in ("json", "png"):
            os.replace(os.path.join(out, f"niah.{ext}"), os.path.join(out, f"niah_{name}.{ext}"))
        with open(os.path.join(out, f"niah_{name}.json")) as f:
            rows[name] = np.asarray(json.load(f)["accuracy"]).mean(axis=1)
    long_ppl.main([*flags, "--seq_len", str(4 * args.train_len), "--bucket_size",
                   str(args.train_len // 2), "--num_docs", "8",
                   *[f"--settings={s}" for s in settings(args.train_len)]])

    print(f"\n{platform.processor() or platform.machine()}, {os.cpu_count()} cores; trained "
          f"and wrote data in {trained / 60:.1f} min; trained length {args.train_len}")
    print("\nNIAH accuracy (mean over depths) by context length:\n")
    print("| setting | " + " | ".join(map(str, lengths)) + " |")
    print("|---|" + "--:|" * len(lengths))
    for name, acc in rows.items():
        print(f"| {name} | " + " | ".join(f"{a:.2f}" for a in acc) + " |")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
