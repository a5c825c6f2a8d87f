"""Needle in a haystack: retrieval accuracy over a grid of context lengths × needle depths.

    python -m jaxllm.eval.niah --workdir=DIR | --hf=DIR [--lengths=1024,2048,...]
        [--depths=0,0.25,0.5,0.75,1] [--samples=4] [--batch_size=8] [--data=FORMAT[:PATH]]
        [--settings=NAME:KEY=VALUE,...]

A prompt of exactly `length` tokens is held-out text (the haystack) with a needle, a key/value
sentence such as "The secret number of the blue door is 4721.", inserted at a fraction `depth`
of the haystack (0: first, 1: last, just before the question), then the question, which ends
by restating the sentence up to the value. The model decodes greedily; a sample is right when
the first word it writes, less trailing punctuation, is exactly the value. Each cell averages
`--samples` needles (seeded colours and 4-digit values) in haystacks from different offsets.
Writes niah.json (grid, per-cell accuracy, settings) and niah.png (heatmap) to `--out`.
`--settings` applies model-config overrides (one setting, as long_ppl's), e.g. rope scaling.
"""

from __future__ import annotations

import argparse
import os
import re
from dataclasses import dataclass
from typing import Any

import numpy as np

from jaxllm.eval import common

COLORS = ("blue", "red", "green", "yellow", "purple", "orange", "white", "black", "silver",
          "golden", "brown", "grey")


@dataclass(frozen=True)
class Needle:
    color: str
    value: str

    @property
    def sentence(self) -> str:
        return f"\nThe secret number of the {self.color} door is {self.value}.\n"

    @property
    def question(self) -> str:
        return (f"\n\nWhat is the secret number of the {self.color} door? "
                f"The secret number of the {self.color} door is")


def make_needles(count: int, seed: int) -> list[Needle]:
    rng = np.random.default_rng([seed, 0x41A])
    return [Needle(COLORS[int(rng.integers(len(COLORS)))], str(int(rng.integers(1000, 10000))))
            for _ in range(count)]


def build_prompt(haystack: list[int], needle: list[int], question: list[int], length: int,
                 depth: float) -> tuple[list[int], int]:
    """(prompt of exactly `length` tokens, index of the needle's first token): the first
    `length - len(needle) - len(question)` haystack tokens with the needle inserted after
    round(depth × that many) of them, then the question."""
    if not 0 <= depth <= 1:
        raise ValueError(f"depth {depth} is outside [0, 1]")
    room = length - len(needle) - len(question)
    if room < 0:
        raise ValueError(f"length {length} cannot hold the needle ({len(needle)} tokens) and "
                         f"the question ({len(question)})")
    if len(haystack) < room:
        raise ValueError(f"the haystack has {len(haystack)} tokens, {room} are needed")
    at = round(depth * room)
    hay = list(haystack[:room])
    return hay[:at] + list(needle) + hay[at:] + list(question), at


def score(generated: str, value: str) -> float:
    """1.0 when the first word of `generated`, less trailing punctuation, is exactly `value`."""
    words = generated.split()
    return float(bool(words) and re.sub(r"[.,;:!?'\"]+$", "", words[0]) == value)


def training_document(text: str, rng: np.random.Generator, max_needles: int = 4
                      ) -> tuple[str, str]:
    """A retrieval exercise to train on, as (context, answers): `text` with 1..max_needles
    needles of different colours put between its lines at random, then their questions in a
    random order, each followed by its value (what a model that retrieves would write). A
    trainer may take the context as a prompt (no loss) so that only the answers are learnt."""
    lines = text.splitlines(keepends=True)
    count = int(rng.integers(1, max_needles + 1))
    needles = [Needle(COLORS[c], str(int(rng.integers(1000, 10000))))
               for c in rng.choice(len(COLORS), size=count, replace=False)]
    for needle, at in zip(needles, sorted(rng.integers(0, len(lines) + 1, size=count),
                                           reverse=True), strict=True):
        lines.insert(int(at), needle.sentence)
    answers = "".join(f"{needles[i].question} {needles[i].value}."
                      for i in rng.permutation(count))
    return "".join(lines), answers


def haystack_pool(tokenizer: Any, data: str, tokens: int, seed: int) -> list[int]:
    """At least `tokens` ids of held-out documents joined by blank lines (repeated when the
    split is shorter)."""
    separator = tokenizer.encode("\n\n")
    pool: list[int] = []
    for _ in range(64):
        before = len(pool)
        for ids in common.heldout_documents(tokenizer, data, 1, seed):
            pool += ids.tolist() + separator
            if len(pool) >= tokens:
                return pool
        if len(pool) == before:
            break
    if not pool:
        raise ValueError(f"--data={data}: no held-out text")
    return (pool * (tokens // len(pool) + 1))[:tokens]


def evaluate(model_config: Any, params: dict, tokenizer: Any, lengths: list[int],
             depths: list[float], samples: int = 4, batch_size: int = 8,
             data: str = "python_stdlib", seed: int = 0, setting: str = "base:"
             ) -> dict[str, Any]:
    """The JSON record of `python -m jaxllm.eval.niah` (see the module docstring)."""
    from jaxllm.model.decode import generate_ids

    name, overrides = common.parse_setting(setting)
    model_config = common.apply_setting(model_config, overrides, name)
    if not lengths or not depths or samples < 1 or batch_size < 1:
        raise ValueError("need at least one length, one depth, samples >= 1, batch_size >= 1")
    needles = make_needles(samples, seed)
    longest = max(lengths)
    common.check_length(model_config, longest, "--lengths")
    stride = max(1, longest // 4)  # sample s reads the haystack from s·stride
    pool = haystack_pool(tokenizer, data, longest + stride * (samples - 1), seed)
    encoded = [(tokenizer.encode(n.sentence), tokenizer.encode(n.question),
                len(tokenizer.encode(" " + n.value)) + 2) for n in needles]
    accuracy = np.zeros((len(lengths), len(depths)))
    answers: list[dict] = []
    progress = common.Progress(len(lengths) * len(depths) * samples, "niah")
    for li, length in enumerate(lengths):
        cells = [(di, s) for di in range(len(depths)) for s in range(samples)]
        for start in range(0, len(cells), batch_size):
            group = cells[start:start + batch_size]
            prompts = [build_prompt(pool[s * stride:], encoded[s][0], encoded[s][1], length,
                                    depths[di])[0] for di, s in group]
            new = max(encoded[s][2] for _, s in group)
            outs = generate_ids(model_config, params, prompts, new, eos_id=tokenizer.eos_id,
                                num_ids=tokenizer.vocab_size)
            for (di, s), ids in zip(group, outs, strict=True):
                text = tokenizer.decode([t for t in ids if t != tokenizer.eos_id])
                right = score(text, needles[s].value)
                accuracy[li, di] += right / samples
                answers.append({"length": length, "depth": depths[di], "value": needles[s].value,
                                "generated": text, "correct": bool(right)})
            progress.update(len(group), f"length {length}")
    progress.close()
    return {"lengths": lengths, "depths": depths, "accuracy": accuracy.tolist(),
            "mean_accuracy": float(accuracy.mean()), "samples": samples, "data": data,
            "seed": seed, "settings": {name: overrides}, "answers": answers}


def plot(result: dict, path: str) -> None:
    plt = common.pyplot()
    acc = np.asarray(result["accuracy"])
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(result["depths"]),
                                    1.2 + 0.5 * len(result["lengths"])))
    image = ax.imshow(acc, vmin=0, vmax=1, cmap="RdYlGn", aspect="auto")
    ax.set_xticks(range(len(result["depths"])), [f"{d:g}" for d in result["depths"]])
    ax.set_yticks(range(len(result["lengths"])), [str(n) for n in result["lengths"]])
    for (i, j), a in np.ndenumerate(acc):
        ax.text(j, i, f"{a:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xlabel("needle depth")
    ax.set_ylabel("context length (tokens)")
    ax.set_title(f"needle in a haystack: mean {result['mean_accuracy']:.2f}")
    fig.colorbar(image, ax=ax, label="accuracy")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _numbers(text: str, kind: type, flag: str) -> list:
    try:
        return [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{flag}={text!r}: give comma-separated numbers") from None


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m jaxllm.eval.niah",
                                     description="Needle-in-a-haystack accuracy grid.")
    common.add_model_flags(parser)
    parser.add_argument("--lengths", default="",
                        help="context lengths in tokens (default: powers of two from 1024 to "
                             "max_position_embeddings)")
    parser.add_argument("--depths", default="0,0.25,0.5,0.75,1")
    parser.add_argument("--samples", type=int, default=4, help="needles per cell")
    parser.add_argument("--batch_size", type=int, default=8, help="prompts per generate call")
    parser.add_argument("--settings", default="base:",
                        help="NAME:KEY=VALUE,... model-config overrides (e.g. rope scaling)")

    def body(args):
        depths = _numbers(args.depths, float, "--depths")
        model_config, params, tokenizer = common.load(args)
        lengths = _numbers(args.lengths, int, "--lengths") if args.lengths else [
            1 << n for n in range(10, 31) if 1 << n <= model_config.max_position_embeddings]
        record = evaluate(model_config, params, tokenizer, lengths, depths, args.samples,
                          args.batch_size, args.data, args.seed, args.settings)
        out = common.out_dir(args)
        common.write_json(os.path.join(out, "niah.json"), record)
        plot(record, os.path.join(out, "niah.png"))
        print(f"mean accuracy {record['mean_accuracy']:.3f}; wrote {out}/niah.json and niah.png")

    common.run_cli(body, parser, argv)


if __name__ == "__main__":
    main()
