"""Chat data for supervised fine-tuning: JSONL conversations, the chat template, and token ids with
a mask that marks the assistant's tokens (the only ones that carry loss).

Templates are Jinja, rendered as transformers renders `chat_template` (sandboxed, `trim_blocks`,
`lstrip_blocks`), so a template stored with the tokenizer works in both places.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

import numpy as np

from minimoe.data.corpus import iter_jsonl
from minimoe.errors import MinimoeError

# Used when the tokenizer has no template. The end-of-text token closes every turn, so a model
# fine-tuned with it stops generating at the end of its answer.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}"
    "{% endfor %}{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
ROLES = ("system", "user", "assistant", "tool")


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


@lru_cache(maxsize=8)
def _compile(template: str):
    from jinja2 import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise MinimoeError(f"chat template error: {message}")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals["raise_exception"] = raise_exception
    try:
        return env.from_string(template)
    except TemplateError as e:
        raise MinimoeError(f"the chat template does not parse ({e})") from None


def render(template: str, messages: list[dict], tokenizer, add_generation_prompt: bool = False) -> str:
    """The template's text for `messages` (special tokens as strings, as transformers passes them)."""
    return _compile(template).render(
        messages=messages,
        add_generation_prompt=add_generation_prompt,
        eos_token=tokenizer.eos_token,
        bos_token=tokenizer.bos_token or "",
        pad_token=tokenizer.pad_token,
    )


def encode_conversation(tokenizer, messages: list[dict], template: str) -> tuple[np.ndarray, np.ndarray]:
    """Token ids of a rendered conversation and a mask of the tokens the model must learn.

    The text is cut at message boundaries by rendering growing prefixes of the conversation; each
    assistant turn's own text (after the generation prompt, up to and including the template's
    end-of-turn) is marked. Pieces are tokenized separately so a boundary never falls inside a token.

    Args:
        tokenizer: a minimoe Tokenizer.
        messages: [{"role", "content"}, ...].
        template: the Jinja chat template.
    Returns:
        ids (N,) int64 and train_mask (N,) bool.
    """
    pieces: list[tuple[str, bool]] = []
    done = ""
    for i, msg in enumerate(messages):
        if msg["role"] == "assistant":
            header = render(template, messages[:i], tokenizer, add_generation_prompt=True)
            full = render(template, messages[: i + 1], tokenizer)
            if not header.startswith(done) or not full.startswith(header):
                raise MinimoeError("the chat template does not render conversations as growing prefixes")
            pieces += [(header[len(done) :], False), (full[len(header) :], True)]
        else:
            full = render(template, messages[: i + 1], tokenizer)
            if not full.startswith(done):
                raise MinimoeError("the chat template does not render conversations as growing prefixes")
            pieces.append((full[len(done) :], False))
        done = full
    ids, mask = [], []
    for text, train in pieces:
        if text:
            t = tokenizer.encode_array(text)
            ids.append(t)
            mask.append(np.full(t.shape, train))
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0, dtype=bool)
    return np.concatenate(ids), np.concatenate(mask)


def inputs_and_targets(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Next-token pairs: x = ids[:-1]; y = ids[1:] where the predicted token is trainable, else -100."""
    return ids[:-1], np.where(mask[1:], ids[1:], -100)
