"""Where a run's metric rows go: RUN_DIR/metrics.jsonl always, TensorBoard and wandb when enabled
(only rank 0 writes; on the other ranks every method is a no-op), and what a row averages over
(`LogWindow`, kept in checkpoints).
"""

from __future__ import annotations

import contextlib
import json
import os
import time
import uuid
from pathlib import Path

import torch

from minimoe.errors import MinimoeError
from minimoe.model.moe import max_vio
from minimoe.train.balance import add_loads


def _import_logger(name: str):
    """The module of the logger `train.NAME=true` asks for, or its one-sentence MinimoeError."""
    try:
        if name == "tensorboard":
            import torch.utils.tensorboard as module
        else:
            import wandb as module  # type: ignore[import-not-found]
    except ImportError:
        raise MinimoeError(f"train.{name}=true needs {name} (pip install {name})") from None
    return module


def check_loggers(tc) -> None:
    """Refuse, before a run prepares data or writes a file, a logger cfg.train asks for whose package
    is missing (a refused resume must not keep the `=true` in the run's config.yaml)."""
    for name in ("tensorboard", "wandb"):
        if getattr(tc, name):
            _import_logger(name)


class MetricWriters:
    """One JSON line per row in `path`, plus the optional TensorBoard / wandb writers.

    Args:
        path: the metrics.jsonl file (appended to).
        enabled: False on ranks > 0 (nothing is written).
    """

    def __init__(self, path: Path, enabled: bool = True):
        self.path, self.enabled = Path(path), enabled
        self._writers: list = []

    def open(self, cfg, run_dir: Path, step: int = 0) -> None:
        """Start the writers cfg.train asks for (a missing package is a one-sentence MinimoeError).

        Args:
            step: the step the run continues from; TensorBoard drops what an earlier session logged
                after it (a resume from an earlier checkpoint logs those steps again), as
                `start_logs` does for metrics.jsonl.
        """
        tc = cfg.train
        if not self.enabled:
            return
        if tc.tensorboard:
            SummaryWriter = _import_logger("tensorboard").SummaryWriter
            purge = step + 1 if step > 0 else None
            self._writers.append(("tb", SummaryWriter(str(run_dir / "tb"), purge_step=purge)))
        if tc.wandb:
            wandb = _import_logger("wandb")
            os.environ.setdefault("WANDB_MODE", "offline")  # works with no network; `wandb sync` later
            # one W&B run per minimoe run: a resumed run continues the id its first session made; a run
            # from step 0 makes its own (the folder may hold the id of an attempt that saved no checkpoint)
            id_file = run_dir / "wandb_run_id"
            run_id = id_file.read_text(encoding="utf-8").strip() if step > 0 and id_file.is_file() else None
            if not run_id:
                run_id = uuid.uuid4().hex[:12]  # W&B run ids: letters and digits
                id_file.write_text(run_id + "\n", encoding="utf-8")
            run = wandb.init(
                project=tc.wandb_project, dir=str(run_dir), config=cfg.to_dict(), id=run_id, resume="allow"
            )
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
    parts, their tokens per second, expert loads and mean per-step MaxVio). Checkpoints keep it, so
    that a run paused or interrupted between two logged rows and resumed logs the rows an
    uninterrupted run would."""

    def __init__(self, device: torch.device, parts: tuple[str, ...]) -> None:
        self.device, self.part_names = device, parts
        self._paused_at: float | None = None  # when the `paused` block in progress began
        self.reset(time.perf_counter())

    def reset(self, now: float) -> None:
        self.loss = torch.zeros((), device=self.device)
        self.parts = {k: torch.zeros((), device=self.device) for k in self.part_names}
        self.steps, self.tokens, self.start = 0, 0, now
        self.loads: dict[int, torch.Tensor] = {}
        self.vio: dict[int, torch.Tensor] = {}  # {layer: sum of the steps' MaxVio (MaxVio_batch)}
        self.vio_steps = 0

    def add_loads(self, loads: dict[int, torch.Tensor]) -> None:
        """One optimizer step's {layer: (E,) loads}: summed into the window, and each layer's MaxVio of
        the step summed for the row's mean (device tensors only, no host sync)."""
        if not loads:
            return
        layers = sorted(loads)
        add_loads(self.loads, loads)
        add_loads(self.vio, dict(zip(layers, max_vio(torch.stack([loads[i] for i in layers])))))  # (L,)
        self.vio_steps += 1

    def max_vio(self) -> dict[int, torch.Tensor]:
        """{layer: mean over the window's steps of that step's MaxVio}; {} before any step."""
        return {i: v / self.vio_steps for i, v in self.vio.items()} if self.vio_steps else {}

    @contextlib.contextmanager
    def paused(self):
        """Time spent in this block (an evaluation, a checkpoint) is no training: it leaves the window,
        so a row's tokens/s counts the training steps' time only."""
        start = self._paused_at = time.perf_counter()
        try:
            yield
        finally:
            self._paused_at = None
            self.start += time.perf_counter() - start

    def state_dict(self) -> dict:
        # inside `paused` (a checkpoint after an evaluation) the window's time stopped when it began
        end = self._paused_at if self._paused_at is not None else time.perf_counter()
        return {
            "loss": self.loss.item(), "parts": {k: v.item() for k, v in self.parts.items()},
            "steps": self.steps, "tokens": self.tokens, "seconds": end - self.start,
            "loads": {i: v.detach().cpu() for i, v in self.loads.items()},
            "vio": {i: v.detach().cpu() for i, v in self.vio.items()}, "vio_steps": self.vio_steps,
        }  # fmt: skip

    def load_state_dict(self, state: dict) -> None:
        self.reset(time.perf_counter() - state["seconds"])
        self.loss.fill_(state["loss"])
        for k, v in state["parts"].items():
            self.parts[k].fill_(v)
        self.steps, self.tokens = state["steps"], state["tokens"]
        self.loads = {i: v.to(self.device) for i, v in state["loads"].items()}
        # a checkpoint written before the window kept MaxVio: the row averages the steps after it
        self.vio = {i: v.to(self.device) for i, v in state.get("vio", {}).items()}
        self.vio_steps = state.get("vio_steps", 0)
