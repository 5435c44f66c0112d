"""Chat data for supervised fine-tuning: JSONL conversations, the chat template, and token ids with
a mask that marks the assistant's tokens (the only ones that carry loss).

Templates are rendered by `minimoe.data.chat_template` (as transformers renders `chat_template`), the
module serving uses too, so a template stored with the tokenizer works in both places. Without one,
fine-tuning stores `SFT_CHAT_TEMPLATE` (here `DEFAULT_CHAT_TEMPLATE`) with the new run.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from minimoe.data import chat_template
from minimoe.data.chat_template import SFT_CHAT_TEMPLATE as DEFAULT_CHAT_TEMPLATE  # noqa: F401 (sft.py)
from minimoe.data.records import iter_jsonl
from minimoe.errors import MinimoeError

ROLES = ("system", "developer", "user", "assistant", "tool")  # developer: rendered as system (chat_template)


def read_conversations(path: str | Path) -> list[list[dict]]:
    """Conversations from a JSONL file of `{"prompt", "response"}` (optionally `"system"`) or
    `{"messages": [{"role", "content"}, ...]}` objects.

    Returns:
        One message list per line. Raises MinimoeError naming the first bad line.
    """
    p = Path(path)
    if p.is_dir():
        raise MinimoeError(f"chat data {p} is a directory; give a JSONL file")
    if not p.is_file():
        raise MinimoeError(f"chat data {p} does not exist")
    convs = []
    for n, obj in iter_jsonl(p):
        convs.append(_messages(obj, f"{p} line {n}"))
    if not convs:
        raise MinimoeError(f"{p} holds no examples")
    return convs


def _messages(obj, where: str) -> list[dict]:
    if not isinstance(obj, dict):
        raise MinimoeError(f"{where} is not a JSON object")
    if "messages" in obj:
        msgs = obj["messages"]
        if not isinstance(msgs, list) or not msgs:
            raise MinimoeError(f"{where}: 'messages' must be a non-empty list")
        for m in msgs:
            if not (
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            ):
                raise MinimoeError(f"{where}: every message needs a string 'role' and 'content'")
            if m["role"] not in ROLES:
                raise MinimoeError(f"{where}: unknown role {m['role']!r} (use {', '.join(ROLES)})")
        if not any(m["role"] == "assistant" for m in msgs):
            raise MinimoeError(f"{where} has no assistant message to learn from")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    if isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        msgs = [{"role": "system", "content": obj["system"]}] if isinstance(obj.get("system"), str) else []
        return msgs + [
            {"role": "user", "content": obj["prompt"]},
            {"role": "assistant", "content": obj["response"]},
        ]
    raise MinimoeError(f"{where} needs string 'prompt' and 'response' fields or a 'messages' list")


def render(template: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The template's text for `messages`, with this tokenizer's special tokens."""
    try:
        return chat_template.render(
            template, messages, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
            pad_token=tokenizer.pad_token, add_generation_prompt=add_generation_prompt,
        )  # fmt: skip
    except chat_template.ChatTemplateError as e:
        raise MinimoeError(f"chat template error: {e}") from None


def encode_conversation(tokenizer, messages: list[dict], template: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a rendered conversation and a mask of the tokens the model must learn.

    Each assistant turn's own text (after the generation prompt, up to and including the template's
    end-of-turn) is found by rendering growing prefixes of the conversation. The whole text is then
    tokenized at once, as `minimoe serve` tokenizes a prompt, so the tokens before each answer are the
    ones the model sees when asked for it (tokenizing the pieces separately would differ, e.g. a
    SentencePiece tokenizer starts every piece with a word boundary). A token is trained when its
    span overlaps an answer's text, as transformers' assistant-token mask marks it.

    Args:
        tokenizer: a minimoe Tokenizer.
        messages: [{"role", "content"}, ...].
        template: the Jinja chat template.
    Returns:
        ids (N,) int64 and train_mask (N,) bool.
    """
    answers: list[tuple[int, int]] = []  # character spans of the trained text
    done = ""
    for i, msg in enumerate(messages):
        full = render(template, messages[: i + 1], tokenizer)
        if msg["role"] == "assistant":
            header = render(template, messages[:i], tokenizer, add_generation_prompt=True)
            if not header.startswith(done) or not full.startswith(header):
                raise MinimoeError("the chat template does not render conversations as growing prefixes")
            answers.append((len(header), len(full)))
        elif not full.startswith(done):
            raise MinimoeError("the chat template does not render conversations as growing prefixes")
        done = full
    ids, spans = tokenizer.encode_offsets(done)
    s, e = spans[:, 0], spans[:, 1]
    mask = np.zeros(len(ids), dtype=bool)
    for a, b in answers:
        # a token spanning characters overlaps [a, b); one spanning none (a prepended word-boundary
        # marker, say) belongs to the answer when it sits inside it
        mask |= np.where(e > s, (s < b) & (e > a), (a <= s) & (s < b))
    return ids, mask


def inputs_and_targets(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token pairs: x = ids[:-1]; y = ids[1:] where the predicted token is trainable, else -100."""
    return ids[:-1], np.where(mask[1:], ids[1:], -100)
