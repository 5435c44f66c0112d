"""An OpenAI-compatible HTTP API over one model (FastAPI; run it with uvicorn).

Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`,
`POST /v1/chat/completions`, `GET /health`. Both POST routes take `max_tokens`, `temperature`,
`top_p`, `top_k`, `stop`, `n`, `seed`, `stream` (server-sent events ending in `data: [DONE]`) and
`stream_options.include_usage`, and answer with OpenAI's response and chunk shapes, usage counts and
`finish_reason` ("stop" for EOS or a stop string, which is cut from the text; "length" at max_tokens).

Every error, including malformed JSON and unknown routes, is a JSON body in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status for the client's mistakes.
The model runs in one worker thread (`engine.Engine`); see there for how requests interleave.

Limits, so that one client cannot exhaust the server: with `api_key`, every route but `/health` (left
open for liveness probes; it shows only counters) answers 401 unless the request carries
`Authorization: Bearer KEY`. Request bodies above `max_body_bytes` get a 413 (read in chunks and
counted, never buffered past the limit), `max_tokens` above `max_tokens_limit` a 400, prompts longer
than `max_prompt_tokens` (default: the context) a 400. A client that disconnects mid-stream cancels
its generation.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from minimoe.serve.chat import ChatTemplateError, make_renderer
from minimoe.serve.engine import Delta, Engine, Failure, Finish, Job, JobParams
from minimoe.serve.schemas import (
    APIError,
    ChatCompletionRequest,
    CompletionRequest,
    describe_validation_error,
)

COMPLETION_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the context
MAX_BODY_BYTES = 1 << 20
MAX_TOKENS_LIMIT = 4096  # each generated token grows a KV cache; this bounds one choice's memory
OPEN_PATHS = ("/health",)  # reachable without the API key


def build_app(
    model,
    tokenizer,
    model_name: str,
    max_active: int = 64,
    api_key: str | None = None,
    max_body_bytes: int = MAX_BODY_BYTES,
    max_tokens_limit: int = MAX_TOKENS_LIMIT,
    max_prompt_tokens: int | None = None,
) -> FastAPI:
    """The FastAPI app serving `model` under the name `model_name`.

    Args:
        model: a Transformer in eval mode, on the device it should run on.
        tokenizer: its Tokenizer; its `chat_template` (if any) formats chat requests.
        model_name: the id clients pass as `model`.
        max_active: choices generated at the same time (more wait in the engine's queue).
        api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
        max_body_bytes: larger request bodies are refused with 413.
        max_tokens_limit: the most tokens one choice may ask for (and the default cap for chat).
        max_prompt_tokens: the longest prompt in tokens; None = whatever fits the context.
    Returns:
        The app. Its lifespan starts and stops the engine's worker thread.
    """
    service = Service(model, tokenizer, model_name, max_active, max_tokens_limit, max_prompt_tokens)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        try:
            yield
        finally:
            service.engine.close()

    app = FastAPI(title="minimoe", summary="OpenAI-compatible API", lifespan=lifespan)
    app.state.service = service
    _add_error_handlers(app)
    if api_key:
        app.add_middleware(_RequireKey, key=api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = service.engine
        return {
            "status": "ok",
            "active_jobs": engine.active_jobs,
            "generated_tokens": engine.generated_tokens,
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        service.check_model(model_id, param=None)
        return service.model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.completions(await _parse(request, CompletionRequest, max_body_bytes))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.chat(await _parse(request, ChatCompletionRequest, max_body_bytes))

    return app


def app_from_run(
    run_dir: str | Path, which: str = "best", device: str = "cpu", model_name: str | None = None, **kw
) -> FastAPI:
    """Load a run (or checkpoint) directory and build its app; the model is named after the run
    directory unless `model_name` is given."""
    from minimoe.train.checkpoint import load_run

    model, tokenizer, _, _ = load_run(run_dir, which, device)
    return build_app(model, tokenizer, model_name or Path(run_dir).resolve().name, **kw)


# ---------------------------------------------------------------------- requests -> jobs -> responses


class Service:
    """What the routes share: the engine, the tokenizer, the chat renderer and the context size."""

    def __init__(
        self,
        model,
        tokenizer,
        model_name: str,
        max_active: int = 64,
        max_tokens_limit: int = MAX_TOKENS_LIMIT,
        max_prompt_tokens: int | None = None,
    ) -> None:
        self.engine = Engine(model, tokenizer, max_active)
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.context = model.cfg.max_seq_len
        self.max_tokens_limit = max_tokens_limit
        self.max_prompt_tokens = max_prompt_tokens
        self.created = int(time.time())
        # built now so that a broken template (or missing jinja2) fails at startup
        self.render = make_renderer(tokenizer.chat_template, tokenizer.bos_token, tokenizer.eos_token)

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
                f"The model '{name}' does not exist; this server serves '{self.model_name}'.",
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
        return JobParams(
            max_tokens=0,
            temperature=1.0 if req.temperature is None else req.temperature,
            top_k=req.top_k or 0,
            top_p=1.0 if req.top_p is None else req.top_p,
            seed=req.seed,
            stop=req.stop_strings(),
        )

    def _max_tokens(self, n_prompt: int, requested: int | None, default: int | None, param: str) -> int:
        """The completion budget: what was asked, within the server's limit, which must fit in the
        context with the prompt."""
        if n_prompt >= self.context:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens, but the prompt has "
                f"{n_prompt} tokens (at least one must be left for the completion).",
                param=param,
                code="context_length_exceeded",
            )
        if self.max_prompt_tokens is not None and n_prompt > self.max_prompt_tokens:
            raise APIError(
                400,
                f"The prompt has {n_prompt} tokens, more than this server's limit of "
                f"{self.max_prompt_tokens}.",
                param=param,
                code="prompt_too_long",
            )
        if requested is not None and requested > self.max_tokens_limit:
            raise APIError(
                400,
                f"max_tokens is {requested}, more than this server's limit of {self.max_tokens_limit}.",
                param="max_tokens",
                code="invalid_value",
            )
        room = min(self.context - n_prompt, self.max_tokens_limit)
        if requested is None:
            return room if default is None else min(default, room)
        if requested > room:
            raise APIError(
                400,
                f"This model's maximum context length is {self.context} tokens, but {n_prompt + requested} "
                f"were requested ({n_prompt} in the prompt, {requested} for the completion).",
                param="max_tokens",
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
        if not prompt:
            raise APIError(400, "'prompt' must not be an empty list.", param="prompt")
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

    def _jobs(self, prompts: list[list[int]], params: list[JobParams], n: int) -> list[tuple]:
        """(index, prompt ids, params) per choice: choice j of prompt i has index i*n + j and seed
        seed + j, so a seeded choice does not depend on the other prompts in the request."""
        specs = []
        for i, (ids, p) in enumerate(zip(prompts, params)):
            for j in range(n):
                seed = None if p.seed is None else p.seed + j
                specs.append((i * n + j, ids, replace(p, seed=seed)))
        return specs

    # ------------------------------------------------------------------ routes

    async def completions(self, req: CompletionRequest):
        base = self._common(req)
        prompts = self._prompts(req.prompt)
        params = [
            replace(
                base,
                max_tokens=self._max_tokens(
                    len(ids), req.max_tokens, COMPLETION_DEFAULT_MAX_TOKENS, "prompt"
                ),
            )
            for ids, _ in prompts
        ]
        n = req.n or 1
        specs = self._jobs([ids for ids, _ in prompts], params, n)
        echo = [text if req.echo else "" for _, text in prompts for _ in range(n)]
        usage_prompt = sum(len(ids) for ids, _ in prompts)
        meta = _Meta(f"cmpl-{uuid.uuid4().hex}", "text_completion", self.model_name)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            chunks = _completion_chunks(meta, echo, usage_prompt, include_usage)
            return _sse(self.engine, specs, chunks)
        finishes = await _collect(self.engine, specs)
        return {
            **meta.head(),
            "choices": [
                {
                    "index": f.index,
                    "text": echo[f.index] + f.text,
                    "logprobs": None,
                    "finish_reason": f.reason,
                }
                for f in finishes
            ],
            "usage": _usage(usage_prompt, finishes),
        }

    async def chat(self, req: ChatCompletionRequest):
        base = self._common(req)
        messages = [
            {"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})}
            for m in req.messages
        ]
        try:
            ids = self._encode(self.render(messages))
        except ChatTemplateError as e:
            raise APIError(400, str(e), param="messages") from None
        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = replace(base, max_tokens=self._max_tokens(len(ids), requested, None, "messages"))
        specs = self._jobs([ids], [params], req.n or 1)
        meta = _Meta(f"chatcmpl-{uuid.uuid4().hex}", "chat.completion", self.model_name)
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return _sse(self.engine, specs, _chat_chunks(meta, len(specs), len(ids), include_usage))
        finishes = await _collect(self.engine, specs)
        return {
            **meta.head(),
            "choices": [
                {
                    "index": f.index,
                    "message": {"role": "assistant", "content": f.text},
                    "logprobs": None,
                    "finish_reason": f.reason,
                }
                for f in finishes
            ],
            "usage": _usage(len(ids), finishes),
        }


class _Meta:
    """id, object type, creation time and model of one response (shared by all its chunks)."""

    def __init__(self, id: str, object: str, model: str) -> None:
        self.id, self.object, self.model, self.created = id, object, model, int(time.time())

    def head(self, object: str | None = None) -> dict[str, Any]:
        return {"id": self.id, "object": object or self.object, "created": self.created, "model": self.model}


def _usage(prompt_tokens: int, finishes: list[Finish]) -> dict[str, int]:
    completion = sum(f.completion_tokens for f in finishes)
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion,
        "total_tokens": prompt_tokens + completion,
    }


# ---------------------------------------------------------------------- talking to the engine


class _Batch:
    """The choices of one request, submitted to the engine; their events arrive on an asyncio queue."""

    def __init__(self, engine: Engine, specs: list[tuple]) -> None:
        loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

        def post(event) -> None:  # called from the worker thread
            loop.call_soon_threadsafe(self.queue.put_nowait, event)

        self.engine = engine
        self.jobs = [Job(index, ids, params, post) for index, ids, params in specs]

    async def events(self) -> AsyncIterator[Delta | Finish]:
        """Submit the jobs and yield their events until each has finished; a failure raises
        APIError(500). Leaving early (an error, a client that went away) cancels what is left."""
        for job in self.jobs:
            self.engine.submit(job)
        pending = len(self.jobs)
        try:
            while pending:
                event = await self.queue.get()
                if isinstance(event, Failure):
                    raise APIError(500, f"generation failed: {event.message}")
                pending -= isinstance(event, Finish)
                yield event
        finally:
            self.cancel()

    def cancel(self) -> None:
        """Tell the engine to drop what is left of these jobs (a no-op for finished ones)."""
        for job in self.jobs:
            job.cancelled.set()


async def _collect(engine: Engine, specs: list[tuple]) -> list[Finish]:
    """Run all choices to the end; their Finish events in index order."""
    finishes = [e async for e in _Batch(engine, specs).events() if isinstance(e, Finish)]
    return sorted(finishes, key=lambda f: f.index)


def _sse(engine: Engine, specs: list[tuple], chunks: Callable) -> StreamingResponse:
    """A server-sent-events response: one `data: {json}` per chunk that `chunks(events)` yields,
    then `data: [DONE]`; a failure mid-stream is sent as an error object (the status is already 200)."""

    async def body() -> AsyncIterator[str]:
        batch = _Batch(engine, specs)
        try:
            async for chunk in chunks(batch.events()):
                yield f"data: {json.dumps(chunk)}\n\n"
        except APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
            return
        finally:  # also when the client goes away mid-stream (the task is cancelled)
            batch.cancel()
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _completion_chunks(meta: _Meta, echo: list[str], prompt_tokens: int, include_usage: bool):
    async def chunks(events: AsyncIterator) -> AsyncIterator[dict]:
        def chunk(index: int, text: str, reason: str | None) -> dict:
            choice = {"index": index, "text": text, "logprobs": None, "finish_reason": reason}
            return {**meta.head(), "choices": [choice], **({"usage": None} if include_usage else {})}

        for index, text in enumerate(echo):
            if text:
                yield chunk(index, text, None)
        finishes = []
        async for e in events:
            if isinstance(e, Delta):
                yield chunk(e.index, e.text, None)
            else:
                finishes.append(e)
                yield chunk(e.index, "", e.reason)
        if include_usage:
            yield {**meta.head(), "choices": [], "usage": _usage(prompt_tokens, finishes)}

    return chunks


def _chat_chunks(meta: _Meta, n_choices: int, prompt_tokens: int, include_usage: bool):
    async def chunks(events: AsyncIterator) -> AsyncIterator[dict]:
        def chunk(index: int, delta: dict, reason: str | None) -> dict:
            choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": reason}
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
                yield chunk(e.index, {"content": e.text}, None)
            else:
                finishes.append(e)
                yield chunk(e.index, {}, e.reason)
        if include_usage:
            yield {
                **meta.head("chat.completion.chunk"),
                "choices": [],
                "usage": _usage(prompt_tokens, finishes),
            }

    return chunks


# ---------------------------------------------------------------------- parsing and errors


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, or APIError(413) once it passes `limit` bytes. What follows the limit is read and
    dropped (up to a bound) rather than left unread: closing a connection with unread data makes the
    kernel reset it, and the client would see a broken connection instead of the 413."""
    too_large = APIError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes.",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 64 * limit:  # not worth reading at all
        raise too_large
    body, size = bytearray(), 0
    async for chunk in request.stream():
        size += len(chunk)
        if size <= limit:
            body += chunk
        elif size > 64 * limit:
            break
    if size > limit:
        raise too_large
    return bytes(body)


async def _parse(request: Request, cls, max_body_bytes: int = MAX_BODY_BYTES):
    """The request body as `cls`, or an APIError (413 too large, else 400) naming what is wrong."""
    raw = await _read_body(request, max_body_bytes)
    try:
        data = json.loads(raw)
    except RecursionError:  # nesting deeper than the parser's stack, e.g. "[[[[..."
        raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = (
            f"The request body is not valid JSON ({e})."
            if raw
            else "The request body is empty; send a JSON object."
        )
        raise APIError(400, msg, code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise describe_validation_error(e) from None


class _RequireKey:
    """ASGI middleware: 401 in OpenAI's shape unless `Authorization: Bearer KEY` (paths in OPEN_PATHS
    excepted). It runs before routing and before any body is read, so a client without the key costs
    nothing; keys are compared in constant time."""

    def __init__(self, app, key: str) -> None:
        self.app = app
        self.key = key.encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS:
            return await self.app(scope, receive, send)
        given = dict(scope["headers"]).get(b"authorization")
        if given is None:
            err = APIError(
                401,
                "You didn't provide an API key; send it as 'Authorization: Bearer KEY'.",
                code="invalid_api_key",
            )
        else:
            scheme, _, token = given.partition(b" ")
            if scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.key):
                return await self.app(scope, receive, send)
            err = APIError(401, "Incorrect API key provided.", code="invalid_api_key")
        response = JSONResponse(err.body(), status_code=401, headers={"WWW-Authenticate": "Bearer"})
        await response(scope, receive, send)


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            msg = f"Unknown request URL: {request.method} {request.url.path}."
        elif exc.status_code == 405:
            msg = f"Method {request.method} is not allowed on {request.url.path}."
        else:
            msg = str(exc.detail)
        err = APIError(exc.status_code, msg, code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = APIError(400, f"Invalid request: {exc.errors()[0].get('msg', 'bad value')}.")
        return JSONResponse(err.body(), status_code=400)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        err = APIError(500, f"Internal server error: {type(exc).__name__}: {exc}")
        return JSONResponse(err.body(), status_code=500)
