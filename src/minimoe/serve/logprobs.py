"""The `logprobs` objects of OpenAI's responses, from the engine's per-token `Logprob` entries.

Completions (legacy shape): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict of the
most likely tokens, the chosen one included) and `text_offset`. Chat: `content`, one object per token
with its `token`, `logprob`, `bytes` and its `top_logprobs` list. A token that is part of a character
(a byte-level token splitting a multi-byte one) has no text of its own: its string is written
`bytes:\\xNN...` as OpenAI does, and chat's `bytes` carry it exactly.
"""

from __future__ import annotations

from typing import Any

from minimoe.serve.jobs import Logprob


def token_string(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(entries: tuple[Logprob, ...], tokenizer) -> dict[str, Any]:
    def text(token: int) -> str:
        return token_string(tokenizer.token_bytes(token))

    return {
        "tokens": [text(e.token) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [{**{text(t): lp for t, lp in e.top}, text(e.token): e.logprob} for e in entries],
        "text_offset": [e.offset for e in entries],
    }


def chat_logprobs(entries: tuple[Logprob, ...], tokenizer) -> dict[str, Any]:
    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = tokenizer.token_bytes(token)
        return {"token": token_string(raw), "logprob": logprob, "bytes": list(raw)}

    content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}
