"""Three small lm-eval tasks over the held-out split of the python_stdlib source (the default
training data), shipped as JSONL beside their YAML files so that they run with no download:

    stdlib_next_line      multiple choice: after up to 8 lines of a held-out file, its next
                          line or one of 3 lines of other held-out files (same indentation)
    stdlib_complete_line  generation: the rest of a line, given the lines before it and the
                          line's first part; exact match, stopping at the newline
    stdlib_ppl            perplexity (loglikelihood_rolling) of the first ~4,000 characters
                          of held-out files

`stdlib` is the group of all three. `python -m jaxllm.eval.tasks.stdlib` rebuilds the JSONL
from this Python's standard library (the shipped files come from CPython 3.11).
"""

from __future__ import annotations

import json
import logging
import os
import random
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
CONTEXT_LINES = 8
EXAMPLES = 200  # of each line task
PPL_DOCS, PPL_CHARS = 32, 4000
PER_FILE = 16  # at most this many examples of a line task from one file


def _read(name: str) -> list[dict]:
    with open(os.path.join(HERE, f"{name}.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def _dataset(name: str):
    import datasets

    return datasets.DatasetDict({"test": datasets.Dataset.from_list(_read(name))})


class _NoKwargsHint(logging.Filter):
    """lm-eval logs a hint about `--metadata` for every task with a custom_dataset; these
    tasks take no keywords."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Custom kwargs can be passed" not in record.getMessage()


logging.getLogger("lm_eval.api.task").addFilter(_NoKwargsHint())


# lm-eval calls a task's `custom_dataset` with the task manager's metadata as keywords.
def next_line(**unused):
    return _dataset("stdlib_next_line")


def complete_line(**unused):
    return _dataset("stdlib_complete_line")


def ppl(**unused):
    return _dataset("stdlib_ppl")


def _candidates(lines: list[str]) -> list[int]:
    """Lines worth predicting: code (not comments, strings or blank), 16-100 characters, with
    at least 3 non-blank lines before them, and not a repeat of one of them."""
    out = []
    for i, line in enumerate(lines):
        body = line.strip()
        before = [x for x in lines[max(0, i - CONTEXT_LINES):i] if x.strip()]
        if (16 <= len(body) <= 100 and len(before) >= 3 and body[0] not in "#'\""
                and line not in before):
            out.append(i)
    return out


def build(out_dir: str = HERE, seed: int = 0) -> None:
    from jaxllm.config.schema import data_source
    from jaxllm.data.sources import open_source

    source = open_source(data_source("python_stdlib", ""), "heldout", "eval", seed)
    files = []
    for i in range(len(source)):
        chunk, _ = source.locate(i)
        files.append((source.chunks[chunk].key, source[i].text))
    files.sort()
    rng = random.Random(seed)
    pool = [(key, lines[i].strip()) for key, text in files
            for lines in [text.splitlines()] for i in _candidates(lines)]
    chosen = []  # (file, lines, index)
    for key, text in files:
        lines = text.splitlines()
        picks = _candidates(lines)
        chosen += [(key, lines, i) for i in sorted(rng.sample(picks, min(PER_FILE, len(picks))))]
    rng.shuffle(chosen)
    mc, gen = [], []
    for key, lines, i in chosen[:2 * EXAMPLES]:
        context = "\n".join(lines[max(0, i - CONTEXT_LINES):i]) + "\n"
        line = lines[i]
        indent = line[:len(line) - len(line.lstrip())]
        if len(mc) < EXAMPLES:
            others = set()
            while len(others) < 3:
                other_key, other = rng.choice(pool)
                if other_key != key and other != line.strip():
                    others.add(indent + other)
            choices = [line, *sorted(others)]
            rng.shuffle(choices)
            mc.append({"source": key, "context": context, "choices": choices,
                       "label": choices.index(line)})
        else:
            cut = line.rfind(" ", len(indent) + 1, len(indent) + (len(line) - len(indent)) // 2)
            cut = cut if cut > len(indent) else len(indent) + (len(line) - len(indent)) // 2
            gen.append({"source": key, "context": context + line[:cut], "answer": line[cut:]})
    docs = []
    for key, text in files[:PPL_DOCS]:
        cut = text.rfind("\n", 0, PPL_CHARS)
        docs.append({"source": key, "text": text[:cut if cut > 0 else PPL_CHARS]})
    for name, rows in (("stdlib_next_line", mc), ("stdlib_complete_line", gen),
                       ("stdlib_ppl", docs)):
        with open(os.path.join(out_dir, f"{name}.jsonl"), "w") as f:
            f.writelines(json.dumps(row) + "\n" for row in rows)
        print(f"{name}: {len(rows)} examples", file=sys.stderr)


if __name__ == "__main__":
    from jaxllm.config.cli import ArgumentParser

    parser = ArgumentParser(prog="python -m jaxllm.eval.tasks.stdlib",
                            description="Rebuilds the stdlib tasks' JSONL.")
    parser.add_argument("--out", default=HERE, help="folder (default: beside the YAML files)")
    build(parser.parse_args().out)
