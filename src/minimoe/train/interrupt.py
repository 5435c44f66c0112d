"""Ctrl-C or SIGTERM during training: the first one asks the loop to stop after the current step (with
an evaluation and a checkpoint, so the run resumes exactly); a second one stops at once. SIGTERM is what
a batch scheduler (Slurm, Kubernetes) or torchrun sends before it kills a job, so a job stopped that way
keeps its last steps too."""

from __future__ import annotations

import contextlib
import signal

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Interrupt:
    """Turns the first SIGINT or SIGTERM into a flag the loop checks after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old: dict[int, object] = {}

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread
            for sig in SIGNALS:
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # the second signal: give up immediately
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            if old is not None:  # None: a handler installed outside Python, which cannot be put back
                signal.signal(sig, old)
