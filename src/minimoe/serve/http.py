"""The HTTP edge of the server: reading and parsing request bodies (size limit, read timeout, strict
JSON), the API-key middleware, the error handlers that give every error OpenAI's shape, watching
for a client that hangs up, and an h11 protocol with a header read timeout.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re

import h11
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.http.h11_impl import H11Protocol

from minimoe.serve.schemas import APIError, describe_validation_error

log = logging.getLogger("uvicorn.error")  # uvicorn's own log: shown at --log-level info and above
OPEN_PATHS = ("/health",)  # reachable without the API key


async def read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The body, or APIError 413 once it passes `limit` bytes, or 408 when it has not all arrived
    within `timeout` seconds (a client sending half a body cannot hold the connection), or 499 (never
    delivered; one log line) when the client hangs up before sending all of it.

    What follows the limit is read and dropped (up to a bound) rather than left unread: closing a
    connection with unread data makes the kernel reset it, and the client would see a broken
    connection instead of the 413."""
    too_large = APIError(
        413,
        f"The request body is larger than this server's limit of {limit} bytes.",
        code="request_too_large",
    )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > 64 * limit:  # not worth reading at all
        raise too_large
    body, size = bytearray(), 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size <= limit:
                    body += chunk
                elif size > 64 * limit:
                    break
    except TimeoutError:
        raise APIError(
            408, f"The request body did not arrive within {timeout:g} seconds.", code="request_timeout"
        ) from None
    except ClientDisconnect:
        log.info("client %s went away while sending its request body", peer(request))
        raise APIError(499, "The client closed the connection before sending the whole body.") from None
    if size > limit:
        raise too_large
    return bytes(body)


def peer(request: Request) -> str:
    """The client's host:port, for log lines."""
    return f"{request.client.host}:{request.client.port}" if request.client else "?"


def _no_constant(name: str):
    raise ValueError(f"{name} is not a valid JSON number")


# what can spell a lone surrogate in a UTF-8 body: a \uD800-\uDFFF escape, or a surrogate's own three
# bytes (json.loads decodes bytes with "surrogatepass"); a body without either needs no walk
_MAYBE_SURROGATE = re.compile(rb"\\u[dD][89a-fA-F]|\xed[\xa0-\xbf]")


def _is_bad(v) -> bool:
    if not isinstance(v, str):
        return False
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def _has_bad_text(value) -> bool:
    """Whether some string (a key or a value) in `value` is not valid Unicode: a walk without paths."""
    stack = [value]
    while stack:
        v = stack.pop()
        if isinstance(v, dict):
            if any(map(_is_bad, v)):
                return True
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
        elif _is_bad(v):
            return True
    return False


def _bad_text_path(value) -> str:
    """Where the first string in `value` that is not valid Unicode is (built only once one is known)."""
    stack = [(value, "")]
    while stack:
        v, where = stack.pop()
        if isinstance(v, dict):
            stack.extend((x, f"{where}.{k}" if where else str(k)) for k, x in v.items())
            stack.extend((k, where) for k in v)
        elif isinstance(v, list):
            stack.extend((x, f"{where}.{i}" if where else str(i)) for i, x in enumerate(v))
        elif _is_bad(v):
            return where
    return ""


def _check_text(value, raw: bytes) -> None:
    """APIError(400) naming the first string in `value` (parsed from `raw`) that is not valid Unicode (a
    lone surrogate such as "\\ud800", which JSON escapes can spell but no tokenizer can encode). Cheap for
    the common body: the tree is walked only when `raw` holds what could spell one."""
    if json.detect_encoding(raw) == "utf-8" and not _MAYBE_SURROGATE.search(raw):
        return
    if not _has_bad_text(value):
        return
    where = _bad_text_path(value)
    raise APIError(
        400,
        f"'{where}' holds a string that is not valid Unicode (a lone surrogate).",
        param=where or None,
        code="invalid_value",
    )


def parse_json(raw: bytes, cls):
    """The request body as `cls`, or an APIError 400 naming what is wrong. A body of many nodes takes a
    while to parse and check: callers on the event loop run this in a worker thread (`app.parse`)."""
    try:
        # NaN and Infinity are not JSON; 1e999 parses to inf, refused by the models' finite fields
        data = json.loads(raw, parse_constant=_no_constant)
    except RecursionError:  # nesting deeper than the parser's stack, e.g. "[[[[..."
        raise APIError(400, "The request body is nested too deeply.", code="invalid_json") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        msg = (
            f"The request body is not valid JSON ({e})."
            if raw
            else "The request body is empty; send a JSON object."
        )
        raise APIError(400, msg, code="invalid_json") from None
    except ValueError as e:  # NaN/Infinity, or an integer with more digits than Python converts
        raise APIError(400, f"The request body is not valid JSON ({e}).", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "The request body must be a JSON object.", code="invalid_json")
    _check_text(data, raw)
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise describe_validation_error(e) from None


async def until_disconnected(request: Request) -> None:
    """Return when the client hangs up. Call only once the body has been read: what it receives
    next is the disconnect (or the end of the response)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


class RequireKey:
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


def error_response(err: APIError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc)

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
        log.error(
            "internal error on %s %s: %s: %s", request.method, request.url.path, type(exc).__name__, exc
        )
        err = APIError(500, f"Internal server error: {type(exc).__name__}.")
        return JSONResponse(err.body(), status_code=500)


def timed_h11(header_timeout: float, write_timeout: float = 60.0) -> type[H11Protocol]:
    """uvicorn's h11 protocol with a header read timeout: a connection that has not sent a complete
    request head within `header_timeout` seconds of opening (or of its previous response) is closed,
    so a client trickling half a header cannot hold it. So is one still sending, that long after its
    answer, a body that was never read (a 401, a 404 or a 408 answers without reading it all): every
    byte it trickles would restart uvicorn's keep-alive timer. (uvicorn itself only times out idle
    keep-alive connections.) And a write timeout: a client that reads nothing of its answer for
    `write_timeout` seconds while the server waits to write (the socket's buffers full) loses its
    connection, so that the server does not hold its unread answer, or keep generating it, for ever."""

    class TimedH11Protocol(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None
        _write_timer: asyncio.TimerHandle | None = None

        def pause_writing(self) -> None:  # the transport's buffer is full: the client is not reading
            super().pause_writing()
            if self._write_timer is None:
                self._write_timer = self.loop.call_later(write_timeout, self._write_stalled)

        def resume_writing(self) -> None:
            super().resume_writing()
            self._cancel("_write_timer")

        def _write_stalled(self) -> None:
            self._write_timer = None
            if not self.transport.is_closing():
                log.info("%s read nothing of its answer for %gs; connection closed", self._who, write_timeout)
                self.transport.abort()  # drops the unsent bytes; the request sees its client gone

        def _cancel(self, timer: str) -> None:
            """Cancel the timer held in attribute `timer`, if one is set."""
            handle = getattr(self, timer)
            if handle is not None:
                handle.cancel()
                setattr(self, timer, None)

        @property
        def _who(self) -> str:
            return f"{self.client[0]}:{self.client[1]}" if self.client else "a client"

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(header_timeout, self._timed_out)

        def _disarm(self) -> None:
            self._cancel("_header_timer")

        def _timed_out(self) -> None:
            self._header_timer = None
            if self.transport.is_closing():
                return
            client = self._who
            if self.conn.their_state is h11.IDLE:
                if self.conn.trailing_data[0]:  # part of a request head
                    what = "sent no complete request head within %gs; connection closed"
                else:  # not a byte of a next request: an idle keep-alive connection (or a silent one)
                    what = "sent nothing for %gs; idle connection closed"
                log.info("%s " + what, client, header_timeout)
                self.transport.close()
            elif self.conn.our_state is h11.DONE:  # answered, and still sending the unread body
                log.info(
                    "%s was still sending a request body %gs after its answer; connection closed",
                    client,
                    header_timeout,
                )
                self.transport.close()

        def handle_events(self) -> None:
            super().handle_events()
            if self.conn.our_state in (h11.SEND_RESPONSE, h11.SEND_BODY):  # a request is being answered
                self._disarm()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()  # the next request's head gets the same time

        def connection_lost(self, exc) -> None:
            self._disarm()
            self._cancel("_write_timer")
            super().connection_lost(exc)

    return TimedH11Protocol
