"""Batches of token windows read straight from the memory-mapped shards.

`TokenWindows` samples random windows of seq_len + 1 tokens for training. Batch `step` is a pure
function of (seed, step): a numpy Generator seeded with [seed, step] draws the global batch of
batch_size * world_size window starts and rank r keeps the r-th slice. So resuming needs only the
step counter, any rank reads a disjoint slice of the same global batch, and changing the number of
ranks keeps the global stream when batch_size * world_size stays the same.

`EvalWindows` covers a split with fixed, non-overlapping windows (every token is a target once),
optionally thinned evenly to `max_batches`; it yields the same batches every time it is iterated.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from minimoe.data.prepare import PreparedData
from minimoe.errors import MinimoeError


def _open(
    prepared: PreparedData | str | Path, split: str, seq_len: int
) -> tuple[PreparedData, list[np.memmap]]:
    data = prepared if isinstance(prepared, PreparedData) else PreparedData.load(prepared)
    if split not in data.meta["splits"]:
        raise MinimoeError(f"split must be 'train' or 'val', got {split!r}")
    if seq_len <= 0:
        raise MinimoeError(f"seq_len must be positive, got {seq_len}")
    n = data.num_tokens(split)
    if n == 0 and split == "val":
        raise MinimoeError(
            f"{data.dir} has no validation split; prepare it with val_fraction > 0 or a validation source"
        )
    maps = data.memmaps(split)
    # Windows never cross a shard boundary, so a window must fit inside one shard.
    if not any(len(m) >= seq_len + 1 for m in maps):
        fix = "more text, a validation file" if split == "val" else "more text"
        raise MinimoeError(
            f"{data.describe_split(split)} has {n} tokens, fewer than one window of seq_len+1 = "
            f"{seq_len + 1}; give {fix} or a smaller train.seq_len"
        )
    return data, maps


def _to_xy(buf: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """[B, T+1] ids -> contiguous int64 inputs and next-token targets, each [B, T]."""
    t = torch.from_numpy(buf)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


class TokenWindows:
    """An endless, resumable stream of random training batches.

    Args:
        prepared: a PreparedData or a prepared folder.
        split: "train" or "val".
        seq_len: tokens per input row (T); each window holds T + 1 tokens.
        batch_size: rows per batch on this rank (B).
        seed: the stream's seed (>= 0).
        rank, world_size: this rank's slice of each global batch of B * world_size windows.

    Iterating yields `(x, y)`: int64 CPU tensors [B, T], y shifted one token ahead of x.
    """

    def __init__(
        self,
        prepared: PreparedData | str | Path,
        split: str = "train",
        seq_len: int = 256,
        batch_size: int = 16,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise MinimoeError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise MinimoeError(f"seed must be >= 0, got {seed}")
        if not 0 <= rank < world_size:
            raise MinimoeError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        self.data, self._maps = _open(prepared, split, seq_len)
        self.split, self.seq_len, self.batch_size = split, seq_len, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.step = 0
        # valid start positions per shard, laid end to end: global index u -> (shard, offset)
        self._starts = np.array([max(len(m) - seq_len, 0) for m in self._maps], dtype=np.int64)
        self._cum = np.cumsum(self._starts)

    def batch_at(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch this rank gets at `step` (does not move the stream)."""
        B, T = self.batch_size, self.seq_len
        rng = np.random.default_rng([self.seed, step])
        u = rng.integers(0, self._cum[-1], size=B * self.world_size)[self.rank * B : (self.rank + 1) * B]
        shard = np.searchsorted(self._cum, u, side="right")
        offset = u - (self._cum[shard] - self._starts[shard])
        buf = np.empty((B, T + 1), dtype=np.int64)
        for i, (s, o) in enumerate(zip(shard.tolist(), offset.tolist())):
            buf[i] = self._maps[s][o : o + T + 1]
        return _to_xy(buf)

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; advances the step counter."""
        xy = self.batch_at(self.step)
        self.step += 1
        return xy

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        return self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position to resume from (the other fields are informational)."""
        return {
            "seed": self.seed,
            "step": self.step,
            "split": self.split,
            "seq_len": self.seq_len,
            "batch_size": self.batch_size,
            "world_size": self.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Resume: the next batch is the one that followed when `state` was saved."""
        self.seed = int(state["seed"])
        self.step = int(state["step"])


class EvalWindows:
    """Fixed evaluation batches covering a split with non-overlapping windows.

    Window k of a shard starts at k * seq_len, so consecutive windows share one token and every
    token after the first is a target exactly once; a shard's last partial window is dropped.

    Args:
        prepared: a PreparedData or a prepared folder.
        split: usually "val".
        seq_len, batch_size: as for TokenWindows (the last batch may be smaller).
        max_batches: keep at most this many batches per rank, windows spread evenly over the split.
        rank, world_size: rank r takes every world_size-th window; all ranks get the same number
            of windows, so the same number of forward passes (needed under FSDP).

    Attributes:
        num_windows: windows this rank evaluates.
        num_targets: target tokens this rank evaluates (num_windows * seq_len).
    """

    def __init__(
        self,
        prepared: PreparedData | str | Path,
        split: str = "val",
        seq_len: int = 256,
        batch_size: int = 16,
        max_batches: int | None = None,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if batch_size <= 0:
            raise MinimoeError(f"batch_size must be positive, got {batch_size}")
        if not 0 <= rank < world_size:
            raise MinimoeError(f"rank ({rank}) must be in [0, world_size ({world_size}))")
        self.data, self._maps = _open(prepared, split, seq_len)
        self.seq_len, self.batch_size = seq_len, batch_size
        per_shard = [max((len(m) - 1) // seq_len, 0) for m in self._maps]
        windows = np.concatenate(
            [np.stack([np.full(n, s), np.arange(n) * seq_len], axis=1) for s, n in enumerate(per_shard)]
        ).astype(np.int64)  # [num_windows, 2]: (shard, start)
        n = len(windows)
        keep = n if max_batches is None else min(n, max_batches * batch_size * world_size)
        windows = windows[(np.arange(keep) * n) // keep]  # evenly spread, in order
        per_rank = keep // world_size
        if per_rank == 0:
            raise MinimoeError(
                f"the {split} split has {n} windows of {seq_len + 1} tokens, fewer than {world_size} ranks"
            )
        self._windows = windows[rank::world_size][:per_rank]
        self.num_windows = per_rank
        self.num_targets = per_rank * seq_len

    def __len__(self) -> int:
        return -(-self.num_windows // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        T = self.seq_len
        for i in range(0, self.num_windows, self.batch_size):
            rows = self._windows[i : i + self.batch_size]
            buf = np.empty((len(rows), T + 1), dtype=np.int64)
            for j, (s, o) in enumerate(rows.tolist()):
                buf[j] = self._maps[s][o : o + T + 1]
            yield _to_xy(buf)
