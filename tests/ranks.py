"""Start gloo ranks for a test, with a deadline: `run_ranks(fn, args)` runs `fn(rank, port, *args)` in
two spawned processes and returns when both have exited cleanly.

`mp.spawn(join=True)` waits forever when a rank hangs (a collective that never completes, a connect
that never returns), and the test run with it. Here each rank dumps every thread's stack to a file
shortly before the deadline. A rank that fails fails the test at once with its traceback (its peers
are killed); a start that hangs is killed and, once, started again on a new port (after `before`,
which resets what the ranks write), with the stacks reported as a warning; a second hang fails the
test with the stacks."""

from __future__ import annotations

import faulthandler
import socket
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from multiprocessing.connection import wait
from pathlib import Path

import torch.multiprocessing as mp

GLOO_TIMEOUT = timedelta(seconds=90)  # a collective that waits longer raises in the rank


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_gloo(rank: int, port: int, world_size: int = 2) -> None:
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size, timeout=GLOO_TIMEOUT
    )


def _entry(rank: int, fn, port: int, args: tuple, report: str, dump_after_s: float) -> None:
    with open(report, "w", encoding="utf-8") as f:
        faulthandler.dump_traceback_later(dump_after_s, file=f)
        try:
            fn(rank, port, *args)
        except BaseException:
            f.write(traceback.format_exc())
            f.flush()
            raise
        finally:
            faulthandler.cancel_dump_traceback_later()


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace") if path.exists() else "(no report)"


def _attempt(fn, args: tuple, nprocs: int, timeout_s: float, tmp: Path) -> tuple[str, str]:
    """One start of the ranks: ("ok" | "failed" | "hung", what the ranks reported)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    reports = [tmp / f"rank{r}.txt" for r in range(nprocs)]
    procs = [
        ctx.Process(target=_entry, args=(r, fn, port, args, str(reports[r]), max(timeout_s - 20, 1)))
        for r in range(nprocs)
    ]
    try:
        for p in procs:
            p.start()
        deadline = time.monotonic() + timeout_s
        while any(p.exitcode is None for p in procs) and time.monotonic() < deadline:
            # a second at a time: a sentinel has been seen to stay silent after its rank exited (the
            # whole deadline went by in a test run), while the exit code was there to read
            wait(
                [p.sentinel for p in procs if p.exitcode is None],
                timeout=min(1.0, deadline - time.monotonic()),
            )
            if any(p.exitcode not in (None, 0) for p in procs):  # a rank failed: its peers may wait forever
                break
    finally:  # also when the test is interrupted: no rank outlives this call
        for p in procs:
            if p.is_alive():
                p.kill()
            p.join()
    codes = [p.exitcode for p in procs]
    printed = f"exit codes {codes}, port {port}\n" + "\n".join(
        f"--- rank {r}:\n{_read(reports[r])}" for r in range(nprocs)
    )
    if any(c not in (0, -9) for c in codes):  # -9: killed here, after a peer failed
        return "failed", printed
    return ("ok" if codes == [0] * nprocs else "hung"), printed


def run_ranks(fn, args: tuple = (), nprocs: int = 2, timeout_s: float = 120.0, before=None) -> None:
    """Run fn(rank, port, *args) on `nprocs` spawned ranks; `before()` runs before each start."""
    hung = []
    for attempt in (1, 2):
        if before is not None:
            before()
        with tempfile.TemporaryDirectory() as tmp:
            outcome, printed = _attempt(fn, args, nprocs, timeout_s, Path(tmp))
        if outcome == "failed":
            raise AssertionError(f"a rank failed\n{printed}")
        if outcome == "ok":
            if hung:
                warnings.warn(f"a start of {nprocs} ranks hung and was retried:\n{hung[0]}", stacklevel=2)
            return
        hung.append(f"attempt {attempt} did not finish in {timeout_s:.0f} s: {printed}")
    raise AssertionError("\n".join(hung))
