"""CORPUS: about 420 test strings for tokenizers, the same on every run: prose, CJK, code,
numbers, emoji, whitespace runs, text that NFC changes, special tokens inside text."""

import argparse
import dataclasses
import json
import random
import textwrap
from pathlib import Path

from jaxllm.data.tokenizer import QWEN2_SPECIAL_TOKENS

PROSE = [
    "The quick brown fox jumps over the lazy dog.",
    "It's 5 o'clock; WE'LL leave when they've finished. I'm sure you'd agree, DON'T you?",
    "Transformers process sequences in parallel, unlike recurrent networks.",
    "  leading spaces, trailing spaces   ",
    "Mr. O'Neil's café serves crème brûlée — naïve, but délicieux!",
    "'S 'T 'RE 'VE 'M 'LL 'D 'ſ 'K",
    "'Twas 'STOP he'SAID 'LLAMA 'ſtop 'Dunno 're'm",  # contractions are case-insensitive
]
CJK = [
    "通义千问是阿里云研发的大语言模型。",
    "机器学习是人工智能的一个分支，它使计算机能够从数据中学习。",
    "今日は良い天気ですね。カタカナとひらがな、漢字を混ぜます。",
    "안녕하세요, 만나서 반갑습니다. 한국어 문장입니다.",
    "混合 mixed 文本 text 和 numbers 12345。",
]
OTHER_SCRIPTS = [
    "Привет, мир!",
    "Γειά σου Κόσμε",
    "שלום עולם",
    "مرحبا بالعالم",
    "नमस्ते दुनिया",
    "สวัสดีชาวโลก",
]
EMOJI = ["👨‍👩‍👧‍👦", "🏳️‍🌈", "👍🏽", "🇯🇵🇺🇸", "🧑🏿‍💻", "❤️‍🔥", "😀😃😄", "⭐️", "🫠"]
# NFC changes these: decomposed accents, decomposed Hangul, the Angstrom and Ohm signs.
NFC_CHANGES = [
    "e\u0301",
    "A\u030a",
    "n\u0303",
    "\u1100\u1161\u11a8",
    "\u212b",
    "\u2126",
    "o\u0308\u0301",
]
WHITESPACE = [" ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "\u2009", "\x0b", "\x0c", "\u2028"]
SPECIALS = list(QWEN2_SPECIAL_TOKENS)


def _random_number(rng: random.Random) -> str:
    kind = rng.randrange(4)
    digits = "".join(rng.choice("0123456789") for _ in range(rng.randint(1, 40)))
    if kind == 0:
        return digits
    if kind == 1:
        return f"{rng.uniform(-1e6, 1e6):,.{rng.randint(0, 6)}f}"
    if kind == 2:
        return f"{rng.random():.3e}"
    return f"+86 {digits[:3]}-{digits[3:7]}-{digits[7:11]}"


def _corpus() -> list[str]:
    """About 420 strings, the same on every run."""
    rng = random.Random(20240607)
    texts = PROSE + CJK + OTHER_SCRIPTS + EMOJI + NFC_CHANGES + WHITESPACE
    texts += [
        "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n",
        "Hello<|endoftext|>world",
        "<|endoftext|><|endoftext|>",
        "<|endoftext",
        "<|im_end|>\n\n  \t<|im_start|>",
        "",
    ]
    sources = [Path(m.__file__).read_text("utf-8") for m in (argparse, dataclasses, textwrap, json)]
    for _ in range(80):  # slices of stdlib code, indentation and all
        src = rng.choice(sources)
        start = rng.randrange(len(src) - 700)
        texts.append(src[start : start + rng.randint(20, 700)])
    for _ in range(60):
        texts.append(" ".join(_random_number(rng) for _ in range(rng.randint(1, 5))))
    for _ in range(80):  # whitespace mixtures like "\n\n  \t" around words
        ws = "".join(rng.choice(WHITESPACE) for _ in range(rng.randint(1, 8)))
        texts.append(rng.choice(["", "word", "x = 1"]) + ws + rng.choice(["", "next", "}"]))
    pools = [PROSE, CJK, OTHER_SCRIPTS, EMOJI, NFC_CHANGES, WHITESPACE, SPECIALS]
    for _ in range(150):  # mixtures of everything above
        pieces = [rng.choice(rng.choice(pools)) for _ in range(rng.randint(2, 6))]
        pieces.append(_random_number(rng))
        rng.shuffle(pieces)
        texts.append(rng.choice(["", " ", "\n"]).join(pieces))
    return texts


CORPUS = _corpus()
