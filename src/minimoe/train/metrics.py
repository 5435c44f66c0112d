"""Where a run's metric rows go: RUN_DIR/metrics.jsonl always, TensorBoard and wandb when enabled
(only rank 0 writes; on the other ranks every method is a no-op), and what a row averages over
(`LogWindow`, kept in checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path

import torch

from minimoe.errors import MinimoeError


class MetricWriters:
    """One JSON line per row in `path`, plus the optional TensorBoard / wandb writers.

    Args:
        path: the metrics.jsonl file (appended to).
        enabled: False on ranks > 0 (nothing is written).
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._writers: list = []

    def open(self, cfg, run_dir: Path) -> None:
        """Start the writers cfg.train asks for (a missing package is a one-sentence MinimoeError)."""
        tc = cfg.train
        if not self.enabled:
            return
        if tc.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                raise MinimoeError(
                    "train.tensorboard=true needs tensorboard (pip install tensorboard)"
                ) from None
            self._writers.append(("tb", SummaryWriter(str(run_dir / "tb"))))
        if tc.wandb:
            try:
                import wandb  # type: ignore[import-not-found]
            except ImportError:
                raise MinimoeError("train.wandb=true needs wandb (pip install wandb)") from None
            os.environ.setdefault("WANDB_MODE", "offline")  # works with no network; `wandb sync` later
            run = wandb.init(project=tc.wandb_project, dir=str(run_dir), config=cfg.to_dict())
            self._writers.append(("wandb", run))

    def log(self, row: dict) -> None:
        """Append one row ({"step": int, ...}); numbers also go to the open writers."""
        if not self.enabled:
            return
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(row) + "\n")
        scalars = {k: v for k, v in row.items() if isinstance(v, (int, float)) and k != "step"}
        for kind, w in self._writers:
            if kind == "tb":
                for k, v in scalars.items():
                    w.add_scalar(k, v, row["step"])
                w.flush()
            else:
                w.log(scalars, step=row["step"])

    def close(self) -> None:
        for kind, w in self._writers:
            w.close() if kind == "tb" else w.finish()
        self._writers = []


def peak_mem_mb(device: torch.device) -> float:
    """Peak memory of this process: the CUDA allocator's peak on a GPU, else the peak resident set."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
    except ImportError:  # pragma: no cover - Windows
        return 0.0


class LogWindow:
    """What the optimizer steps since the last logged row add up to (a row logs their mean loss and
    parts, their tokens per second and expert loads). Checkpoints keep it, so that a run paused or
    interrupted between two logged rows and resumed logs the rows an uninterrupted run would."""

    def __init__(self, device: torch.device, parts: tuple[str, ...]) -> None:
        self.device, self.part_names = device, parts
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.parts = {k: torch.zeros((), device=self.device) for k in self.part_names}
        self.steps, self.tokens, self.start = 0, 0, now
        self.loads: dict[int, torch.Tensor] = {}

    @contextlib.contextmanager
    def paused(self):
        """Time spent in this block (an evaluation, a checkpoint) is no training: it leaves the window,
        so a row's tokens/s counts the training steps' time only."""
        start = time.perf_counter()
        try:
            yield
        finally:
            self.start += time.perf_counter() - start

    def state_dict(self) -> dict:
        return {
            "loss": self.loss.item(), "parts": {k: v.item() for k, v in self.parts.items()},
            "steps": self.steps, "tokens": self.tokens, "seconds": time.perf_counter() - self.start,
            "loads": {i: v.detach().cpu() for i, v in self.loads.items()},
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.reset(time.perf_counter() - state["seconds"])
        self.loss.fill_(state["loss"])
        for k, v in state["parts"].items():
            self.parts[k].fill_(v)
        self.steps, self.tokens = state["steps"], state["tokens"]
        self.loads = {i: v.to(self.device) for i, v in state["loads"].items()}
