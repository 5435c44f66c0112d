"""Requests -> engine jobs -> responses: validation against the model and the server's limits, and
the OpenAI response bodies of both routes (streamed ones are built in `sse.py`)."""

from __future__ import annotations

import asyncio
import ipaddress
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from functools import partial
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from minimoe.data.chat_template import ChatTemplateError, chat_renderer
from minimoe.serve.engine import Delta, Engine, Failure, Finish, Job, JobParams, QueueFull
from minimoe.serve.http import log, peer, until_disconnected
from minimoe.serve.limits import Limits
from minimoe.serve.logprobs import chat_logprobs, completion_logprobs
from minimoe.serve.schemas import APIError, ChatCompletionRequest, CompletionRequest, brief
from minimoe.serve.sse import Meta, chat_chunks, completion_chunks, sse, usage

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context


def _within(value: int | None, cap: int | None, message: str, param: str, code: str) -> None:
    """A 400 APIError with `message` when `value` is over `cap` (None on either side: nothing to check)."""
    if value is not None and cap is not None and value > cap:
        raise APIError(400, message, param=param, code=code)


class Service:
    """What the routes share: the engine, the tokenizer, the chat renderer, the context and the limits."""

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str,
        limits: Limits,
        speculative: bool = False,
        compile: bool = False,
    ) -> None:
        self.limits = limits
        self.engine = Engine.from_limits(model, tokenizer, limits, speculative=speculative, compile=compile)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context = model.cfg.max_position_embeddings
        self.created = int(time.time())
        # built now so that a broken template (or missing jinja2) fails at startup; a template that closes
        # turns with a token other than EOS: a chat reply ends at it too
        self.render, self.chat_stop_ids = chat_renderer(tokenizer)

    def model_card(self) -> dict[str, Any]:
        return {
            "id": self.model_name,
            "object": "model",
            "created": self.created,
            "owned_by": "minimoe",
            "max_model_len": self.context,
        }

    def check_model(self, name: str, param: str | None = "model") -> None:
        if name != self.model_name:
            raise APIError(
                404,
                f"The model {brief(name, 80)} does not exist; this server serves '{self.model_name}'.",
                param=param,
                code="model_not_found",
            )

    # ------------------------------------------------------------------ validation

    def _common(self, req) -> JobParams:
        """Checks shared by both routes; the sampling parameters without max_tokens."""
        self.check_model(req.model)
        bad = req.unsupported_param()
        if bad is not None:
            raise APIError(
                400, f"'{bad}' is not supported by this server.", param=bad, code="unsupported_parameter"
            )
        if req.stream_options is not None and not req.stream:  # as OpenAI answers it
            raise APIError(
                400,
                "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
                param="stream_options",
            )
        top_k, top_p = req.top_k or 0, 1.0 if req.top_p is None else req.top_p
        if top_p == 0:  # the smallest nucleus is the most likely token alone, which top_k 1 keeps
            top_k, top_p = 1, 1.0
        return JobParams(
            max_tokens=0,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=top_k,
            top_p=top_p,
            seed=req.seed,
            stop=req.stop_strings(),
            streamed=bool(req.stream),
        )

    def _check_choices(self, n_prompts: int, n: int) -> None:
        """Before any tokenizing: prompts x n within --max-choices, and within what one client may
        have running and waiting at once (more could never be admitted: a 400, not a 429 to retry)."""
        engine = self.engine
        admissible = engine.pool.slots + min(
            engine.admission.max_queued, engine.admission.max_queued_per_client
        )
        cap, flag = self.limits.max_choices, "--max-choices"
        if admissible < cap:
            cap, flag = admissible, "--max-active plus --max-queued-per-client"
        _within(
            n_prompts * n,
            cap,
            f"This request asks for {n_prompts * n} completions ({n_prompts} prompts x n={n}), more "
            f"than this server's limit of {cap} per request ({flag}).",
            param="n" if n_prompts == 1 else "prompt",
            code="too_many_choices",
        )

    def _check_room(self, request: Request, count: int) -> None:
        """The queue's 429 before the prompts are tokenized or rendered (up to a megabyte each), not
        after; the submit that follows decides again."""
        try:
            self.engine.check_room(_client(request), count)
        except QueueFull as e:
            raise _refused(e) from None

    def _check_request_tokens(
        self, prompt_lens: list[int], max_tokens: list[int], n: int, budget_param: str = "max_tokens"
    ) -> None:
        total = n * sum(p + m for p, m in zip(prompt_lens, max_tokens))
        cap = self.limits.max_request_tokens
        _within(
            total,
            cap,
            f"This request asks for {total} tokens in all ("
            + (
                "the prompt and one completion token"
                if budget_param == "n"
                else f"prompts plus {budget_param}"
            )
            + f", times n={n}), more than this server's limit of {cap} per request (--max-request-tokens).",
            param=budget_param,
            code="too_many_tokens",
        )

    def _max_tokens(
        self,
        n_prompt: int,
        requested: int | None,
        default: int | None,
        param: str,
        budget_param: str = "max_tokens",
    ) -> int:
        """The completion budget: what was asked, within the server's limit, which must fit in the
        context with the prompt. Errors name the prompt as `param` and the budget as `budget_param`
        (chat's max_completion_tokens, when that is the one given)."""
        context, cap_prompt, limit = self.context, self.limits.max_prompt_tokens, self.limits.max_tokens
        _within(
            n_prompt,
            context - 1,  # at least one position is left for the completion
            f"This model's maximum context length is {context} tokens, but the prompt has "
            f"{n_prompt} tokens (at least one must be left for the completion).",
            param=param,
            code="context_length_exceeded",
        )
        _within(
            n_prompt,
            cap_prompt,
            f"The prompt has {n_prompt} tokens, more than this server's limit of {cap_prompt}.",
            param=param,
            code="prompt_too_long",
        )
        _within(
            requested,
            limit,
            f"{budget_param} is {requested}, more than this server's limit of {limit}.",
            param=budget_param,
            code="invalid_value",
        )
        room = min(context - n_prompt, limit)
        if requested is None:
            return room if default is None else min(default, room)
        _within(
            requested,
            room,
            f"This model's maximum context length is {context} tokens, but {n_prompt + requested} "
            f"were requested ({n_prompt} in the prompt, {requested} for the completion).",
            param=budget_param,
            code="context_length_exceeded",
        )
        return requested

    def _encode(self, text: str) -> list[int]:
        # an empty prompt starts from the end-of-text token, as at a document boundary
        return self.tokenizer.encode(text) or [self.tokenizer.eos_id]

    def _prompts(self, prompt) -> list[tuple[list[int], str]]:
        """The (token ids, text) of each prompt of a completion request."""
        if isinstance(prompt, str):
            return [(self._encode(prompt), prompt)]
        if isinstance(prompt[0], str):
            return [(self._encode(p), p) for p in prompt]
        lists = [prompt] if isinstance(prompt[0], int) else prompt
        out = []
        for ids in lists:
            if not ids:
                ids = [self.tokenizer.eos_id]
            bad = [i for i in ids if not 0 <= i < self.tokenizer.vocab_size]
            if bad:
                raise APIError(
                    400,
                    f"token id {bad[0]} in 'prompt' is outside the vocabulary (0..{self.tokenizer.vocab_size - 1}).",
                    param="prompt",
                )
            out.append((list(ids), self.tokenizer.decode(ids)))
        return out

    @staticmethod
    def _count_prompts(prompt) -> int:
        if isinstance(prompt, str):
            return 1
        if not prompt:
            raise APIError(400, "'prompt' must not be an empty list.", param="prompt")
        return 1 if isinstance(prompt[0], int) else len(prompt)

    def _jobs(self, prompts: list[list[int]], params: list[JobParams], n: int, client: str) -> list[Job]:
        """One job per choice: choice j of prompt i has index i*n + j and seed seed + j, so a seeded
        choice does not depend on the other prompts in the request. Events go nowhere until `Batch`
        connects them."""
        jobs = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            for j in range(n):
                seed = None if p.seed is None else p.seed + j
                jobs.append(Job(i * n + j, ids, replace(p, seed=seed), _nowhere, client))
        return jobs

    # ------------------------------------------------------------------ routes

    async def completions(self, req: CompletionRequest, request: Request):
        base = self._common(req)
        n = req.n or 1
        prompt = "" if req.prompt is None else req.prompt
        self._check_choices(self._count_prompts(prompt), n)
        self._check_room(request, self._count_prompts(prompt) * n)
        # tokenizing up to a megabyte of text takes a while: off the event loop, so others are answered
        prompts = await asyncio.to_thread(self._prompts, prompt)
        budgets = [
            self._max_tokens(len(ids), req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, "prompt")
            for ids, _ in prompts
        ]
        self._check_request_tokens([len(ids) for ids, _ in prompts], budgets, n)
        # echo with logprobs: the prompt's tokens get entries too, offsets in the text they decode to
        scored = bool(req.echo) and req.logprobs is not None
        params = [replace(base, max_tokens=m, logprobs=req.logprobs, prompt_logprobs=scored) for m in budgets]
        jobs = self._jobs([ids for ids, _ in prompts], params, n, _client(request))
        if scored:
            prompts = [(ids, self.tokenizer.decode(ids)) for ids, _ in prompts]
        echo = [text if req.echo else "" for _, text in prompts for _ in range(n)]
        usage_prompt = sum(len(ids) for ids, _ in prompts)
        meta = Meta(f"cmpl-{uuid.uuid4().hex}", "text_completion", self.model_name)
        render = None if req.logprobs is None else partial(completion_logprobs, tokenizer=self.tokenizer)
        chunks = partial(completion_chunks, meta, echo, usage_prompt, render)
        return await self._respond(
            req, request, jobs, meta, usage_prompt, chunks, render, lambda f: {"text": echo[f.index] + f.text}
        )

    async def chat(self, req: ChatCompletionRequest, request: Request):
        base = self._common(req)
        if req.top_logprobs is not None and not req.logprobs:  # as OpenAI answers it
            raise APIError(400, "'top_logprobs' needs 'logprobs' set to true.", param="top_logprobs")
        logprobs = (req.top_logprobs or 0) if req.logprobs else None
        n = req.n or 1
        for i, m in enumerate(req.messages):
            m.check(i)
        self._check_choices(1, n)
        self._check_room(request, n)
        messages = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in req.messages
        ]
        try:
            ids = await asyncio.to_thread(lambda: self._encode(self.render(messages)))
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        given = "max_tokens" if req.max_completion_tokens is None else "max_completion_tokens"
        requested = getattr(req, given)
        budget = self._max_tokens(len(ids), requested, None, "messages", given)
        if requested is None:  # the default, the rest of the context, shrinks to fit the request's cap
            budget = min(budget, max(self.limits.max_request_tokens // n - len(ids), 1))
        self._check_request_tokens([len(ids)], [budget], n, given if requested is not None else "n")
        params = replace(base, max_tokens=budget, stop_ids=self.chat_stop_ids, logprobs=logprobs)
        jobs = self._jobs([ids], [params], n, _client(request))
        meta = Meta(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", self.model_name)
        render = None if logprobs is None else partial(chat_logprobs, tokenizer=self.tokenizer)
        chunks = partial(chat_chunks, meta, len(jobs), len(ids), render)

        def message(f: Finish) -> dict[str, Any]:
            return {"message": {"role": "assistant", "content": f.text}}

        return await self._respond(req, request, jobs, meta, len(ids), chunks, render, message)

    async def _respond(
        self,
        req,
        request: Request,
        jobs: list[Job],
        meta: Meta,
        prompt_tokens: int,
        chunks: Callable[[bool], Callable],
        render: Callable | None,
        content: Callable[[Finish], dict[str, Any]],
    ):
        """Submit the jobs and answer: an SSE stream of `chunks(include_usage)`, or, once every choice
        has finished, the whole body with `content(finish)` and, when asked, `render(finish.logprobs)`
        in each choice."""
        batch = Batch(self.engine, jobs)  # submitted now: a full queue is a 429 before any output
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return sse(batch, chunks(include_usage), request)
        finishes = await collect(batch, request)
        if finishes is None:
            return _gone()

        def body() -> bytes:
            return _json_bytes({
                **meta.head(),
                "choices": [
                    {
                        "index": f.index,
                        **content(f),
                        "logprobs": None if render is None else render(f.logprobs),
                        "finish_reason": f.reason,
                    }
                    for f in finishes
                ],
                "usage": usage(prompt_tokens, finishes),
            })  # fmt: skip

        # many choices' logprobs take a while to render and serialize: off the event loop, so that other
        # clients' streams and /health go on meanwhile (FastAPI would encode a returned dict on it)
        return Response(await asyncio.to_thread(body), media_type="application/json")


def _json_bytes(obj: Any) -> bytes:
    """`obj` as JSONResponse writes it (UTF-8, compact, NaN refused)."""
    return json.dumps(obj, ensure_ascii=False, allow_nan=False, separators=(",", ":")).encode("utf-8")


def _refused(e: QueueFull) -> APIError:
    """The engine's refusal as an answer: 429 with Retry-After (503 while shutting down)."""
    full = e.status == 429
    return APIError(
        e.status, str(e), code="rate_limit_exceeded" if full else None,
        type="rate_limit_error" if full else None, headers={"Retry-After": str(e.retry_after)},
    )  # fmt: skip


def _nowhere(event) -> None:
    raise RuntimeError("job events before the batch was connected")


def _client(request: Request) -> str:
    """Who a request counts against for per-client fairness (`client_key` of the peer address)."""
    return client_key(request.client.host) if request.client else ""


def client_key(host: str) -> str:
    """An IPv4 address as it is; an IPv6 address by its /64 network, which one client usually holds
    whole (so it cannot count as many clients); anything else (a name) as it is."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped is not None:  # ::ffff:a.b.c.d is an IPv4 client on a dual-stack socket
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


def _gone() -> JSONResponse:
    # never delivered (the client has gone); 499 is the status proxies log for it
    return JSONResponse({"error": None}, status_code=499)


class Batch:
    """The choices of one request, submitted to the engine at once (all or none); their events
    arrive on an asyncio queue. Raises APIError 429 (with Retry-After) when the engine's queue is full,
    503 when it is shutting down."""

    def __init__(self, engine: Engine, jobs: list[Job]) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def post(event) -> None:  # called from the worker thread
            loop.call_soon_threadsafe(self.queue.put_nowait, event)

        for job in jobs:
            job.post = post
        self.jobs = jobs
        self.finished = False  # every choice ran to its end
        self.failed = False  # the engine reported a failure (not the client's doing)
        try:
            engine.submit(jobs)
        except QueueFull as e:
            raise _refused(e) from None

    async def events(self) -> AsyncIterator[Delta | Finish]:
        """The jobs' events until each has finished; a failure raises APIError with its status.
        Leaving early (an error, a client that went away) cancels what is left."""
        pending = len(self.jobs)
        try:
            while pending:
                event = await self.queue.get()
                if isinstance(event, Failure):
                    self.failed = True
                    raise APIError(event.status, event.message)
                pending -= isinstance(event, Finish)
                yield event
            self.finished = True
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Tell the engine to drop what is left of these jobs (a no-op for finished ones)."""
        for job in self.jobs:
            job.cancelled.set()


async def collect(batch: Batch, request: Request) -> list[Finish] | None:
    """Run all choices to the end; their Finish events in index order, or None when the client hung
    up first (then the choices are cancelled, within one engine step)."""

    async def finishes() -> list[Finish]:
        return [e async for e in batch.events() if isinstance(e, Finish)]

    run = asyncio.ensure_future(finishes())
    gone = asyncio.ensure_future(until_disconnected(request))
    try:
        await asyncio.wait({run, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not run.done():
            run.cancel()
            batch.cancel()
    if not run.done() or run.cancelled():
        log.info(
            "client %s went away; its request (choices: %d) was cancelled", peer(request), len(batch.jobs)
        )
        return None
    return sorted(run.result(), key=lambda f: f.index)
