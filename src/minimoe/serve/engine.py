"""The serving engine: one worker thread owns the model and batches every client's sequences.

Every choice of every request is a `Job`: a prompt, sampling parameters, the client it came from and
a callback that the worker calls with `Delta`, `Finish` or `Failure` events. Each step the worker
1. drops cancelled jobs (a client that went away) from the queue, the prefill and the batch;
2. admits waiting jobs (`minimoe.serve.admission`) and prefills their prompts, several in one forward
   (`minimoe.infer.slots.Prefill`), `prefill_chunk` token positions per step at most, so a long prompt
   delays the running sequences by one chunk per step rather than by its whole length; the choices of
   one prompt (a request's `n`) share one prefill, and each joins the batch with a copy of its cache;
3. advances every running sequence by one token in one forward pass over the slot pool
   (`minimoe.infer.slots`): continuous batching, where sequences join after their prefill and leave
   as soon as they finish, with no waiting for the batch to drain.
Sampling parameters, seeds and stop strings stay per sequence, so a sequence generates what it
would alone. A job that asks for logprobs gets each token's from the logits that chose it, and its
prompt's tokens' from the prefill's when it asks for those too.

With `speculative`, step 3 is self-speculative (`minimoe.serve.speculative_step`).

Admission is bounded: at most `max_queued` jobs wait (`max_queued_per_client` from one client); a
submit beyond that raises `QueueFull`. Waiting jobs take free slots round-robin over clients, and one
client holds at most `max_active_per_client` slots (by default all but an eighth), so neither a burst
of requests nor one request with a large `n` makes another client wait for a whole generation.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections import Counter, deque
from collections.abc import Callable
from concurrent.futures import Future

import torch

from minimoe.errors import MinimoeError
from minimoe.infer.common import decode_threads, fit_prompt, make_generator, release_openmp_threads
from minimoe.infer.sampling import SamplingParams
from minimoe.infer.slots import Prefill, SlotPool
from minimoe.infer.speculative import next_drafts
from minimoe.infer.static import StaticDecode
from minimoe.infer.text import TextStream
from minimoe.serve.admission import Admission
from minimoe.serve.jobs import Delta, Event, Failure, Finish, Job, JobParams, Logprob, QueueFull
from minimoe.serve.limits import Limits
from minimoe.serve.logprobs import prompt_entries, row_logprobs
from minimoe.serve.rows import pick, quarantine
from minimoe.serve.sequence import Seq
from minimoe.serve.speculative_step import SpeculativeStep

log = logging.getLogger("uvicorn.error")  # the server's log (uvicorn's, as `minimoe.serve.http` uses)
DEGRADED_AFTER = 3  # steps failing in a row before /health says "degraded"

__all__ = ["Delta", "Engine", "Event", "Failure", "Finish", "Job", "JobParams", "Logprob", "QueueFull"]


class Engine(SpeculativeStep):
    """The model's single worker thread.

    Args:
        model: a Transformer in eval mode (only the worker calls it).
        tokenizer: the run's Tokenizer (decode, eos_id).
        max_active: cache slots: sequences decoded at once (each holds a context-sized cache row).
        prefill_rows: prompts prefilled at once, at most (each holds a context-sized cache row too;
            no more than max_active or prefill_chunk are allocated).
        max_queued: jobs that may wait for a slot; more are refused with QueueFull.
        max_queued_per_client: of those, the most from one client (default: half of max_queued).
        max_active_per_client: slots one client may hold at once (default: max_active less an
            eighth of it, kept for other clients).
        prefill_chunk: prompt token positions prefilled per step at most (padding included).
        speculative: decode self-speculatively with the model's first MTP module (see above).
        compile: decode with the fixed-shape step compiled by torch.compile
            (`minimoe.infer.static.StaticDecode`; the first step compiles, or call `warm_up`).
    """

    def __init__(
        self,
        model,
        tokenizer,
        max_active: int = 64,
        max_queued: int = 256,
        max_queued_per_client: int | None = None,
        prefill_chunk: int = 256,
        speculative: bool = False,
        compile: bool = False,
        prefill_rows: int = 8,
        max_active_per_client: int | None = None,
    ) -> None:
        if speculative and not len(model.mtp):
            raise MinimoeError(
                "speculative decoding needs a model trained with MTP modules (model.mtp_depth >= 1)"
            )
        self.model = model
        self.tokenizer = tokenizer
        self.speculative = speculative
        # more prefill rows than decode slots or than positions per step could never all be used
        rows = max(1, min(prefill_rows, max_active, prefill_chunk))
        self.row_share = rows - rows // 4  # prefill rows one client may hold: a quarter kept for others
        self.pool = SlotPool(model, max_active, mtp=speculative, prefill_rows=rows)
        self.static = StaticDecode(self.pool) if compile else None
        self.admission = Admission(max_queued, max_queued_per_client or max(1, max_queued // 2))
        self.max_active_per_client = min(max_active_per_client or max_active - max_active // 8, max_active)
        self.prefill_chunk = prefill_chunk
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._tasks: deque[tuple[Callable[[], float], Future]] = deque()  # run by the worker before a step
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._running: list[Seq] = []  # row i of the pool is _running[i]
        self._prefill = Prefill(self.pool)
        self._prefilling: dict[int, list[Seq]] = {}  # prefill row -> the sequences of its prompt
        self.generated_tokens = 0  # since start, over all jobs (written by the worker only)
        self.failed_steps = 0  # steps in which an error was caught (each logged with its traceback) ...
        self.failing_steps = 0  # ... and how many of them in a row, up to the last step
        self._step_errors = 0
        self.steps = 0
        self.drafted = 0  # speculative: drafts verified ...
        self.accepted = 0  # ... and accepted

    @classmethod
    def from_limits(cls, model, tokenizer, limits: Limits, **kwargs) -> Engine:
        """An engine sized by the server's limits (`minimoe serve`'s flags); kwargs as __init__."""
        return cls(
            model, tokenizer, limits.max_active, limits.max_queued, limits.max_queued_per_client,
            limits.prefill_chunk, max_active_per_client=limits.max_active_per_client, **kwargs,
        )  # fmt: skip

    # ------------------------------------------------------------------ outside the worker

    @property
    def active_jobs(self) -> int:
        return len(self._running) + sum(map(len, self._prefilling.values()))

    @property
    def queued_jobs(self) -> int:
        return self.admission.queued

    @property
    def degraded(self) -> bool:
        """Whether the last DEGRADED_AFTER steps or more each failed (each error is in the log)."""
        return self.failing_steps >= DEGRADED_AFTER

    def start(self) -> None:
        """Start the worker thread. The calling thread's idle OpenMP workers are let go first
        (`release_openmp_threads`): from here on the worker runs the tensor work, and a parked pool
        of the caller's would slow the worker's multi-threaded steps."""
        if self._thread is None:
            release_openmp_threads()
            self._thread = threading.Thread(target=self._loop, name="minimoe-engine", daemon=True)
            self._thread.start()

    def warm_up(self) -> float:
        """Compile the decode step now (with compile=True) rather than at the first request; seconds.
        It runs on the worker thread, started here if it is not running: that thread decodes with the
        compiled step, and on CUDA the graphs it replays are recorded per thread."""
        if self.static is None:
            return 0.0
        done: Future[float] = Future()
        with self._lock:  # the worker fails what is queued here when it stops, under the same lock
            if self._stopping:
                raise MinimoeError("the engine has been shut down")
            self._tasks.append((self.static.warm_up, done))
        self.start()
        self._wake.set()
        return done.result()

    def shutdown(self) -> None:
        """Stop taking jobs; the worker fails every queued and running job (503) at its next step and
        exits. Safe to call from a signal handler (it only sets flags)."""
        self._stopping = True
        self._wake.set()

    def close(self, timeout: float = 5.0) -> None:
        """shutdown(), then wait for the worker (at most `timeout` seconds)."""
        self.shutdown()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def submit(self, jobs: list[Job]) -> None:
        """Queue the jobs of one request, all or none (thread-safe); QueueFull where the queue, or this
        client's share of it, cannot take them all."""
        if jobs:
            self.check_room(jobs[0].client, 0)
            self.admission.submit(jobs, self.pool.slots - self.active_jobs, self.pool.slots)
            self._wake.set()

    def check_room(self, client: str, count: int) -> None:
        """Raise QueueFull now where `count` jobs of `client` would be refused (`submit` decides)."""
        if self._stopping:
            raise QueueFull("The server is shutting down.", retry_after=5, status=503)
        self.admission.check(client, count, self.pool.slots - self.active_jobs, self.pool.slots)

    # ------------------------------------------------------------------ the worker

    def _loop(self) -> None:
        try:
            with torch.no_grad():
                while not self._stopping:
                    self._wake.clear()
                    while self._tasks:
                        fn, done = self._tasks.popleft()
                        try:
                            done.set_result(fn())
                        except Exception as e:  # noqa: BLE001 - raised in the thread that asked
                            done.set_exception(e)
                    if not self._running and not self._prefilling and not self.queued_jobs:
                        self._wake.wait(0.5)
                        continue
                    self._step_errors = 0
                    try:
                        self._step()
                    except Exception:  # noqa: BLE001 - a bug must not leave later requests hanging
                        self._fail_current(self._caught("an engine step"), 500)
                        self._reset()
                    self.failed_steps += self._step_errors > 0
                    self.failing_steps = self.failing_steps + 1 if self._step_errors else 0
        finally:
            self._fail_all("The server is shutting down; the request was not completed.", 503)
            with self._lock:
                while self._tasks:
                    self._tasks.popleft()[1].set_exception(MinimoeError("the engine has been shut down"))

    def _step(self) -> None:
        self._drop_cancelled()
        self._admit()
        if self._prefilling and not self._stopping:
            self._prefill_step()
        if self._running and not self._stopping:
            self._decode_speculative() if self.speculative else self._decode()
        self.steps += 1

    def _admit(self) -> None:
        """Waiting jobs (clients in turn, each within its share of the slots) take free prefill rows
        while decode slots remain for them; the choices of one prompt take one row together."""
        held = Counter(s.job.client for s in self._running)
        held.update(s.job.client for group in self._prefilling.values() for s in group)
        rows = Counter(group[0].job.client for group in self._prefilling.values())
        while self._prefill.free and (room := self.pool.slots - self.active_jobs) > 0:
            jobs = self.admission.take(
                held, self.max_active_per_client, room, _shares_prefill, rows, self.row_share
            )
            if not jobs:
                return
            live = []
            for job in jobs:
                p = job.params
                if p.max_tokens == 0 and not p.scores_prompt:  # done here: holds no slot
                    job.send(Finish(job.index, "length", 0, "", None if p.logprobs is None else ()))
                else:
                    live.append(job)
            if not live:
                continue
            try:
                ids = fit_prompt(live[0].prompt_ids, self.pool.max_len)  # the same for every one of them
                group = [self._new_seq(job, len(ids)) for job in live]
                self._prefilling[self._prefill.add(ids, live[0].params.prompt_score)] = group
            except Exception as e:  # noqa: BLE001 - these jobs cannot start; the queue's others can
                self._caught("admitting a prompt")
                for job in live:
                    job.fail(e)
                continue
            held.update(job.client for job in live)
            rows[live[0].client] += 1

    def _new_seq(self, job: Job, prompt_len: int) -> Seq:
        p = job.params
        sampling = SamplingParams(p.temperature, p.top_k, p.top_p)
        gen = None if sampling.greedy else make_generator(p.seed, self.pool.cache.layers[0].a.device)
        stream = TextStream(self.tokenizer.decode, p.stop, context=job.prompt_ids)  # continues the prompt
        return Seq(job, stream, sampling, gen, prompt_len)

    def _prefill_step(self) -> None:
        """One prefill forward over every prefilling prompt; each sequence of a complete one picks its
        first token and joins the decode batch."""
        try:
            finished = self._prefill.step(self.prefill_chunk)
            rows = sorted(finished)
            joining = [(row, seq) for row in rows for seq in self._prefilling[row]]
            seqs = [seq for _, seq in joining]
            logits = torch.cat([finished[row] for row, _ in joining]) if joining else None
            broken = quarantine(logits, seqs) if joining else frozenset()
            tokens = pick(logits, seqs) if joining else []
            infos = self._logprobs(logits, [[t] for t in tokens], seqs) if joining else []
        except Exception:  # noqa: BLE001 - the prefill failed; its prompts cannot continue
            self._fail_prefill(self._caught("a prefill step"), 500)
            return
        ready, entries = [], {}  # entries: row -> its prompt's (entries, shift), made once for its choices
        for i, ((row, seq), token, info) in enumerate(zip(joining, tokens, infos)):
            if i in broken:
                continue
            try:
                if seq.job.params.scores_prompt:
                    self._score_prompt(seq, row, entries)
                if seq.job.params.max_tokens == 0:
                    seq.finish("length")
                elif not self._emit(seq, token, info[0]):
                    ready.append((row, seq))
            except Exception as e:  # noqa: BLE001 - this sequence cannot continue; the others can
                self._caught("a sequence's first token")
                seq.job.fail(e)
        self._join(ready)
        for row in rows:
            del self._prefilling[row]
            self._prefill.release(row)

    def _join(self, ready: list[tuple[int, Seq]]) -> None:
        """Copy each (prefill row, sequence) into a decode slot. Speculative, a sequence's first draft
        is written into its row's MTP entry at the prompt's last position (it depends on the sequence's
        first token) before the row is copied, so the sequences of one row join one per wave."""
        while ready:
            wave, later, rows = [], [], set()
            for row, seq in ready:
                (later if row in rows else wave).append((row, seq))
                rows.add(row)
            ready = later
            try:
                if self.speculative:
                    drafts = self._prefill.first_draft([r for r, _ in wave], [s.next_token for _, s in wave])
                    broken = quarantine(drafts, [seq for _, seq in wave])
                    next_drafts(drafts, [seq for _, seq in wave])
                    wave = [pair for i, pair in enumerate(wave) if i not in broken]
            except Exception as e:  # noqa: BLE001 - this wave cannot continue; the others can
                self._caught("a first draft")
                for _, seq in wave:
                    seq.job.fail(e)
                continue
            for row, seq in wave:
                try:
                    self.pool.add(seq.prompt_len, src=row)
                    self._running.append(seq)
                except Exception as e:  # noqa: BLE001 - this sequence cannot continue; the others can
                    self._caught("a sequence joining the batch")
                    seq.job.fail(e)

    def _score_prompt(self, seq: Seq, row: int, made: dict[int, tuple]) -> None:
        """Give the sequence its prompt's entries (posted at once) before its first token's; `made`
        keeps each row's entries for the other choices that share its prompt."""
        if row not in made:
            made[row] = prompt_entries(
                self.tokenizer.decode, self._prefill.ids[row], self._prefill.scores(row)
            )
        entries, seq.shift = made[row]
        seq.logprobs += () if seq.job.params.streamed else tuple(entries)
        seq.job.send(Delta(seq.job.index, "", tuple(entries)))

    def _decode(self) -> None:
        device = self.pool.cache.layers[0].a.device
        tokens = torch.tensor([s.next_token for s in self._running], device=device)
        try:
            # one step, not held between steps (the compiled step sets its own count inside: StaticDecode)
            with decode_threads(self.model, len(self._running)):
                logits = (self.static or self.pool).decode(tokens)
            broken = quarantine(logits, self._running)
            picked = pick(logits, self._running)
            infos = self._logprobs(logits, [[t] for t in picked], self._running)
        except Exception:  # noqa: BLE001 - the batch failed; its sequences cannot continue
            self._fail_running(self._caught("a decode step"), 500)
            return
        seqs = zip(self._running, picked, infos)
        done = [i for i, (seq, tok, info) in enumerate(seqs) if i in broken or self._emit(seq, tok, info[0])]
        for i in reversed(done):
            self._remove(i)

    def _emit(self, seq: Seq, token: int, logprob: tuple | None = None) -> bool:
        """Hand `token` (with its `_logprobs` entry, if asked) to its sequence; True when the sequence is
        finished or failed (and told so): an error in one sequence's text fails it, not the batch."""
        try:
            before = seq.count
            done = seq.push(token, logprob, self.tokenizer.eos_id, self.pool.max_len)
            self.generated_tokens += seq.count - before
            return done
        except Exception as e:  # noqa: BLE001 - this sequence cannot continue; the others can
            self._caught("a sequence's token")
            seq.job.fail(e)
            return True

    @staticmethod
    def _logprobs(logits: torch.Tensor, new: list[list[int]], seqs: list[Seq]) -> list[list]:
        return row_logprobs(logits, new, [s.job.params.logprobs for s in seqs])

    def _remove(self, row: int) -> None:
        self.pool.remove(row)
        last = self._running.pop()
        if row < len(self._running):
            self._running[row] = last

    def _drop_cancelled(self) -> None:
        for i in reversed(range(len(self._running))):
            if self._running[i].job.cancelled.is_set():
                self._remove(i)
        for row, group in list(self._prefilling.items()):
            group[:] = [seq for seq in group if not seq.job.cancelled.is_set()]
            if not group:
                del self._prefilling[row]
                self._prefill.release(row)
        self.admission.drop_cancelled()

    def _fail_prefill(self, message: str, status: int) -> None:
        """Fail the prefilling prompts; their rows are freed by a new Prefill (the failed step may have
        left the old one's bookkeeping half-updated)."""
        prefilling, self._prefilling = self._prefilling, {}
        self._prefill = Prefill(self.pool)
        for group in prefilling.values():
            for seq in group:
                seq.job.send(Failure(seq.job.index, message, status))

    def _fail_running(self, message: str, status: int) -> None:
        """Fail the running sequences and empty the pool."""
        running, self._running = self._running, []
        self.pool.lengths = []
        for seq in running:
            seq.job.send(Failure(seq.job.index, message, status))

    def _caught(self, what: str) -> str:
        """Log the exception being handled, with its traceback, and count it against this step; the
        message its jobs fail with."""
        e = sys.exc_info()[1]
        log.exception("engine: %s failed", what)
        self._step_errors += 1
        return f"generation failed: {type(e).__name__}: {e}"

    def _reset(self) -> None:
        """After a step failed at an unknown point (its sequences failed): the state the next steps rely
        on is rebuilt empty, not trusted."""
        self._running, self._prefilling = [], {}
        self.pool.lengths = []
        self._prefill = Prefill(self.pool)

    def _fail_current(self, message: str, status: int) -> None:
        """Fail the running sequences and the prefilling ones (the queue stays)."""
        self._fail_running(message, status)
        self._fail_prefill(message, status)

    def _fail_all(self, message: str, status: int) -> None:
        jobs = self.admission.close()
        self._fail_current(message, status)
        for job in jobs:
            job.send(Failure(job.index, message, status))


def _shares_prefill(first: Job, job: Job) -> bool:
    """Whether `job` can take `first`'s prefill: the same prompt, scored for the same alternatives."""
    return job.prompt_ids == first.prompt_ids and job.params.prompt_score == first.params.prompt_score
