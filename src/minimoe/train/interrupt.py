"""Ctrl-C during training: the first one asks the loop to stop after the current step (with an
evaluation and a checkpoint, so the run resumes exactly); a second one stops at once."""

from __future__ import annotations

import contextlib
import signal


class Interrupt:
    """Turns the first Ctrl-C into a flag the loop checks after the current step."""

    def __init__(self) -> None:
        self.requested = False
        self._old = None

    def __enter__(self):
        with contextlib.suppress(ValueError):  # not the main thread
            self._old = signal.signal(signal.SIGINT, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested:  # second Ctrl-C: give up immediately
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        if self._old is not None:
            signal.signal(signal.SIGINT, self._old)
