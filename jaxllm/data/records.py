"""What one text-like record means: a `Text` document (a prompt not trained on, then text), a
`Chat` conversation of (role, content) turns, or a preference `Pair` of two chats; every
error names the record."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


class DataError(ValueError):
    """Data that cannot work; the message names the source, the file and the record."""


@dataclass(frozen=True)
class Text:
    text: str
    prompt: str = ""  # tokenized before `text`, and never a target of the loss


ROLES = ("system", "user", "assistant")
# A chat source's fields: (messages, prompt, response); "" turns a field off.
CHAT_FIELDS = ("messages", "prompt", "response")
PAIR_FIELDS = ("prompt", "chosen", "rejected")  # a preference pair source's


@dataclass(frozen=True)
class Chat:
    turns: tuple[tuple[str, str], ...]  # (role, content), role in ROLES

    def __post_init__(self) -> None:
        for role, content in self.turns:
            if role not in ROLES or not isinstance(content, str):
                raise ValueError(f"chat turn ({role!r}, {type(content).__name__}): the role "
                                 f"must be one of {', '.join(ROLES)} and the content a string")


def chat_of(record: Any, fields: tuple[str, str, str], where: str) -> Chat:
    """The chat of one JSON object: its `messages` list of {"role", "content"} when present,
    else its prompt (one user turn) and response (one assistant turn)."""
    messages_field, prompt_field, response_field = fields
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, not a JSON object")
    present = ", ".join(sorted(record)) or "none"
    if messages_field and messages_field in record:
        chat = Chat(_turns_of(record[messages_field], messages_field, where))
        if not any(role == "assistant" for role, _ in chat.turns):
            roles = ", ".join(role for role, _ in chat.turns)
            raise DataError(f"{where}: field {messages_field!r} has no assistant turn (roles: "
                            f"{roles}), so nothing to train on")
        return chat
    if not (prompt_field and response_field
            and (prompt_field in record or response_field in record)):
        wanted = [f"{messages_field!r} (a list of messages)"] if messages_field else []
        if prompt_field and response_field:
            wanted.append(f"{prompt_field!r} and {response_field!r} (strings)")
        raise DataError(f"{where}: no chat: expected {' or '.join(wanted) or 'chat fields'}; "
                        f"fields present: {present}")
    prompt, response = _strings(record, (("prompt_field", prompt_field),
                                         ("response_field", response_field)), where)
    return Chat((("user", prompt), ("assistant", response)))


@dataclass(frozen=True)
class Pair:
    """A preference pair: the same prompt with the preferred reply and the other one."""
    chosen: Chat
    rejected: Chat


Record = Text | Chat | Pair  # what a text-like record reads as


def pair_of(record: Any, fields: tuple[str, ...], where: str) -> Pair:
    """A pair from one JSON object: `prompt` (a string: one user turn, or a list of messages)
    and `chosen` / `rejected` (strings: one assistant reply each, or lists of messages that
    follow the prompt, or, without a prompt, whole conversations)."""
    prompt_field, chosen_field, rejected_field = fields
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, not a JSON object")
    present = ", ".join(sorted(record)) or "none"
    prompt = record.get(prompt_field, ())
    if isinstance(prompt, str):
        prompt = (("user", prompt),)
    elif prompt != ():
        prompt = _turns_of(prompt, prompt_field, where)
    replies = []
    for field in (chosen_field, rejected_field):
        value = record.get(field)
        if isinstance(value, str):
            turns = (("assistant", value),)
        elif isinstance(value, list):
            turns = _turns_of(value, field, where)
        else:
            found = "absent" if field not in record else f"a {type(value).__name__}"
            raise DataError(f"{where}: field {field!r} is {found}, not a reply (a string or a "
                            f"list of messages); fields present: {present}")
        if not any(role == "assistant" for role, _ in turns):
            raise DataError(f"{where}: field {field!r} has no assistant turn, so nothing to "
                            "compare")
        replies.append(Chat((*prompt, *turns)))
    return Pair(*replies)


def _turns_of(messages: Any, field: str, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(messages, list) or not messages:
        found = "an empty list" if messages == [] else f"a {type(messages).__name__}"
        raise DataError(f"{where}: field {field!r} is {found}, not a non-empty list of "
                        '{"role": ..., "content": ...} objects')
    turns = []
    for i, message in enumerate(messages):
        at = f"{where}: field {field!r} message {i}"
        if not isinstance(message, dict):
            raise DataError(f"{at} is a {type(message).__name__}, not a JSON object")
        for key in ("role", "content"):
            value = message.get(key)
            if not isinstance(value, str):
                found = "absent" if key not in message else f"a {type(value).__name__}"
                raise DataError(f"{at}: {key!r} is {found}, not a string; keys present: "
                                f"{', '.join(sorted(message)) or 'none'}")
        if message["role"] not in ROLES:
            raise DataError(f"{at}: role {message['role']!r} is not one of "
                            f"{', '.join(map(repr, ROLES))}")
        turns.append((message["role"], message["content"]))
    return tuple(turns)


def doc_of(record: Any, fields: tuple[str, ...], where: str) -> Record:
    """A record's document: a pair source's fields are PAIR_FIELDS, a chat source's
    CHAT_FIELDS, a text source's (text_field, prompt_field)."""
    if fields == PAIR_FIELDS:
        return pair_of(record, fields, where)
    return chat_of(record, fields, where) if len(fields) == 3 else text_of(record, fields, where)


def text_of(record: Any, fields: tuple[str, str], where: str) -> Text:
    text_field, prompt_field = fields
    if not isinstance(record, dict):
        raise DataError(f"{where} is a {type(record).__name__}, not a JSON object")
    return Text(*_strings(record, (("text_field", text_field), ("prompt_field", prompt_field)),
                          where))


def _strings(record: dict, fields: tuple[tuple[str, str], ...], where: str) -> list[str]:
    """The string values of (config key, field name) pairs; a field with no name gives ""."""
    values = []
    for key, field in fields:
        value = record.get(field) if field else ""
        if not isinstance(value, str):
            found = "absent" if field not in record else f"a {type(value).__name__}"
            raise DataError(f"{where}: field {field!r} ({key}) is {found}, not a string; "
                            f"fields present: {', '.join(sorted(record)) or 'none'}")
        values.append(value)
    return values
