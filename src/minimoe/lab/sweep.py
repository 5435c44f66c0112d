"""The data of a sweep: a parsed sweep file (`Sweep`) and the runs it plans (`PlannedRun`)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from minimoe.config import RunConfig


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
