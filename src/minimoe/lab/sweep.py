"""The data of a sweep: a parsed sweep file (`Sweep`), the runs it plans (`PlannedRun`) and how far
each has got on disk (`run_state`)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from minimoe.config import RunConfig
from minimoe.errors import MinimoeError

FAILED_MARKER = "failed"  # in a run directory: its last attempt stopped with this error (a rerun removes it)


@dataclass
class Sweep:
    name: str
    path: Path
    variants: dict[str, list[str]]
    seeds: list[int]
    budget_kind: str  # "tokens" | "flops" | "steps" | "minutes"
    budget: float
    clock: str = "wall"  # minutes budgets: "wall" | "cpu"
    contrasts: list[tuple[str, str]] = field(default_factory=list)  # (variant, reference)
    # a contrast whose 95% interval lies inside +-equivalence (nats of val loss) is resolved as a tie
    equivalence: float | None = None
    report: str = "report.md"  # file name in the output folder
    base_preset: str | None = None
    base_config: str | None = None
    base_overrides: list[str] = field(default_factory=list)
    data: str | None = None
    val_data: str | None = None
    description: str = ""


@dataclass
class PlannedRun:
    variant: str
    seed: int
    overrides: list[str]  # base + variant + seed + max_steps + data
    cfg: RunConfig  # resolved (vocab fitted), with max_steps set
    train_flops_per_token: float

    @property
    def name(self) -> str:
        return f"{self.variant}/seed_{self.seed}"


def run_state(run_dir: Path, max_steps: int, max_minutes: float | None = None) -> str:
    """'done' (latest checkpoint at max_steps, or at max_minutes on its clock), 'partial' (a checkpoint
    before that) or 'new'."""
    from minimoe.train.checkpoint import find_checkpoint

    # the checkpoint a resume would load: `latest`, or the newest complete one when a run killed while
    # saving left `latest` missing or naming no directory (such a run is not new: it must not be wiped)
    try:
        meta = find_checkpoint(run_dir) / "meta.json"
    except MinimoeError:
        return "new"
    try:
        m = json.loads(meta.read_text())
        step = m["step"]
    except (OSError, ValueError, KeyError):
        return "new"
    # a time budget ends a little early (the trainer stops when the next step and the final evaluation
    # would not fit) and records it in the checkpoint, with the budget it ran out of: a larger one resumes
    out_of_time = m.get("out_of_time") and m.get("max_minutes", max_minutes) >= (max_minutes or 0)
    if max_minutes is not None and (out_of_time or m.get("elapsed_s", 0.0) >= max_minutes * 60):
        return "done"
    return "done" if step >= max_steps else "partial"
