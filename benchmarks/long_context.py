"""A small model that retrieves needles, and what long-context evaluation shows about it: the
needle-in-a-haystack heatmaps and perplexity-by-position plot of docs/long_context.md.

    python -m benchmarks.long_context --workdir=DIR [--train_len=1024] [--steps_scale=1.0]
        [--warmup_steps=1500] [--max_needles=1] [--samples=8]

1. Data, in DIR/needles. Retrieval exercises (`jaxllm.eval.niah.training_document`: up to
   `--max_needles` key/value needles between the lines of a text, then their questions and
   answers) over windows of the Python standard library's *training* split: windows of
   16-192 tokens for the first stage (short.jsonl), of 192 up to about train_len for the
   others (long.jsonl). The text with its needles is the record's prompt (no loss), so only
   the questions and answers are trained on. The evaluation's haystacks come from the
   held-out split, so no haystack is seen in training. And repeats.jsonl: random tokens
   repeated (`write_repeats`), for the warm-up.
2. Warm-up (DIR/warmup): a 1.8M-parameter Qwen2 (tiny's vocabulary, MODEL) trains on the
   repeats alone. Retrieval needs induction (attend to what followed an earlier occurrence
   of the current token), and on CPU it did not form from exercises and text alone in 2,700
   steps; on repeated random words it formed abruptly after ~1,000 steps of 32 × 256 tokens
   (the loss fell from ~7 to ~1.8 in 100 steps), but only for words: the repeats now draw
   from the whole vocabulary, digits included, and there it formed after ~525 steps (the
   demo in docs/long_context.md: from scratch, NIAH 1.00 / 1.00 / 0.95 at 256 / 512 / 1,024
   tokens). Its params go to DIR/warmup/params; if they exist, the warm-up is skipped.
3. Training (DIR/run) from those params: pretrain at 256 tokens (rope base 1e4), long_context
   and anneal at train_len (rope base 1e6, model.max_position_embeddings = train_len), each
   mixing exercises, repeats and plain text. Resumes if DIR/run exists.
4. Evaluation, within and beyond the trained length (up to 4 × train_len), for three
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

from jaxllm.config.load import load_config
from jaxllm.config.schema import data_source
from jaxllm.eval import long_ppl, niah

_TINY = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "jaxllm",
                     "configs", "tiny.py")
SHORT = (16, 192)  # window tokens of the pretrain stage's exercises
REPEAT = 240  # pieces (single tokens) of a warm-up sequence
# A 1.8M-parameter Qwen2 (tiny's vocabulary): ~2x tiny's tokens per second, so the warm-up's
# ~12M tokens take ~30 minutes on 2 CPU cores (~7,000 tokens/s, measured).
MODEL = dict(hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=384)


def write_exercises(path: str, tokenizer, windows: tuple[int, int], count: int, seed: int,
                    max_tokens: int, max_needles: int) -> int:
    """Writes `count` exercises over training-split windows of windows[0]..windows[1] tokens,
    keeping those of at most `max_tokens` tokens (so that a row holds one whole); returns the
    tokens written. A record's `prompt` (the text with its needles: no loss) precedes its
    `text` (the questions and answers: trained on)."""
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
            context, answers = niah.training_document(
                tokenizer.decode(ids[start:start + size]), rng, max_needles)
            n = len(tokenizer.encode(context + answers))
            if n > max_tokens:
                continue
            f.write(json.dumps({"prompt": context, "text": answers}) + "\n")
            written, tokens = written + 1, tokens + n
            if written == count:
                break
    return tokens


def write_repeats(path: str, tokenizer, max_rank: int, count: int, seed: int) -> int:
    """Writes `count` warm-up sequences: 10-60 random pieces (each one token of the whole
    vocabulary: digits, punctuation, code, words), repeated to REPEAT pieces; returns the
    pieces written (a few neighbours may merge into one token when encoded). After the first
    copy every token is predictable by induction (find the previous occurrence of the current
    token, copy what followed it), the circuit that retrieval is built on. Words alone were
    not enough: induction learnt on them did not carry to the needles' digits."""
    pieces = [p for p in (tokenizer.decode([i]) for i in range(max_rank))
              if p and "\ufffd" not in p]
    rng = np.random.default_rng(seed)
    with open(path, "w") as f:
        for _ in range(count):
            a = list(rng.choice(pieces, int(rng.integers(10, 61))))
            f.write(json.dumps({"text": "".join((a * (REPEAT // len(a) + 1))[:REPEAT])}) + "\n")
    return count * REPEAT


def model_and_sources(data_dir: str, train_len: int):
    """configs/tiny.py with the demo's model and the exercises as data sources."""
    config = load_config(_TINY)
    config.model.update(max_position_embeddings=train_len, **MODEL)
    config.data.sources.repeats = data_source("jsonl", os.path.join(data_dir, "repeats.jsonl"),
                                              min_tokens=1, align_long=True)
    for name in ("short", "long"):
        config.data.sources[f"needles_{name}"] = data_source(
            "jsonl", os.path.join(data_dir, f"{name}.jsonl"), prompt_field="prompt",
            min_tokens=1, align_long=True)
    config.log_every = 25
    config.eval_every = 250
    config.checkpoint.every_steps = 250
    return config


def warmup_config(data_dir: str, train_len: int, steps: int):
    """Induction warm-up: the repeated random tokens alone, at 32 × 256 tokens."""
    config = model_and_sources(data_dir, train_len)
    for name in [n for n in config.data.sources if n != "repeats"]:
        del config.data.sources[name]
    s = config.stages
    for stage in s.values():
        stage.mixture = {"repeats": 1.0}
    s.pretrain.update(steps=steps, seq_len=256, batch_size=32)
    s.pretrain.lr.update(peak=3e-3, end=3e-4, warmup_steps=min(50, steps // 2))
    s.long_context.steps = s.anneal.steps = 0
    return config


def demo_config(data_dir: str, train_len: int, scale: float, init: str):
    """The three stages from the warm-up's params `init`, exercises in every mixture."""
    config = model_and_sources(data_dir, train_len)
    config.init.checkpoint = init
    # Weights count documents: a source file holds ~4,700 tokens on average, a repeat 241,
    # an exercise ~170 (pretrain) or ~600; these give the pretrain stage ~25 % text, 25 %
    # repeats, 50 % exercises and the others ~30 %, 10 %, 60 %.
    steps = lambda n: max(1, round(n * scale))  # noqa: E731
    s = config.stages
    s.pretrain.update(steps=steps(600), seq_len=256, batch_size=32,
                      mixture={"stdlib": 0.013, "repeats": 0.26, "needles_short": 0.72})
    s.pretrain.lr.update(peak=2e-3, end=3e-4, warmup_steps=min(20, s.pretrain.steps // 2))
    later = {"stdlib": 0.044, "repeats": 0.28, "needles_long": 0.68}
    s.long_context.update(steps=steps(300), seq_len=train_len, batch_size=8, mixture=later)
    s.long_context.lr.update(peak=1e-3, end=1e-3)
    s.anneal.update(steps=steps(50), seq_len=train_len, batch_size=8, mixture=later)
    s.anneal.lr.update(peak=1e-3, end=1e-4)
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
    parser.add_argument("--warmup_steps", type=int, default=1500,
                        help="steps of the induction warm-up on repeated random tokens")
    args = parser.parse_args()
    if args.train_len - 100 <= SHORT[1]:
        parser.error(f"--train_len={args.train_len}: the long exercises need at least "
                     f"{SHORT[1] + 101} tokens")
    from jaxllm.checkpoint.run_dir import save_params
    from jaxllm.convert.load import load_model
    from jaxllm.data.tokenizer import load_tokenizer
    from jaxllm.train.stages import run

    data_dir = os.path.join(args.workdir, "needles")
    run_dir, out = os.path.join(args.workdir, "run"), os.path.join(args.workdir, "eval")
    warmup_dir = os.path.join(args.workdir, "warmup")
    os.makedirs(data_dir, exist_ok=True)
    config = model_and_sources(data_dir, args.train_len)
    tokenizer = load_tokenizer(config.tokenizer.name, max_rank=config.tokenizer.max_rank)
    start = time.time()
    scale = max(args.steps_scale, 0.05)
    path = os.path.join(data_dir, "repeats.jsonl")
    if not os.path.exists(path):
        tokens = write_repeats(path, tokenizer, config.tokenizer.max_rank, round(60_000 * scale),
                               0)
        print(f"wrote {path}: {tokens:,} pieces", flush=True)
    for name, windows, count, max_tokens in (
            ("short", SHORT, 60_000, 255),
            ("long", (SHORT[1], args.train_len - 100), 8_000, args.train_len - 1)):
        path = os.path.join(data_dir, f"{name}.jsonl")
        if not os.path.exists(path):
            n = round(count * scale)
            tokens = write_exercises(path, tokenizer, windows, n, 0, max_tokens,
                                     args.max_needles)
            print(f"wrote {path}: {n} exercises, {tokens:,} tokens", flush=True)
    init = os.path.join(warmup_dir, "params")
    if not os.path.exists(os.path.join(init, "model.json")):  # else: warmed up already
        run(warmup_config(data_dir, args.train_len, args.warmup_steps),
            os.path.join(warmup_dir, "run"))
        save_params(init, *load_model(workdir=os.path.join(warmup_dir, "run"))[:2])
    run(demo_config(data_dir, args.train_len, args.steps_scale, init), run_dir)
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
