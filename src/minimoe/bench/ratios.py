"""Ratios of two sides timed in turns: one ratio per round (a_i / b_i, both timed within round i, so load
from other processes that round hits both), reported as the median over rounds with its min-max and, from
3 rounds, the 95% interval of their geometric mean.

`add_ratio(result, "train_ratio", ratios)` writes `train_ratio` (the median), `train_ratios` (the
per-round ratios), `train_ratio_min`, `train_ratio_max` and, from 3 rounds, `train_ratio_ci95` ([lo, hi]);
`spread(result, "train_ratio")` is the text a table shows after the median.
"""

from __future__ import annotations

import math
import statistics

MIN_ROUNDS_FOR_INTERVAL = 3


def interval(ratios: list[float]) -> tuple[float, float]:
    """95% Student-t interval of the geometric mean of per-round ratios (the rounds are the samples)."""
    from minimoe.lab.report import t975

    logs = [math.log(r) for r in ratios]
    n = len(logs)
    if n < 2:
        return (ratios[0], ratios[0])
    half = t975(n - 1) * statistics.stdev(logs) / math.sqrt(n)
    m = statistics.mean(logs)
    return (math.exp(m - half), math.exp(m + half))


def per_round(a: list[float], b: list[float]) -> list[float]:
    """a_i / b_i for every round i (the two lists hold one rate per round, in the rounds' order)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"per-round ratios need the same rounds on both sides, got {len(a)} and {len(b)}")
    return [x / y for x, y in zip(a, b)]


def add_ratio(result: dict, name: str, ratios: list[float]) -> None:
    """Write the median of the per-round `ratios` as `name`, and its spread next to it (module doc)."""
    result[name] = statistics.median(ratios)
    result[name + "s"] = list(ratios)
    result[name + "_min"], result[name + "_max"] = min(ratios), max(ratios)
    if len(ratios) >= MIN_ROUNDS_FOR_INTERVAL:
        result[name + "_ci95"] = list(interval(ratios))


def spread(result: dict, name: str) -> str:
    """The text after a ratio's median: " (MIN-MAX, 95% LO-HI, N rounds)" for a ratio `add_ratio` wrote
    (the interval from 3 rounds), "" for one without per-round ratios."""
    if name + "_min" not in result:
        return ""
    n = len(result.get(name + "s", ()))
    text = f" ({result[name + '_min']:.2f}-{result[name + '_max']:.2f}"
    if name + "_ci95" in result:
        lo, hi = result[name + "_ci95"]
        text += f", 95% {lo:.2f}-{hi:.2f}"
    return text + (f", {n} rounds)" if n else ")")
