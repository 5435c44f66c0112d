"""What a training run shows while it runs: the start-up summary line, the progress bar (steps, or
steps and minutes under train.max_minutes), and the metrics file trimmed back to a resumed checkpoint."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def si(n: float) -> str:
    """1234567 -> '1.2M'."""
    for div, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}"
    return f"{n:.0f}"


def _layout(dist) -> str:
    """How the processes share the work, as the start-up line names it: "DDP, expert parallel 2"."""
    if dist.pipeline_parallel > 1:
        return f"pipeline parallel {dist.pipeline_parallel}"
    parts = [dist.strategy.upper()]
    if dist.expert_parallel > 1:
        parts.append(f"expert parallel {dist.expert_parallel}")
    return ", ".join(parts)


def run_summary(cfg, data, device, world_size: int = 1) -> str:
    """One line that says what a run is: parameters, data, device, threads (on the CPU with OpenMP's wait
    policy, which the CLI picks from the other processes' load at start and which moves tokens/s by a
    quarter), dtype and budget.

    Args:
        cfg: the RunConfig; data: its PreparedData; device: the torch device; world_size: processes.
    """
    import torch

    from minimoe.params import count_params

    tc = cfg.train
    rep = count_params(cfg.model)
    mtp = f" incl. {si(rep.mtp_total)} MTP" if rep.mtp_total else ""
    budget = f"{tc.max_steps:,} step{'s' if tc.max_steps != 1 else ''}"
    if tc.max_minutes is not None:
        budget += f" or {tc.max_minutes:g} min, whichever comes first"
    if tc.max_steps <= tc.warmup_steps:  # e.g. a short trial of a preset with a long warmup
        budget += f" (all of it warmup, train.warmup_steps={tc.warmup_steps:,}: the learning rate only rises)"
    world = f" x {world_size} processes ({_layout(cfg.dist)})" if world_size > 1 else ""
    data_part = ""
    if data is not None:
        held_out = {  # how the validation split was made (prepare.py), so a small or odd one shows
            "document": f" ({data.meta['splits']['val']['documents']:,} held-out documents)",
            "stream": f" (the last {cfg.data.val_fraction:.0%} of the text)",
            "none": " (none: data.val_fraction=0)",
        }.get(data.meta.get("split_mode"), "")
        data_part = (
            f"data {si(data.num_tokens('train'))} train + {si(data.num_tokens('val'))} val tokens{held_out}; "
        )
    threads = f"{torch.get_num_threads()} thread{'s' if torch.get_num_threads() != 1 else ''}"
    if device.type == "cpu":
        threads += f" (OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')})"
    return (
        f"train: {si(rep.total + rep.mtp_total)} parameters{mtp}, {si(rep.activated)} activated per token; "
        f"{data_part}"
        f"{device.type}{world}, {threads}, {tc.precision}; "
        f"{si(tc.batch_size * tc.seq_len * tc.grad_accum)} tokens/step; budget {budget}"
    )


def start_logs(run_dir: Path, step: int | None) -> None:
    """Before a run logs into `run_dir`: a resume from `step` drops the metrics rows written after it,
    so steps never go back (TensorBoard purges its own); a fresh run (`step` None) drops the rows and
    TensorBoard events an attempt there that saved no checkpoint left, which are not this run's."""
    path = run_dir / "metrics.jsonl"
    if step is None:
        path.unlink(missing_ok=True)
        shutil.rmtree(run_dir / "tb", ignore_errors=True)
        return
    if not path.exists():
        return
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step", 0)
        except (json.JSONDecodeError, AttributeError):
            continue  # a row cut short by a crash
        if row_step <= step:
            keep.append(line)
    if len(keep) != len(lines):
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(keep), encoding="utf-8")
        os.replace(tmp, path)


BAR_FORMAT = "train {percentage:3.0f}%|{bar}| "  # the clock-bounded bar; the counts follow it


class TrainProgress:
    """The training bar. Bounded by steps only, it counts steps. With train.max_minutes it shows the
    fraction of whichever budget is further along (steps or minutes), and both counts, so a run the
    clock ends reaches 100% instead of stopping at "96/2000"."""

    def __init__(self, enabled: bool, max_steps: int, max_minutes: float | None, step: int):
        from tqdm.auto import tqdm

        self.max_steps, self.budget_s, self.step, self.elapsed = max_steps, None, step, 0.0
        self.text = ""
        if max_minutes is None:
            self.bar = tqdm(total=max_steps, initial=step, disable=not enabled, unit="step",
                            dynamic_ncols=True, desc="train")  # fmt: skip
            return
        self.budget_s = max_minutes * 60
        # the bar's own format from the first draw: tqdm draws once on creation, and its default format
        # ("0%| | 0/1000 [00:00<?, ?it/s]") would show the internal per-mille counter
        self.bar = tqdm(total=1000, initial=0, disable=not enabled, dynamic_ncols=True, bar_format=BAR_FORMAT)
        self.advance(step, 0.0)

    def _fraction(self) -> float:
        return min(1.0, max(self.step / self.max_steps, self.elapsed / self.budget_s))

    def _refresh(self) -> None:
        left = max(0.0, self.budget_s - self.elapsed)
        post = (
            f"step {self.step:,}/{self.max_steps:,}, {self.elapsed / 60:.1f}/{self.budget_s / 60:g} min "
            f"({left / 60:.1f} left)"
        )
        text = f"{post}, {self.text}" if self.text else post
        self.bar.bar_format = BAR_FORMAT + text.replace("{", "{{").replace("}", "}}")
        self.bar.n = round(self._fraction() * 1000)
        self.bar.refresh()

    def advance(self, step: int, elapsed: float) -> None:
        self.step, self.elapsed = step, elapsed
        if self.budget_s is None:
            self.bar.update(step - self.bar.n)
        else:
            self._refresh()

    def note(self, text: str) -> None:
        """Show the latest loss / validation numbers after the counts."""
        self.text = text
        if self.budget_s is None:
            self.bar.set_postfix_str(text)
        else:
            self._refresh()

    def close(self, step: int, elapsed: float, complete: bool) -> None:
        """`complete`: the run used its whole budget (steps or minutes), so the bar ends at 100%."""
        self.step, self.elapsed = step, elapsed
        if self.budget_s is not None:
            self._refresh()
            if complete:
                self.bar.n = self.bar.total
                self.bar.refresh()
        self.bar.close()
