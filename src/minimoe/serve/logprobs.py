"""Per-token `Logprob` entries (read by the engine from its logits) and the `logprobs` objects of
OpenAI's responses made from them.

Completions (legacy shape): parallel lists `tokens`, `token_logprobs`, `top_logprobs` (a dict of the
most likely tokens, the chosen one included) and `text_offset`. Chat: `content`, one object per token
with its `token`, `logprob`, `bytes` and its `top_logprobs` list. A token that is part of a character
(a byte-level token splitting a multi-byte one) has no text of its own: its string is written
`bytes:\\xNN...` as OpenAI does, and chat's `bytes` carry it exactly.
"""

from __future__ import annotations

from typing import Any

import torch

from minimoe.infer.sampling import token_logprobs
from minimoe.infer.text import TextStream
from minimoe.serve.jobs import Logprob


def row_logprobs(logits: torch.Tensor, new: list[list[int]], asks: list[int | None]) -> list[list]:
    """Per row, a (logprob, top) entry for each of its `new` tokens, the j-th from its logits at j
    ((n, V) or (n, positions, V) `logits`), or None for each where the row asks for none (`asks[i]`:
    the alternatives row i lists); one log-softmax over every entry asked for."""
    out: list[list] = [[None] * len(toks) for toks in new]
    asked = [(i, j) for i, k in enumerate(asks) if k is not None for j in range(len(new[i]))]
    if asked:
        rows = logits.reshape(len(new), -1, logits.shape[-1])  # (n, positions, V)
        x = torch.stack([rows[i, j] for i, j in asked])
        k = max(asks[i] for i, _ in asked)
        for (i, j), (lp, top) in zip(asked, token_logprobs(x, [new[i][j] for i, j in asked], k)):
            out[i][j] = (lp, top[: asks[i]])
    return out


def prompt_entries(decode, ids: list[int], scores: list) -> tuple[list[Logprob], int]:
    """The entries of a prompt's tokens (the first without a logprob, the others from `scores`, their
    (logprob, top)), each with the offset of its text in the prompt's text, as a generated token's is in
    the completion's; and the length of the prompt's text, where the completion's offsets start."""
    stream, entries = TextStream(decode), []
    for token, score in zip(ids, [(None, None), *scores]):
        entries.append(Logprob(token, *score, offset=len(stream.text)))
        stream.push(token)
    return entries, len(stream.text)


def token_string(raw: bytes) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)


def completion_logprobs(entries: tuple[Logprob, ...], tokenizer) -> dict[str, Any]:
    def text(token: int) -> str:
        return token_string(tokenizer.token_bytes(token))

    def top(e: Logprob) -> dict[str, float] | None:
        """The alternatives and the chosen token; None for a prompt's first token."""
        return None if e.top is None else {**{text(t): lp for t, lp in e.top}, text(e.token): e.logprob}

    return {
        "tokens": [text(e.token) for e in entries],
        "token_logprobs": [e.logprob for e in entries],
        "top_logprobs": [top(e) for e in entries],
        "text_offset": [e.offset for e in entries],
    }


def chat_logprobs(entries: tuple[Logprob, ...], tokenizer) -> dict[str, Any]:
    def one(token: int, logprob: float) -> dict[str, Any]:
        raw = tokenizer.token_bytes(token)
        return {"token": token_string(raw), "logprob": logprob, "bytes": list(raw)}

    content = [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]
    return {"content": content, "refusal": None}
