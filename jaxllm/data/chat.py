"""Chat records for supervised fine-tuning: Qwen2's ChatML template, loss on assistant turns.

A conversation renders as QWEN2_CHAT_TEMPLATE does (no generation prompt), a default system
turn first when the chat does not open with one:
  <|im_start|>{role}\\n{content}<|im_end|>\\n   for every turn
Mask (1: the token is a target of the loss): each assistant turn's content tokens and its
<|im_end|> (the model learns to stop); 0 on system and user turns, on the
"<|im_start|>assistant\\n" header and on the "\\n" after <|im_end|>.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from jaxllm.data.records import Chat

# chat_template of Qwen2-Instruct's tokenizer_config.json (Qwen/Qwen2-7B-Instruct and siblings).
QWEN2_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
DEFAULT_SYSTEM = "You are a helpful assistant."


def _with_system(chat: Chat) -> tuple[tuple[str, str], ...]:
    if chat.turns and chat.turns[0][0] == "system":
        return chat.turns
    return (("system", DEFAULT_SYSTEM), *chat.turns)


def render_text(chat: Chat) -> str:
    """The string QWEN2_CHAT_TEMPLATE renders for the chat, without a generation prompt."""
    return "".join(f"<|im_start|>{role}\n{content}<|im_end|>\n"
                   for role, content in _with_system(chat))


def render_chat(chat: Chat, tokenizer: Any) -> tuple[np.ndarray, np.ndarray]:
    """ids int32 [n] and mask uint8 [n] of `render_text(chat)`, masked per the module docstring.

    Pieces are encoded one at a time. A turn is cut from the next at special tokens, which
    BPE never merges across, so the ids equal encoding the whole text at once, except where an
    assistant content starts with whitespace ending in a newline ("\\n\\n...", " \\n..."): the
    whole text would merge it with the header's "\\n". The pieces give what generation sees (a
    prompt that ends in "<|im_start|>assistant\\n", then the reply's own tokens).
    """
    pieces: list[tuple[str, int]] = []
    for role, content in _with_system(chat):
        if role == "assistant":
            pieces += [("<|im_start|>assistant\n", 0), (content, 1), ("<|im_end|>", 1),
                       ("\n", 0)]
        else:
            pieces.append((f"<|im_start|>{role}\n{content}<|im_end|>\n", 0))
    parts = [(np.asarray(tokenizer.encode(text), np.int32), target) for text, target in pieces]
    ids_n = np.concatenate([ids for ids, _ in parts])
    mask_n = np.concatenate([np.full(len(ids), target, np.uint8) for ids, target in parts])
    return ids_n, mask_n
