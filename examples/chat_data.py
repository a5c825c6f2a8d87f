"""Writes the tiny post-training example's data: conversations and preference pairs about Python.

    python -m examples.chat_data [--out=jaxllm/data/examples]

chat.jsonl: {"messages": [...]} conversations (one to three user/assistant exchanges, some with
a system turn) for an `sft` stage. preferences.jsonl: {"prompt", "chosen", "rejected"} pairs
for a `dpo` stage, where the rejected reply is the chosen one garbled (words out of order, a
phrase stuck repeating, or shouted), a preference a tiny model can learn and carry over to
pairs it has not seen. Seeded: the same files every time (a test checks the shipped ones).
"""

from __future__ import annotations

import argparse
import json
import os
import random

NAMES = ("items", "values", "words", "scores", "rows", "names", "parts", "keys", "lines", "nums")
FUNCS = ("total", "largest", "smallest", "count_even", "reverse", "first", "last", "unique")
SYSTEM = "You are a concise Python tutor."


def _list(rng: random.Random) -> list[int]:
    return [rng.randint(0, 20) for _ in range(rng.randint(2, 5))]


def _exchange(rng: random.Random) -> tuple[str, str]:
    """One user question and its answer, from a few templates with random values."""
    xs, name, kind = _list(rng), rng.choice(NAMES), rng.randrange(6)
    if kind == 0:
        return (f"What does `len({xs})` return?", f"`len({xs})` returns `{len(xs)}`.")
    if kind == 1:
        return (f"What does `sorted({xs})` return?", f"It returns `{sorted(xs)}`, a new list.")
    if kind == 2:
        return (f"What is `sum({xs})`?", f"`sum({xs})` is `{sum(xs)}`.")
    if kind == 3:
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        return (f"What is `{a} + {b}` in Python?", f"`{a} + {b}` is `{a + b}`.")
    if kind == 4:
        func = rng.choice(FUNCS)
        body = {"total": f"sum({name})", "largest": f"max({name})", "smallest": f"min({name})",
                "count_even": f"sum(1 for x in {name} if x % 2 == 0)",
                "reverse": f"{name}[::-1]", "first": f"{name}[0]", "last": f"{name}[-1]",
                "unique": f"sorted(set({name}))"}[func]
        return (f"Write a function `{func}({name})`.",
                f"```python\ndef {func}({name}):\n    return {body}\n```")
    return (f"How do I loop over `{name}` with indexes?",
            f"Use `enumerate`:\n```python\nfor i, x in enumerate({name}):\n    print(i, x)\n```")


def conversation(rng: random.Random) -> dict:
    messages = [{"role": "system", "content": SYSTEM}] if rng.random() < 0.3 else []
    for _ in range(rng.choice((1, 1, 2, 3))):
        question, answer = _exchange(rng)
        messages += [{"role": "user", "content": question},
                     {"role": "assistant", "content": answer}]
    return {"messages": messages}


def garble(rng: random.Random, reply: str) -> str:
    words, kind = reply.split(" "), rng.randrange(3)
    if kind == 0 and len(words) > 2:
        rng.shuffle(words)
        return " ".join(words)
    if kind == 1:
        return " ".join(words[:2] + words[1:2] * 6 + words[2:])
    return reply.upper()


def preference(rng: random.Random) -> dict:
    prompt, chosen = _exchange(rng)
    rejected = garble(rng, chosen)
    while rejected == chosen:
        rejected = garble(rng, chosen)
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write(out: str, conversations: int = 600, pairs: int = 600) -> list[str]:
    os.makedirs(out, exist_ok=True)
    files = []
    for name, make, n, seed in (("chat.jsonl", conversation, conversations, 0),
                                ("preferences.jsonl", preference, pairs, 1)):
        rng = random.Random(seed)
        path = os.path.join(out, name)
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(make(rng), ensure_ascii=False) + "\n" for _ in range(n))
        files.append(path)
    return files


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join("jaxllm", "data", "examples"))
    for path in write(parser.parse_args().out):
        print(path)


if __name__ == "__main__":
    main()
