"""Tests of jaxllm.data.chat: Qwen2's chat template against transformers' rendering of it, on
the real Qwen2 tokenizer (ids and text), the assistant-only loss mask (of one conversation and
of packed batches from a chat source), the template in exported tokenizer files, and errors."""

from __future__ import annotations

import os

import numpy as np
import pytest

from jaxllm.data.chat import QWEN2_CHAT_TEMPLATE, render_chat, render_text
from jaxllm.data.records import CHAT_FIELDS, Chat, DataError, chat_of
from jaxllm.data.tokenizer import Tokenizer, load_tokenizer, save_hf_tokenizer_files

WHERE = "data.sources.sft: chats.jsonl line 7"
CONVERSATIONS = {
    "no_system": [
        {"role": "user", "content": "What is 2 + 2?"},
        {"role": "assistant", "content": "2 + 2 = 4."},
    ],
    "system": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Say hello."},
        {"role": "assistant", "content": "Bonjour !"},
    ],
    "two_replies": [
        {"role": "user", "content": "Write a Python function that adds two numbers.\n"},
        {"role": "assistant", "content": "```python\ndef add(a, b):\n    return a + b\n```\n"},
        {"role": "user", "content": "\n\nNow in 中文, with émojis 🎉 and  two spaces."},
        {"role": "assistant", "content": " 好的：加法函数。\t🎉 Done.  "},
    ],
    "late_system": [  # the template adds the default system turn and keeps this one in place
        {"role": "user", "content": "hi"},
        {"role": "system", "content": "Be brief."},
        {"role": "assistant", "content": "Hi."},
    ],
}


@pytest.fixture(scope="module")
def qwen2() -> Tokenizer:
    return load_tokenizer("qwen2")


@pytest.fixture(scope="module")
def hf(qwen2, tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    out = tmp_path_factory.mktemp("qwen2_hf")
    save_hf_tokenizer_files(qwen2, out)  # offline: Qwen2's vocabulary and chat template
    return transformers.AutoTokenizer.from_pretrained(str(out))


def chat(messages: list[dict]) -> Chat:
    return chat_of({"messages": messages}, CHAT_FIELDS, WHERE)


def hf_ids(hf, messages: list[dict]) -> list[int]:
    out = hf.apply_chat_template(messages, chat_template=QWEN2_CHAT_TEMPLATE, tokenize=True,
                                 return_dict=True)
    return list(out["input_ids"])


def runs(mask_n: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of ones."""
    edges_n = np.diff(np.concatenate([[0], mask_n.astype(np.int8), [0]]))
    return list(zip(np.flatnonzero(edges_n == 1), np.flatnonzero(edges_n == -1), strict=True))


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_text_is_transformers_rendering_of_the_template(hf, name):
    messages = CONVERSATIONS[name]
    expected = hf.apply_chat_template(messages, chat_template=QWEN2_CHAT_TEMPLATE,
                                      tokenize=False)
    assert render_text(chat(messages)) == expected
    if messages[0]["role"] != "system":
        assert expected.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_ids_equal_transformers_and_whole_text_encoding(qwen2, hf, name):
    c = chat(CONVERSATIONS[name])
    ids_n, mask_n = render_chat(c, qwen2)
    assert ids_n.dtype == np.int32 and mask_n.dtype == np.uint8 and ids_n.shape == mask_n.shape
    assert ids_n.tolist() == hf_ids(hf, CONVERSATIONS[name])
    assert ids_n.tolist() == qwen2.encode(render_text(c))


@pytest.mark.parametrize("name", CONVERSATIONS)
def test_mask_is_exactly_the_replies_and_their_im_end(qwen2, name):
    c = chat(CONVERSATIONS[name])
    ids_n, mask_n = render_chat(c, qwen2)
    replies = [content + "<|im_end|>" for role, content in c.turns if role == "assistant"]
    spans = runs(mask_n)
    assert [qwen2.decode(ids_n[a:b]) for a, b in spans] == replies
    im_end, header = qwen2.encode("<|im_end|>"), qwen2.encode("<|im_start|>assistant\n")
    for a, b in spans:  # a reply follows its unmasked header and is followed by an unmasked "\n"
        assert ids_n[b - 1] == im_end[0]
        assert ids_n[a - len(header):a].tolist() == header and not mask_n[a - len(header):a].any()
        assert qwen2.decode(ids_n[b:b + 1]) == "\n" and mask_n[b] == 0
    assert mask_n.sum() == sum(len(qwen2.encode(r)) for r in replies)


def test_reply_starting_with_a_newline_is_encoded_apart_from_its_header(qwen2, hf):
    # "assistant\n" + "\n\nHi": the whole text's BPE merges the three newlines into one token;
    # the pieces keep the header's "\n" (as the prompt at generation ends) and the reply's own.
    messages = [{"role": "user", "content": "\n\nhello"},
                {"role": "assistant", "content": "\n\nHi"}]
    c = chat(messages)
    ids_n, mask_n = render_chat(c, qwen2)
    assert qwen2.decode(ids_n) == render_text(c)
    assert ids_n.tolist() != qwen2.encode(render_text(c))
    assert hf_ids(hf, messages) == qwen2.encode(render_text(c))
    header = qwen2.encode("<|im_start|>assistant\n")
    start = len(ids_n) - len(qwen2.encode("\n\nHi<|im_end|>\n"))
    assert ids_n[start - len(header):start].tolist() == header
    assert [qwen2.decode(ids_n[a:b]) for a, b in runs(mask_n)] == ["\n\nHi<|im_end|>"]
    # A user turn is encoded whole, so its leading newlines match the whole text's.
    user_turn = "<|im_start|>user\n\n\nhello<|im_end|>\n"
    n_user = len(qwen2.encode(user_turn))
    assert ids_n[start - len(header) - n_user:start - len(header)].tolist() == \
        qwen2.encode(user_turn)


def test_prompt_response_record_equals_its_messages_record(qwen2):
    pair = chat_of({"prompt": "Name a prime.", "response": "7", "id": 3}, CHAT_FIELDS, WHERE)
    messages = chat([{"role": "user", "content": "Name a prime."},
                     {"role": "assistant", "content": "7"}])
    assert pair == messages
    for a, b in zip(render_chat(pair, qwen2), render_chat(messages, qwen2), strict=True):
        np.testing.assert_array_equal(a, b)
    custom = chat_of({"q": "Name a prime.", "a": "7"}, ("", "q", "a"), WHERE)
    assert custom == messages


def test_messages_field_wins_over_prompt_fields():
    # e.g. ultrachat_200k rows carry both "prompt" and "messages"
    record = {"prompt": "p", "messages": [{"role": "user", "content": "u"},
                                          {"role": "assistant", "content": "a"}]}
    assert chat_of(record, CHAT_FIELDS, WHERE).turns == (("user", "u"), ("assistant", "a"))
    assert chat_of({**record, "response": "r"}, ("", "prompt", "response"), WHERE).turns == \
        (("user", "p"), ("assistant", "r"))


def msgs(*messages) -> dict:
    return {"messages": list(messages)}


USER = {"role": "user", "content": "u"}
BAD_RECORDS = [
    ([USER], CHAT_FIELDS, "is a list, not a JSON object"),
    ({"text": "t"}, CHAT_FIELDS,
     "no chat: expected 'messages' (a list of messages) or 'prompt' and 'response' (strings); "
     "fields present: text"),
    ({"text": "t"}, ("conv", "", ""), "no chat: expected 'conv' (a list of messages);"),
    ({"messages": "hi"}, CHAT_FIELDS, "field 'messages' is a str, not a non-empty list"),
    ({"messages": []}, CHAT_FIELDS, "field 'messages' is an empty list"),
    (msgs("hi"), CHAT_FIELDS, "field 'messages' message 0 is a str, not a JSON object"),
    (msgs(USER, {"content": "x"}), CHAT_FIELDS,
     "field 'messages' message 1: 'role' is absent, not a string; keys present: content"),
    (msgs({"role": "assistant", "content": None}), CHAT_FIELDS,
     "message 0: 'content' is a NoneType, not a string"),
    (msgs(USER, {"role": "assistant", "content": [{"type": "text", "text": "x"}]}), CHAT_FIELDS,
     "field 'messages' message 1: 'content' is a list, not a string"),
    (msgs(USER, {"role": "tool", "content": "x"}), CHAT_FIELDS,
     "field 'messages' message 1: role 'tool' is not one of 'system', 'user', 'assistant'"),
    (msgs({"role": "system", "content": "s"}, USER), CHAT_FIELDS,
     "field 'messages' has no assistant turn (roles: system, user), so nothing to train on"),
    ({"prompt": "p"}, CHAT_FIELDS,
     "field 'response' (response_field) is absent, not a string; fields present: prompt"),
    ({"response": "r"}, CHAT_FIELDS, "field 'prompt' (prompt_field) is absent"),
    ({"prompt": "p", "response": 3}, CHAT_FIELDS, "field 'response' (response_field) is a int"),
]


@pytest.mark.parametrize(("record", "fields", "message"), BAD_RECORDS)
def test_bad_records_raise_one_line_naming_the_field(record, fields, message):
    with pytest.raises(DataError) as info:
        chat_of(record, fields, WHERE)
    text = str(info.value)
    assert text.startswith(WHERE) and message in text and "\n" not in text, text


def test_chat_rejects_unknown_roles():
    with pytest.raises(ValueError, match="'bot'"):
        Chat((("bot", "x"),))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_exported_tokenizer_files_render_the_same_chat(hf, name):
    """save_hf_tokenizer_files (what `convert export` writes) carries the template itself."""
    messages = CONVERSATIONS[name]
    assert hf.apply_chat_template(messages, tokenize=False) == render_text(chat(messages))


def assistant_targets(tokens: np.ndarray, header: list[int], im_end: int) -> np.ndarray:
    """The obvious oracle: 1 on the tokens of an assistant turn after its header, through its
    <|im_end|>; tokens before the row's first header are 0 (a turn cut at the row's start
    is left out by starting outside every turn)."""
    out, inside, i = np.zeros(len(tokens), np.uint8), False, 0
    while i < len(tokens):
        if not inside and list(tokens[i:i + len(header)]) == header:
            inside, i = True, i + len(header)
            continue
        if inside:
            out[i] = 1
            inside = tokens[i] != im_end
        i += 1
    return out


def test_a_chat_source_trains_on_assistant_turns_only(qwen2, tmp_path):
    from jaxllm import data
    from jaxllm.config.schema import data_source
    from tests.helpers.data import make_config, write_jsonl

    path = write_jsonl(tmp_path / "chats.jsonl",
                       [{"messages": m} for m in CONVERSATIONS.values()]
                       + [{"prompt": "Name a prime.", "response": "7"}])
    cfg = make_config(seq_len=96, batch_size=3, mixture={"chat": 1.0}, sources={
        "chat": data_source("jsonl", path, chat=True, heldout_fraction=0.0)})
    header = qwen2.encode("<|im_start|>assistant\n")
    im_end = qwen2.special_tokens["<|im_end|>"]
    it, trained = data.make_iterator(cfg, "pretrain", qwen2), 0
    for _ in range(4):
        batch = next(it)
        for row in range(3):
            # The row's tokens: its inputs, then its last target.
            tokens = np.append(batch["inputs"][row], batch["targets"][row, -1])
            expected = assistant_targets(tokens, header, im_end)[1:]
            mask = batch["loss_mask"][row]
            start = np.flatnonzero(tokens == qwen2.special_tokens["<|im_start|>"])[0]
            np.testing.assert_array_equal(mask[start:], expected[start:])
            trained += int(mask.sum())
            # The end-of-document token after a chat is no target either.
            assert not mask[batch["targets"][row] == qwen2.eos_id].any()
    assert trained > 0


def test_sft_stages_need_chat_sources_and_chat_needs_records():
    from jaxllm.config.load import load_config
    from jaxllm.config.schema import ConfigError
    from jaxllm.config.validate import validate

    cfg = load_config("configs/tiny.py:chat", [])
    validate(cfg)
    cfg.stages.sft.mixture = {"chat": 0.5, "stdlib": 0.5}
    with pytest.raises(ConfigError, match=r"^config.stages.sft.mixture: an sft stage trains "
                       r"on conversations, but source 'stdlib' is not a chat source"):
        validate(cfg)
    with pytest.raises(ConfigError, match=r"^config.data.sources.stdlib.chat: only jsonl and "
                       "parquet records have fields, not python_stdlib"):
        load_config("configs/tiny.py:chat", ["data.sources.stdlib.chat=True"])


def test_the_shipped_examples_are_what_their_generator_writes(tmp_path):
    """jaxllm/data/examples/*.jsonl come from examples/chat_data.py, seeded: not edited by hand."""
    from examples.chat_data import write
    from tests.helpers.runs import ROOT

    for path in write(str(tmp_path)):
        shipped = os.path.join(ROOT, "jaxllm", "data", "examples", os.path.basename(path))
        with open(path, encoding="utf-8") as ours, open(shipped, encoding="utf-8") as theirs:
            assert ours.read() == theirs.read(), shipped


def test_preference_pairs_in_their_usual_forms():
    from jaxllm.data.records import PAIR_FIELDS, DataError, Pair, pair_of

    user, good, bad = ("user", "Hi?"), ("assistant", "Hello."), ("assistant", "HELLO.")
    expected = Pair(Chat((user, good)), Chat((user, bad)))
    as_strings = {"prompt": "Hi?", "chosen": "Hello.", "rejected": "HELLO."}
    as_messages = {"prompt": [{"role": "user", "content": "Hi?"}],
                   "chosen": [{"role": "assistant", "content": "Hello."}],
                   "rejected": [{"role": "assistant", "content": "HELLO."}]}
    whole = {"chosen": [{"role": "user", "content": "Hi?"},
                        {"role": "assistant", "content": "Hello."}],
             "rejected": [{"role": "user", "content": "Hi?"},
                          {"role": "assistant", "content": "HELLO."}]}
    for record in (as_strings, as_messages, whole):
        assert pair_of(record, PAIR_FIELDS, WHERE) == expected
    for record, message in (
            ({"prompt": "Hi?", "chosen": "Hello."}, r"field 'rejected' is absent, not a reply"),
            ({"prompt": "Hi?", "chosen": "a", "rejected": 3},
             r"field 'rejected' is a int, not a reply"),
            ({"chosen": [{"role": "user", "content": "x"}], "rejected": "y"},
             r"field 'chosen' has no assistant turn"),
            ({"prompt": [], "chosen": "a", "rejected": "b"}, r"field 'prompt' is an empty list")):
        with pytest.raises(DataError, match=f"^{WHERE}: {message}"):
            pair_of(record, PAIR_FIELDS, WHERE)
