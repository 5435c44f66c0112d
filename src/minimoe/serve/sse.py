"""Server-sent events: the chunk shapes of streamed completions and chat completions, and the
streaming response that carries them (`data: {json}` per chunk, then `data: [DONE]`)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse

from minimoe.serve.http import log, peer
from minimoe.serve.jobs import Delta, Finish
from minimoe.serve.schemas import APIError


class Meta:
    """id, object type, creation time and model of one response (shared by all its chunks)."""

    def __init__(self, id: str, object: str, model: str) -> None:
        self.id, self.object, self.model, self.created = id, object, model, int(time.time())

    def head(self, object: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": object or self.object, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, finishes: list[Finish]) -> dict[str, int]:
    completion = sum(f.completion_tokens for f in finishes)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


def sse(batch, chunks: Callable, request: Request) -> StreamingResponse:
    """A server-sent-events response: one `data: {json}` per chunk that `chunks(batch.events())`
    yields, then `data: [DONE]`. A failure mid-stream is sent as an error object (the status is
    already 200); a client that goes away cancels the batch (one log line)."""

    async def body() -> AsyncIterator[str]:
        try:
            async for chunk in chunks(batch.events()):
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        finally:  # also when the client goes away mid-stream (this generator is cancelled or closed)
            batch.cancel()
        yield "data: [DONE]\n\n"

    return _Stream(
        batch, request, body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"}
    )


class _ClientGone(Exception):
    pass


class _Stream(StreamingResponse):
    """A StreamingResponse that cancels its batch and closes its body generator however it ends, and
    logs one line when the client went away first: also when it left before the generator started, or
    while a write to it was blocked (a client not reading). uvicorn then drops every later write
    without a word, so after a write that had to wait, and before the last one, the stream asks whether
    the client is still there, and stops if not."""

    def __init__(self, batch, request: Request, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.batch, self.request = batch, request

    async def __call__(self, scope, receive, send) -> None:
        loop, blocked, gone = asyncio.get_running_loop(), False, False

        async def send_while_there(message) -> None:
            nonlocal blocked, gone
            last = message["type"] == "http.response.body" and not message.get("more_body", False)
            if (blocked or last) and await self.request.is_disconnected():
                gone = True
                raise _ClientGone
            t0 = loop.time()
            await send(message)
            blocked = loop.time() - t0 > 0.005  # it waited for the client to read

        try:
            await super().__call__(scope, receive, send_while_there)
        except _ClientGone:
            pass
        finally:
            await self.body_iterator.aclose()  # now, wherever it is suspended: not at garbage collection
            self.batch.cancel()
            if gone or not (self.batch.finished or self.batch.failed):
                log.info(
                    "client %s went away mid-stream; its request (choices: %d) was cancelled",
                    peer(self.request),
                    len(self.batch.jobs),
                )


def completion_chunks(
    meta: Meta, echo: list[str], prompt_tokens: int, render: Callable | None, include_usage: bool
):
    """The chunks of a streamed completion; `render` gives each delta's logprobs object, when asked. An
    echoed prompt opens its choice, with its tokens' logprobs when asked (the engine's first delta)."""

    async def chunks(events: AsyncIterator) -> AsyncIterator[dict]:
        def chunk(index: int, text: str, reason: str | None, logprobs=None) -> dict:
            choice = {"index": index, "text": text, "logprobs": logprobs, "finish_reason": reason}
            return {**meta.head(), "choices": [choice], **({"usage": None} if include_usage else {})}

        # with logprobs an echoed prompt waits for its tokens' entries, the engine's first delta
        held = {i for i, text in enumerate(echo) if text} if render else set()
        for index, text in enumerate(echo):
            if text and index not in held:
                yield chunk(index, text, None)
        finishes = []
        async for e in events:
            if isinstance(e, Delta):
                head = echo[e.index] if e.index in held else ""
                held.discard(e.index)
                yield chunk(e.index, head + e.text, None, render(e.logprobs) if render else None)
            else:
                finishes.append(e)
                yield chunk(e.index, "", e.reason)
        if include_usage:
            yield {**meta.head(), "choices": [], "usage": usage(prompt_tokens, finishes)}

    return chunks


def chat_chunks(meta: Meta, n_choices: int, prompt_tokens: int, render: Callable | None, include_usage: bool):
    """The chunks of a streamed chat completion; `render` gives each delta's logprobs, when asked."""

    async def chunks(events: AsyncIterator) -> AsyncIterator[dict]:
        def chunk(index: int, delta: dict, reason: str | None, logprobs=None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": reason}
            return {
                **meta.head("chat.completion.chunk"),
                "choices": [choice],
                **({"usage": None} if include_usage else {}),
            }

        for index in range(n_choices):  # OpenAI opens each choice with the role
            yield chunk(index, {"role": "assistant", "content": ""}, None)
        finishes = []
        async for e in events:
            if isinstance(e, Delta):
                yield chunk(e.index, {"content": e.text}, None, render(e.logprobs) if render else None)
            else:
                finishes.append(e)
                yield chunk(e.index, {}, e.reason)
        if include_usage:
            yield {
                **meta.head("chat.completion.chunk"),
                "choices": [],
                "usage": usage(prompt_tokens, finishes),
            }

    return chunks
