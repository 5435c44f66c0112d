"""Start gloo ranks for a test, with a deadline: `run_ranks(fn, args)` runs `fn(rank, port, *args)` in
two spawned processes and returns when both have exited cleanly.

`mp.spawn(join=True)` waits forever when a rank hangs (a collective that never completes, a connect
that never returns), and the test run with it. Here each rank dumps every thread's stack to a file
shortly before the deadline; a hung start is killed and, once, started again on a new port with the
stacks reported as a warning; a second hang, or a rank that fails, fails the test with what the ranks
printed."""

from __future__ import annotations

import faulthandler
import socket
import tempfile
import time
import traceback
import warnings
from datetime import timedelta
from pathlib import Path

import torch.multiprocessing as mp

GLOO_TIMEOUT = timedelta(seconds=120)  # a collective that waits longer than this raises in the rank


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


def _read(path: str) -> str:
    return Path(path).read_text(encoding="utf-8", errors="replace") if Path(path).exists() else "(no report)"


def run_ranks(fn, args: tuple = (), nprocs: int = 2, timeout_s: float = 300.0, attempts: int = 2) -> None:
    ctx = mp.get_context("spawn")
    hung = []
    for attempt in range(attempts):
        port = free_port()
        with tempfile.TemporaryDirectory() as tmp:
            reports = [str(Path(tmp, f"rank{r}.txt")) for r in range(nprocs)]
            procs = [
                ctx.Process(target=_entry, args=(r, fn, port, args, reports[r], timeout_s - 20), daemon=True)
                for r in range(nprocs)
            ]
            for p in procs:
                p.start()
            deadline = time.monotonic() + timeout_s
            for p in procs:
                p.join(max(0.0, deadline - time.monotonic()))
            alive = [p for p in procs if p.is_alive()]
            for p in alive:
                p.kill()
                p.join()
            printed = "\n".join(f"--- rank {r}:\n{_read(reports[r])}" for r in range(nprocs))
        if not alive:
            codes = [p.exitcode for p in procs]
            assert codes == [0] * nprocs, f"the ranks exited with {codes}\n{printed}"
            if hung:
                warnings.warn(f"a start of {nprocs} ranks hung and was retried:\n{hung[0]}", stacklevel=2)
            return
        hung.append(f"attempt {attempt + 1} on port {port} did not finish in {timeout_s:.0f} s\n{printed}")
    raise AssertionError("\n".join(hung))
