"""The serving engine's waiting room: one bounded queue of jobs per client, taken in turn.

`submit` queues a request's jobs, all or none, within two caps (every client's jobs, and one
client's), or raises `QueueFull`. The engine's worker then takes jobs with `take`: clients in turn
(round-robin), skipping a client that already holds its share of the decode slots or of the prefill
rows (so a client's long prompts leave a row for others'), and with the first
job the jobs queued right after it that can share its prefill (a request's `n` choices of one
prompt), so that one prompt is prefilled once however many choices it has. Thread-safe: clients
submit from their own threads while the worker takes.
"""

from __future__ import annotations

import threading
from collections import Counter, OrderedDict, deque
from collections.abc import Callable

from minimoe.serve.jobs import Job, QueueFull


class Admission:
    """Per-client queues with a cap on all of them (`max_queued`) and on one client's
    (`max_queued_per_client`)."""

    def __init__(self, max_queued: int, max_queued_per_client: int) -> None:
        self.max_queued = max_queued
        self.max_queued_per_client = max_queued_per_client
        self._lock = threading.Lock()
        self._queues: OrderedDict[str, deque[Job]] = OrderedDict()  # client -> its waiting jobs
        self._queued = 0
        self._closed = False

    @property
    def queued(self) -> int:
        return self._queued

    def retry_after(self, slots: int) -> int:
        """Seconds until the queue has drained a slot's worth, roughly (one batch of waiting jobs)."""
        return 1 + self._queued // max(slots, 1)

    def submit(self, jobs: list[Job], free: int, slots: int) -> None:
        """Queue one request's jobs, all or none. `free` decode slots are idle: that many jobs more
        than the caps may come in, since they will not wait.

        Raises:
            QueueFull: 429 when a cap would be passed, 503 once `close` was called.
        """
        client = jobs[0].client
        with self._lock:
            self._refuse(client, len(jobs), free, slots)
            self._queues.setdefault(client, deque()).extend(jobs)
            self._queued += len(jobs)

    def check(self, client: str, count: int, free: int, slots: int) -> None:
        """Raise QueueFull now where `submit` would refuse `count` jobs of `client`: a request refused
        before its prompts are tokenized (`submit`, later, decides)."""
        with self._lock:
            self._refuse(client, count, free, slots)

    def _refuse(self, client: str, count: int, free: int, slots: int) -> None:
        if self._closed:
            raise QueueFull("The server is shutting down.", retry_after=5, status=503)
        mine = len(self._queues.get(client, ()))
        free = max(free, 0)
        if self._queued + count > self.max_queued + free:
            raise QueueFull(
                f"The server is busy: {self._queued} completions are waiting, the limit is "
                f"{self.max_queued}; retry later.",
                self.retry_after(slots),
            )
        if mine + count > self.max_queued_per_client + free:
            raise QueueFull(
                f"This request would pass this client's limit of {self.max_queued_per_client} waiting "
                f"completions ({mine} waiting now, {count} more asked for); retry later.",
                self.retry_after(slots),
            )

    def take(
        self,
        held: Counter[str],
        share: int,
        room: int,
        shares_prefill: Callable[[Job, Job], bool],
        rows_held: Counter[str] | None = None,
        row_share: int | None = None,
    ) -> list[Job]:
        """The next live jobs to admit: the first one of the first client in turn that holds fewer
        than `share` slots (`held`: slots per client) and fewer than `row_share` prefill rows
        (`rows_held`), then, while `room` slots and its share allow, the live jobs queued right after it
        for which `shares_prefill(first, job)`; [] when none is waiting. Cancelled jobs met on the way
        leave the queue."""
        with self._lock:
            for client in list(self._queues):
                if held[client] >= share or (row_share is not None and rows_held[client] >= row_share):
                    continue  # its jobs wait for one of its own sequences (or prompts) to end
                jobs = self._queues[client]
                first = self._pop_live(jobs)
                taken = [] if first is None else [first]
                while taken and jobs and len(taken) < min(room, share - held[client]):
                    job = jobs[0]
                    live = not job.cancelled.is_set()
                    if live and not shares_prefill(first, job):
                        break
                    jobs.popleft()
                    self._queued -= 1
                    if live:
                        taken.append(job)
                if jobs:
                    self._queues.move_to_end(client)  # round-robin: this client waits its turn
                else:
                    del self._queues[client]
                if taken:
                    return taken
        return []

    def _pop_live(self, jobs: deque[Job]) -> Job | None:
        """Pop jobs until a live one (returned; None if the queue runs out)."""
        while jobs:
            job = jobs.popleft()
            self._queued -= 1
            if not job.cancelled.is_set():
                return job
        return None

    def drop_cancelled(self) -> None:
        """Forget every cancelled job (a client that went away)."""
        with self._lock:
            for client in list(self._queues):
                jobs = self._queues[client]
                kept = deque(j for j in jobs if not j.cancelled.is_set())
                self._queued -= len(jobs) - len(kept)
                if kept:
                    self._queues[client] = kept
                else:
                    del self._queues[client]

    def close(self) -> list[Job]:
        """Refuse every later submit (503) and hand back the jobs still waiting."""
        with self._lock:
            self._closed = True
            jobs = [job for q in self._queues.values() for job in q]
            self._queues.clear()
            self._queued = 0
        return jobs
