"""What a client hands the serving engine (`Job`, with its `JobParams`) and what it gets back: the
events `Delta`, `Finish` and `Failure` (with a `Logprob` per token when asked), posted from the
engine's worker thread, or `QueueFull` at submission."""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class JobParams:
    """What one choice is generated with (already validated)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    stop_ids: tuple[int, ...] = ()  # tokens that end the choice besides EOS (a chat's end of turn)
    logprobs: int | None = None  # None: none; k: each token's logprob and its k most likely alternatives
    # with logprobs: entries for the prompt's tokens first (echo); the job then runs even at max_tokens 0
    prompt_logprobs: bool = False
    # the owner reads each Delta's logprobs as they come: the Finish carries none (the engine keeps no list)
    streamed: bool = False

    @property
    def scores_prompt(self) -> bool:
        """Whether the prompt's tokens get entries: `prompt_logprobs` with `logprobs` set."""
        return self.prompt_logprobs and self.logprobs is not None

    @property
    def prompt_score(self) -> int | None:
        """The alternatives each prompt token is scored with (`Prefill.add`'s `score`); None: not scored."""
        return self.logprobs if self.scores_prompt else None


@dataclass(frozen=True)
class Logprob:
    """One token's log-probability under the model (raw logits, before sampling's filters), the `top`
    most likely tokens' ((id, logprob), ...), and where its text starts: the length of the text decoded
    from the tokens before it (half a character counts as one U+FFFD there), counted from the prompt's
    text when the prompt's tokens have entries too. The prompt's first token has no logprob or top."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] | None
    offset: int


@dataclass(frozen=True)
class Delta:
    """New text for choice `index`."""

    index: int
    text: str
    logprobs: tuple[Logprob, ...] = ()  # of the tokens pushed since the last Delta, when asked


@dataclass(frozen=True)
class Finish:
    """Choice `index` is done: `reason` is "stop" (EOS or a stop string) or "length"."""

    index: int
    reason: str
    completion_tokens: int
    text: str
    logprobs: tuple[Logprob, ...] | None = None  # every counted token's, when asked (none when streamed)


@dataclass(frozen=True)
class Failure:
    """Choice `index` could not be generated; `status` is the HTTP status to answer with."""

    index: int
    message: str
    status: int = 500


Event = Delta | Finish | Failure


@dataclass
class Job:
    """One choice to generate. `post` is called from the worker thread with each Event."""

    index: int
    prompt_ids: list[int]
    params: JobParams
    post: Callable[[Event], None]
    client: str = ""
    cancelled: threading.Event = field(default_factory=threading.Event)

    def send(self, event: Event) -> None:
        """Hand `event` to the job's owner; an empty Delta is dropped, a vanished owner cancels the job."""
        if isinstance(event, Delta) and not event.text and not event.logprobs:
            return
        try:
            self.post(event)
        except Exception:  # noqa: BLE001 - e.g. the request's event loop is gone (server shutting down)
            self.cancelled.set()

    def fail(self, e: Exception) -> None:
        """A Failure (500) naming the exception that stopped this job."""
        self.send(Failure(self.index, f"generation failed: {type(e).__name__}: {e}"))


class QueueFull(Exception):
    """The engine cannot take more jobs now; retry after `retry_after` seconds. `status` is the HTTP
    status to answer with: 429 for a full queue, 503 when the server is shutting down."""

    def __init__(self, message: str, retry_after: int, status: int = 429) -> None:
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status
