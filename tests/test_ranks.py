"""The test harness that starts gloo ranks (tests/ranks.py): a failing rank fails the test at once
with its traceback, and a hung start is retried once and then fails with every rank's stack, instead
of holding the test run."""

from __future__ import annotations

import time

import pytest
import torch.distributed as dist
from ranks import init_gloo, run_ranks


def _one_fails(rank: int, port: int) -> None:
    init_gloo(rank, port)
    if rank == 1:
        raise ValueError("rank 1 planted failure")
    dist.barrier()  # rank 0 would wait here for the 90 s gloo timeout


def _one_hangs(rank: int, port: int) -> None:
    if rank == 1:
        time.sleep(3600)


def test_a_failing_rank_fails_the_test_at_once():
    t0 = time.monotonic()
    with pytest.raises(AssertionError, match="rank 1 planted failure"):
        run_ranks(_one_fails, timeout_s=120)
    assert time.monotonic() - t0 < 60  # not the deadline, nor gloo's timeout


def test_a_hung_start_is_retried_once_then_fails_with_the_stacks():
    starts = []
    with pytest.raises(AssertionError) as e:
        run_ranks(_one_hangs, timeout_s=8, before=lambda: starts.append(1))  # the hang is dumped 1 s in
    assert len(starts) == 2
    text = str(e.value)
    assert "attempt 1 did not finish" in text and "attempt 2 did not finish" in text
    assert "_one_hangs" in text  # the hung rank's stack, dumped before the deadline
