"""`minimoe plot RUN_DIR [RUN_DIR ...] --out DIR`: loss, learning-rate, MaxVio and expert-load PNGs."""

from __future__ import annotations

from minimoe.cli.args import integer
from minimoe.errors import MinimoeError, require


def add_parser(sub) -> None:
    p = sub.add_parser(
        "plot",
        help="draw loss curves, learning rate, MaxVio and expert-load heatmaps to PNG",
        description="Figures from one or more run directories, overlaid for comparison: train and "
        "validation loss against tokens and against training FLOPs, learning rate, MaxVio per layer, and "
        "a per-layer expert-load heatmap (layers x experts) at chosen steps.",
    )
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (with metrics.jsonl)")
    p.add_argument("--out", default="plots", help="output directory for the PNGs (default: plots)")
    p.add_argument(
        "--steps", help="comma-separated steps for the expert-load heatmaps (nearest logged step; "
        "default: first, middle, last)",
    )  # fmt: skip
    p.add_argument("--dpi", type=integer, default=110, help="resolution (default 110)")


def parse_steps(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        steps = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MinimoeError(f"--steps must be comma-separated integers, got {text!r}") from None
    if not steps or any(s < 0 for s in steps):
        raise MinimoeError(f"--steps must be non-negative integers, got {text!r}")
    return steps


def run(args) -> int:
    from minimoe.lab.plot import plot_runs

    if args.dpi <= 0:
        raise MinimoeError(f"--dpi must be positive, got {args.dpi}")
    require("minimoe plot", "matplotlib")
    for path in plot_runs(args.run_dirs, args.out, steps=parse_steps(args.steps), dpi=args.dpi):
        print(path)
    return 0
