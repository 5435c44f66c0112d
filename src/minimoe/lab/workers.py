"""Stop signals for a sweep's worker processes (`minimoe compare --jobs N`): a Ctrl-C or SIGTERM
reaches each worker once, while it trains, so that every running trainer saves a checkpoint and returns
(as one run in this process does) and the sweep stops instead of training on."""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import signal


def worker_signals() -> None:
    """Initializer of a sweep's worker process: out of the terminal's process group (a Ctrl-C reaches
    the workers once, forwarded by the sweep) and deaf to stop signals while idle (the trainer listens
    while it trains); an idle worker killed by one would break the pool and kill the others."""
    if hasattr(os, "setpgrp"):
        os.setpgrp()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)


@contextlib.contextmanager
def signals_to_workers(stop: list[int]):
    """While the sweep's workers train: a Ctrl-C or SIGTERM goes on to them (each trainer saves a
    checkpoint and returns) and is noted in `stop`; a second one also stops this process at once."""

    def forward(signum, frame) -> None:
        for p in multiprocessing.active_children():
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, signum)
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)

    old = {}
    with contextlib.suppress(ValueError):  # not the main thread: signals stay as they are
        for sig in (signal.SIGINT, signal.SIGTERM):
            old[sig] = signal.signal(sig, forward)
    try:
        yield
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
