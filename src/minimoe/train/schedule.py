"""Learning-rate schedules as pure functions of the step: a multiplier in [0, 1] on the peak lr."""

from __future__ import annotations

import math


def lr_multiplier(
    step: int, max_steps: int, schedule: str, warmup: int, min_ratio: float = 0.1, decay_fraction: float = 0.2
) -> float:
    """Args:
    step: 0-based optimizer step.
    schedule: "cosine" (warmup, then cosine to min_ratio), "linear" (warmup, then linear to min_ratio),
        "constant" (warmup, then 1), "wsd" (warmup-stable-decay: warmup, flat, then linear to min_ratio
        over the last `decay_fraction` of the steps).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(max_steps - warmup, 1)
    progress = min(max((step - warmup) / span, 0.0), 1.0)
    if schedule == "cosine":
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - (1 - min_ratio) * progress
    if schedule == "wsd":
        # rounded before the cut: 0.29 * 100 is 28.999999999999996, and the decay takes 29 steps
        decay_start = max_steps - int(round(decay_fraction * max_steps, 6))
        if step < decay_start:
            return 1.0
        frac = (step - decay_start) / max(max_steps - decay_start, 1)
        return 1.0 - (1 - min_ratio) * min(frac, 1.0)
    raise ValueError(f"unknown schedule {schedule!r}")


def schedule_step(step: int, elapsed_s: float, tc) -> int:
    """The step the LR schedule sees after `elapsed_s` seconds of a run's clock (TrainConfig `tc`). With
    train.max_minutes it follows whichever of steps or time is further along (the elapsed fraction of the
    budget as a step of max_steps), so a run cut by the clock still finishes its decay; the warmup counts
    steps, whatever the clock says."""
    if tc.max_minutes is None or step < tc.warmup_steps:
        return step
    by_time = int(elapsed_s / (tc.max_minutes * 60) * tc.max_steps)
    return max(step, min(by_time, tc.max_steps))


def warmup_overrun(step: int, elapsed_s: float, step_s: float | None, tc) -> list[str]:
    """A warning (a list of zero or one) when a train.max_minutes run, at the speed of its steps so far
    (`step_s` seconds each; or at train.max_steps, if sooner), ends inside its warmup or less than one
    warmup after it: its learning rate then
    never reaches its peak, or its decay is squeezed into the few steps left (the warmup counts steps)."""
    if tc.max_minutes is None or not tc.warmup_steps or step_s is None or step >= tc.warmup_steps:
        return []
    steps = min(step + max(tc.max_minutes * 60 - elapsed_s, 0.0) / max(step_s, 1e-9), tc.max_steps)
    if steps >= 2 * tc.warmup_steps:
        return []
    where = "inside" if steps < tc.warmup_steps else "less than a warmup after"
    return [
        f"at this speed train.max_minutes={tc.max_minutes:g} ends near step {steps:.0f}, {where} its "
        f"{tc.warmup_steps} warmup steps, so the learning rate barely decays; give it more minutes or set "
        f"train.warmup_steps lower"
    ]
