"""The server's limits, in one record (no web framework needed to read it: the CLI builds it)."""

from __future__ import annotations

from dataclasses import dataclass, fields

from minimoe.errors import MinimoeError


@dataclass(frozen=True)
class Limits:
    """What one server, one request and one client may use. Every field is a `minimoe serve` flag
    (`max_active` is `--max-active`, and so on).

    Attributes:
        max_active: cache slots: sequences decoded at once, each with a context-sized cache row
            allocated at start-up.
        max_queued: choices waiting for a slot; a request that would go past it gets 429.
        max_queued_per_client: of those, the most from one client address (default: half).
        max_active_per_client: of the cache slots, the most one client address holds at once
            (default: all but an eighth, which stay free for other clients).
        max_choices: prompts x n in one request; more is a 400.
        max_request_tokens: prompt plus completion tokens, summed over a request's choices; more is
            a 400.
        max_tokens: the most completion tokens one choice may ask for (and chat's default cap).
        max_prompt_tokens: the longest prompt; None = whatever fits the context.
        max_body_bytes: larger request bodies get a 413.
        header_timeout: seconds a connection may take to send a complete request head.
        body_timeout: seconds a request may take to send its body (then 408).
        write_timeout: seconds a client may read nothing of its answer while the server waits to write
            it; then its connection is closed (and its request cancelled).
        prefill_chunk: prompt tokens prefilled per engine step, between decode steps.
    """

    max_active: int = 64
    max_queued: int = 256
    max_queued_per_client: int | None = None
    max_active_per_client: int | None = None
    max_choices: int = 64
    max_request_tokens: int = 1 << 17
    max_tokens: int = 4096
    max_prompt_tokens: int | None = None
    max_body_bytes: int = 1 << 20
    header_timeout: float = 10.0
    body_timeout: float = 30.0
    write_timeout: float = 60.0
    prefill_chunk: int = 256

    def validate(self) -> Limits:
        """MinimoeError naming the first limit that is not positive (as its flag)."""
        for f in fields(self):
            value = getattr(self, f.name)
            if value is not None and not value > 0:  # `not >`: NaN is refused too
                bound = "> 0" if isinstance(value, float) else ">= 1"
                raise MinimoeError(f"--{f.name.replace('_', '-')} must be {bound}, got {value}")
        return self
