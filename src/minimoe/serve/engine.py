"""One worker thread owns the model; requests reach it through a queue.

Every choice of every request is a `Job`: a prompt, sampling parameters and a callback that the
worker calls with `Delta`, `Finish` or `Failure` events. The worker keeps the admitted jobs in a
list and advances them round-robin, one token each per turn, so concurrent (streaming) requests
progress together and a short request is not stuck behind a long one. Each job has its own
`generate_tokens` iterator, hence its own KV cache; the model itself is only ever called from the
worker thread, so requests cannot corrupt one another. (Jobs are not batched into one forward:
each token is a batch-1 step.)

`TextStream` turns a job's tokens into text deltas: it holds back an incomplete UTF-8 character
and any tail that could be the start of a stop string, and cuts the text where a stop string
begins, so the streamed deltas always add up to the final, trimmed text.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from minimoe.infer.generate import generate_tokens


@dataclass(frozen=True)
class JobParams:
    """What one choice is generated with (already validated)."""

    max_tokens: int
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()


@dataclass(frozen=True)
class Delta:
    """New text for choice `index`."""

    index: int
    text: str


@dataclass(frozen=True)
class Finish:
    """Choice `index` is done: `reason` is "stop" (EOS or a stop string) or "length"."""

    index: int
    reason: str
    completion_tokens: int
    text: str


@dataclass(frozen=True)
class Failure:
    """Generating choice `index` raised; the message says what."""

    index: int
    message: str


Event = Delta | Finish | Failure


@dataclass
class Job:
    """One choice to generate. `post` is called from the worker thread with each Event."""

    index: int
    prompt_ids: list[int]
    params: JobParams
    post: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)


def partial_stop_len(text: str, stops: Sequence[str]) -> int:
    """Length of the longest tail of `text` that is a proper prefix of some stop string."""
    best = 0
    for s in stops:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class TextStream:
    """Incremental detokenization with stop strings, for one choice.

    The whole token list is decoded each time (not just the new token): tokenizers such as
    SentencePiece's only give the right spaces in context. Fine for the sequence lengths served here.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()) -> None:
        self._decode = decode
        self.stop = tuple(s for s in stop if s)
        self._longest = max((len(s) for s in self.stop), default=0)
        self.ids: list[int] = []
        self.text = ""  # the text so far (final once `stopped` or after `flush`)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def push(self, token: int) -> str:
        """Add a token; return the text that is now safe to send (maybe ""). No-op once stopped."""
        if self.stopped:
            return ""
        self.ids.append(token)
        self.text = self._decode(self.ids)
        if self.stop:
            # a match cannot start inside text already sent (its start was held back), but look a
            # little earlier anyway in case decoding changed the tail
            start = max(0, self.sent - self._longest)
            hits = [i for s in self.stop if (i := self.text.find(s, start)) >= 0]
            if hits:
                self.stopped = True
                self.text = self.text[: max(min(hits), self.sent)]
                return self._take(len(self.text))
        # U+FFFD at the end is usually the first bytes of a character still being generated
        stable = len(self.text.rstrip("\ufffd"))
        return self._take(stable - partial_stop_len(self.text[:stable], self.stop))

    def flush(self) -> str:
        """The generation ended: return everything not sent yet."""
        return self._take(len(self.text))

    def _take(self, end: int) -> str:
        if end <= self.sent:
            return ""
        out, self.sent = self.text[self.sent : end], end
        return out


@dataclass
class _Running:
    job: Job
    tokens: Iterator[int]
    stream: TextStream
    count: int = 0


class Engine:
    """The model's single worker thread.

    Args:
        model: a Transformer in eval mode (only this thread calls it).
        tokenizer: the run's Tokenizer (decode, eos_id).
        max_active: jobs generated at the same time; more wait in the queue (each holds a KV cache).
    """

    def __init__(self, model, tokenizer, max_active: int = 64) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.max_active = max_active
        self._queue: queue.Queue[Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self.generated_tokens = 0  # since start, over all jobs (written by the worker only)
        self.active_jobs = 0

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="minimoe-engine", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Stop the worker after its current step; unfinished jobs get no further events."""
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join()
            self._thread = None

    def submit(self, job: Job) -> None:
        """Queue a job (thread-safe); jobs submitted before `start` wait for it."""
        self._queue.put(job)

    def _loop(self) -> None:
        active: list[_Running] = []
        with torch.no_grad():
            while True:
                # block while idle, otherwise admit whatever arrived without waiting
                while len(active) < self.max_active:
                    try:
                        job = self._queue.get(block=not active)
                    except queue.Empty:
                        break
                    if job is None:
                        return
                    run = self._begin(job)
                    if run is not None:
                        active.append(run)
                active = [run for run in active if self._step(run)]
                self.active_jobs = len(active)

    def _begin(self, job: Job) -> _Running | None:
        if job.cancelled.is_set():
            return None
        if job.params.max_tokens == 0:
            _post(job, Finish(job.index, "length", 0, ""))
            return None
        p = job.params
        tokens = generate_tokens(
            self.model,
            job.prompt_ids,
            p.max_tokens,
            p.temperature,
            p.top_k,
            p.top_p,
            p.seed,
            (self.tokenizer.eos_id,),
        )
        return _Running(job, tokens, TextStream(self.tokenizer.decode, p.stop))

    def _step(self, run: _Running) -> bool:
        """Advance one job by one token; False once it is finished (or failed, or cancelled)."""
        job = run.job
        if job.cancelled.is_set():
            run.tokens.close()
            return False
        try:
            token = next(run.tokens)
        except StopIteration:  # EOS, or the generator ran out of context
            _post(job, Delta(job.index, run.stream.flush()))
            reason = "length" if run.count >= job.params.max_tokens else "stop"
            _post(job, Finish(job.index, reason, run.count, run.stream.text))
            return False
        except Exception as e:  # noqa: BLE001 - one request failing must not stop the worker
            _post(job, Failure(job.index, f"{type(e).__name__}: {e}"))
            return False
        run.count += 1
        self.generated_tokens += 1
        _post(job, Delta(job.index, run.stream.push(token)))
        if run.stream.stopped or run.count >= job.params.max_tokens:
            # finish now: another next() would run one more forward pass for nothing
            run.tokens.close()
            _post(job, Delta(job.index, run.stream.flush()))
            reason = "stop" if run.stream.stopped else "length"
            _post(job, Finish(job.index, reason, run.count, run.stream.text))
            return False
        return True


def _post(job: Job, event: Event) -> None:
    """Hand an event to the job's owner; empty deltas are dropped, a vanished owner cancels the job."""
    if isinstance(event, Delta) and not event.text:
        return
    try:
        job.post(event)
    except Exception:  # noqa: BLE001 - e.g. the request's event loop is gone (server shutting down)
        job.cancelled.set()
