"""An OpenAI-compatible HTTP API over one model (FastAPI), and `run_server`, which serves it with
uvicorn the way `minimoe serve` does.

Routes: `GET /v1/models`, `GET /v1/models/{id}`, `POST /v1/completions`,
`POST /v1/chat/completions`, `GET /health`. Both POST routes take `max_tokens`, `temperature`,
`top_p`, `top_k`, `stop`, `n`, `seed`, `stream` (server-sent events ending in `data: [DONE]`) and
`stream_options.include_usage`, and answer with OpenAI's response and chunk shapes, usage counts and
`finish_reason` ("stop" for EOS or a stop string, which is cut from the text; "length" at max_tokens).

Every error, including malformed JSON and unknown routes, is a JSON body in OpenAI's shape,
`{"error": {"message", "type", "param", "code"}}`, with a 4xx status for the client's mistakes.
The model runs in one worker thread that batches every request's sequences (`engine.Engine`).

Limits (`limits.Limits`, each a `minimoe serve` flag) keep one client from exhausting the server:
request size (413), choices and tokens per request (400 naming the limit), a bounded queue with a
per-client share (429 with Retry-After), header and body read timeouts. With `api_key`, every route
but `/health` (left open for liveness probes; it shows only counters) answers 401 unless the request
carries `Authorization: Bearer KEY`. A client that hangs up, streaming or not, cancels its request.
"""

from __future__ import annotations

import asyncio
import socket
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request

from minimoe.serve.http import RequireKey, add_error_handlers, log, parse_json, read_body, timed_h11
from minimoe.serve.limits import Limits
from minimoe.serve.schemas import ChatCompletionRequest, CompletionRequest
from minimoe.serve.service import Service

SHUTDOWN_GRACE_S = 2  # after SIGTERM, open connections get this long before they are closed
KEEP_ALIVE_S = 5  # an idle keep-alive connection is closed after this long (or --header-timeout, if less)


def build_app(
    model,
    tokenizer,
    model_name: str,
    api_key: str | None = None,
    limits: Limits | None = None,
    speculative: bool = False,
    compile: bool = False,
) -> FastAPI:
    """The FastAPI app serving `model` under the name `model_name`.

    Args:
        model: a Transformer in eval mode, on the device it should run on.
        tokenizer: its Tokenizer; its `chat_template` (if any) formats chat requests.
        model_name: the id clients pass as `model`.
        api_key: when set, every route but /health needs `Authorization: Bearer <api_key>`.
        limits: the server's limits (default Limits()).
        speculative: the engine decodes self-speculatively with the model's MTP module.
        compile: the engine decodes with the compiled fixed-shape step (compiled at its first step,
            or by `app.state.service.engine.warm_up()`).
    Returns:
        The app; `app.state.service.engine` is its engine. Its lifespan starts and stops the
        engine's worker thread.
    """
    limits = (limits or Limits()).validate()
    service = Service(model, tokenizer, model_name, limits, speculative=speculative, compile=compile)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        service.engine.start()
        try:
            yield
        finally:
            service.engine.close()

    app = FastAPI(title="minimoe", summary="OpenAI-compatible API", lifespan=lifespan)
    app.state.service = service
    add_error_handlers(app)
    if api_key:
        app.add_middleware(RequireKey, key=api_key)

    @app.get("/health")
    async def health() -> dict[str, Any]:
        engine = service.engine
        return {
            # "degraded": the engine's last steps each failed (every error is logged with its traceback)
            "status": "degraded" if engine.degraded else "ok",
            "active_jobs": engine.active_jobs,
            "queued_jobs": engine.queued_jobs,
            "generated_tokens": engine.generated_tokens,
            "failed_steps": engine.failed_steps,
        }

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [service.model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str) -> dict[str, Any]:
        service.check_model(model_id, param=None)
        return service.model_card()

    async def parse(request: Request, cls):
        raw = await read_body(request, limits.max_body_bytes, limits.body_timeout)
        # a megabyte of many small nodes takes a second to parse and check: off the event loop, so
        # that other clients' streams and /health go on meanwhile
        return await asyncio.to_thread(parse_json, raw, cls)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await service.completions(await parse(request, CompletionRequest), request)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await service.chat(await parse(request, ChatCompletionRequest), request)

    return app


def app_from_run(
    run_dir: str | Path, which: str = "best", device: str = "cpu", model_name: str | None = None, **kw
) -> FastAPI:
    """Load a run (or checkpoint) directory and build its app; the model is named after the run
    directory unless `model_name` is given."""
    from minimoe.train.checkpoint import load_run

    model, tokenizer, _, _ = load_run(run_dir, which, device)
    return build_app(model, tokenizer, model_name or Path(run_dir).resolve().name, **kw)


def run_server(
    app: FastAPI, sock: socket.socket, log_level: str = "info", trusted_proxies: list[str] | None = None
) -> None:
    """Serve `app` on a listening socket until SIGINT or SIGTERM.

    On the signal the server stops accepting, the engine fails every queued and running request at
    once (503, or an error event on a stream), and open connections get SHUTDOWN_GRACE_S seconds to
    take their answers before they are closed, so the process exits within a few seconds.
    `trusted_proxies` (addresses or networks, "*" for any): connections from these name their client
    in `X-Forwarded-For`; by default no peer is trusted, so no client can claim another's address.
    """
    import uvicorn

    limits: Limits = app.state.service.limits
    engine = app.state.service.engine

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            if not self.should_exit:
                log.info("shutting down: new connections refused, unfinished requests cancelled")
            engine.shutdown()  # flags only: safe in a signal handler
            super().handle_exit(sig, frame)

    config = uvicorn.Config(
        app, log_level=log_level, lifespan="on", http=timed_h11(limits.header_timeout, limits.write_timeout),
        timeout_graceful_shutdown=SHUTDOWN_GRACE_S, **proxy_settings(trusted_proxies),
        # uvicorn's idle keep-alive timeout (5 s by default) within the header timeout, which covers it
        timeout_keep_alive=min(KEEP_ALIVE_S, limits.header_timeout),
    )  # fmt: skip
    Server(config).run(sockets=[sock])


def proxy_settings(trusted_proxies: list[str] | None) -> dict[str, Any]:
    """uvicorn's proxy options: `X-Forwarded-For` read only from `trusted_proxies` (uvicorn's own
    default trusts 127.0.0.1 and ::1, or $FORWARDED_ALLOW_IPS, so that any local client could count
    as many clients against the per-client limits)."""
    if not trusted_proxies:
        return {"proxy_headers": False}
    return {"proxy_headers": True, "forwarded_allow_ips": list(trusted_proxies)}
