"""Request bodies of the OpenAI-compatible API (pydantic), and its error shape.

Fields follow OpenAI's API reference. Unknown fields are accepted and ignored, as OpenAI-compatible
servers do, except those that would change the output in a way minimoe cannot honour (penalties,
tools, ...): a non-default value for one of them is a 400, not a silent no-op.
`top_k` is an extension (as in vLLM).

Validation is strict: no coercion (`true` is not the number 1, `"5"` is not 5), numbers must be
finite, integers must fit their range (a seed is a signed 64-bit integer), so every bad value is a
400 naming the field rather than a surprise later.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

# parameters minimoe does not implement; a "set" value (see `unsupported_param`) is refused
UNSUPPORTED = (
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "suffix",
    "tools",
    "functions",
    "tool_choice",
    "function_call",
    "response_format",
)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "param", "code"}}."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


INT64 = 1 << 63
MAX_STOP_STRINGS = 16  # OpenAI allows 4; each is searched for after every token
MAX_STOP_LENGTH = 256  # characters per stop string: each is matched against the text's tail per token
MAX_TOP_LOGPROBS = 20  # chat's alternatives per token, at most (OpenAI's limit)
MAX_COMPLETION_LOGPROBS = 5  # completions' (OpenAI's limit for the legacy endpoint)


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True)

    include_usage: bool = False


class _Sampling(BaseModel):
    """Fields shared by completions and chat completions. None means "use the default"."""

    model_config = ConfigDict(extra="allow", strict=True)

    model: str
    max_tokens: int | None = Field(None, ge=0)
    temperature: float | None = Field(None, ge=0, le=2, allow_inf_nan=False)
    # 0 is in OpenAI's range: only the most likely token is left (see `Service._common`)
    top_p: float | None = Field(None, ge=0, le=1, allow_inf_nan=False)
    top_k: int | None = Field(None, ge=0)
    n: int | None = Field(None, ge=1, le=128)
    # the cap counts the strings of a list (on the field it would cap a lone string's length too)
    stop: Annotated[list[str], Field(max_length=MAX_STOP_STRINGS)] | str | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    best_of: int | None = Field(None, ge=1)
    user: str | None = None

    def stop_strings(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if any(s == "" for s in stops):
            raise APIError(400, "Stop strings must not be empty.", param="stop")
        if any(len(s) > MAX_STOP_LENGTH for s in stops):
            longest = max(len(s) for s in stops)
            raise APIError(
                400, f"Stop strings must be at most {MAX_STOP_LENGTH} characters long (got {longest}).",
                param="stop",
            )  # fmt: skip
        return tuple(stops)

    def unsupported_param(self) -> str | None:
        """The first parameter given a value minimoe cannot honour (see `_is_set`)."""
        if self.best_of is not None and self.best_of != (self.n or 1):
            return "best_of"
        extra = self.model_extra or {}
        return next((name for name in UNSUPPORTED if _is_set(name, extra.get(name))), None)


def _is_set(name: str, value: Any) -> bool:
    """Whether `value` asks for something other than the parameter's default."""
    if name == "response_format" and isinstance(value, dict) and value.get("type") == "text":
        return False
    if name in ("tool_choice", "function_call"):
        return value not in (None, "none", "auto")  # "required" or a named tool demands a call
    return bool(value)


class CompletionRequest(_Sampling):
    """POST /v1/completions. `prompt`: a string, a list of strings, token ids, or lists of them;
    required, but null is OpenAI's "no prompt": the model starts a new document (as from "")."""

    prompt: str | list[str] | list[int] | list[list[int]] | None
    echo: bool | None = False
    # each token's logprob and this many alternatives' (0: the chosen token's alone); None: no logprobs
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)


class ContentPart(BaseModel):
    """One part of a message's content list; only text parts are supported (`Message.check`)."""

    model_config = ConfigDict(extra="allow", strict=True)

    type: str
    text: str | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow", strict=True)

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None

    def check(self, i: int) -> None:
        """APIError(400) for what this server cannot take as message `i`: tool calls (the model would
        never see them), a content part that is not text, or no content."""
        extra = self.model_extra or {}
        where = f"messages.{i}"
        for field in ("tool_calls", "function_call"):
            if extra.get(field):
                raise APIError(
                    400, f"'{where}.{field}': tool calls are not supported by this server.",
                    param=f"{where}.{field}", code="unsupported_parameter",
                )  # fmt: skip
        if self.content is None:
            raise APIError(
                400, f"Missing required parameter: '{where}.content'.",
                param=f"{where}.content", code="missing_required_parameter",
            )  # fmt: skip
        for j, part in enumerate(self.content if isinstance(self.content, list) else ()):
            if part.type != "text" or part.text is None:
                raise APIError(
                    400,
                    f"'{where}.content.{j}' is a {brief(part.type, 40)} part; only text parts "
                    "(with their 'text') are supported by this server.",
                    param=f"{where}.content.{j}", code="invalid_value",
                )  # fmt: skip

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text or "" for p in self.content)
        return self.content or ""


class ChatCompletionRequest(_Sampling):
    """POST /v1/chat/completions. `max_completion_tokens` is OpenAI's newer name for max_tokens."""

    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=0)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


def describe_validation_error(err: ValidationError) -> APIError:
    """The first problem pydantic found, as one sentence naming the parameter."""
    e = err.errors()[0]
    loc = [str(x) for x in e["loc"]]
    # drop pydantic's union-branch labels such as "str" or "list[int]" from the location
    param = ".".join(
        x for x in loc if not any(c in x for c in "[]") and x not in ("str", "int", "float", "bool")
    )
    if e["type"] == "missing":
        return APIError(
            400, f"Missing required parameter: '{param}'.", param=param, code="missing_required_parameter"
        )
    got = e.get("input")
    shown = brief(got) if not isinstance(got, dict | list) or len(repr(got)) < 60 else type(got).__name__
    return APIError(
        400, f"Invalid value for '{param}': {e['msg']} (got {shown}).", param=param, code="invalid_value"
    )


def brief(value: object, limit: int = 60) -> str:
    """`repr(value)`, cut to `limit` characters: an error echoes what it refused, not a megabyte of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
