"""Figures from run directories (metrics.jsonl + config.yaml), drawn headless with matplotlib (Agg).

Each `*_figure` function returns a matplotlib Figure (tests inspect its axes); `plot_runs` writes them
all as PNGs. Several runs overlay on one axis, one colour per run.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from minimoe.config import RunConfig
from minimoe.config_yaml import build_run_config
from minimoe.errors import ConfigError, MinimoeError
from minimoe.lab.flops import flops_per_token

log = logging.getLogger("minimoe.lab")


@dataclass
class RunData:
    """One run's logged metrics, deduplicated by step (a resumed run may log a step twice; the last
    row wins), in step order."""

    label: str
    path: Path
    cfg: RunConfig
    train: list[dict] = field(default_factory=list)  # rows with "loss"
    evals: list[dict] = field(default_factory=list)  # rows with "val_loss"
    train_flops_per_token: float = 0.0
    group: str | None = None  # runs of one group (seeds of a variant) share a colour, differ in dash

    def series(self, key: str, rows: str = "train") -> tuple[list[float], list[float]]:
        """(steps, values) of `key` in the train or eval rows that have it."""
        src = self.train if rows == "train" else self.evals
        pts = [(r["step"], r[key]) for r in src if r.get(key) is not None]
        return [p[0] for p in pts], [p[1] for p in pts]

    def tokens_at(self, rows: str = "train") -> list[int]:
        return [r["tokens"] for r in (self.train if rows == "train" else self.evals)]


def read_metrics(path: Path) -> tuple[list[dict], list[dict]]:
    """Parse metrics.jsonl into (train rows, eval rows), keeping the last row for each step.

    Args:
        path: a metrics.jsonl file.
    Returns:
        train rows (those with "loss") and eval rows (with "val_loss"), each sorted by step.
    """
    if path.is_dir():
        raise MinimoeError(f"{path} is a directory, not a file")
    if not path.is_file():
        raise MinimoeError(f"{path} does not exist; is {path.parent} a run directory?")
    train: dict[int, dict] = {}
    evals: dict[int, dict] = {}
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise MinimoeError(f"{path} is not UTF-8 text") from None
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            # a run killed mid-write can leave a partial last line; anything else is corruption
            if n == len(lines):
                continue
            raise MinimoeError(f"{path} line {n} is not valid JSON") from None
        if not isinstance(row, dict) or "step" not in row:
            raise MinimoeError(f"{path} line {n} is not a metrics row (no 'step')")
        if "loss" in row:
            train[row["step"]] = row
        if "val_loss" in row:
            evals[row["step"]] = row
    return [train[s] for s in sorted(train)], [evals[s] for s in sorted(evals)]


def load_run_data(run_dir: str | Path, label: str | None = None) -> RunData:
    """Read a run directory's config.yaml and metrics.jsonl."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise MinimoeError(f"run directory {run_dir} does not exist")
    if not run_dir.is_dir():
        raise MinimoeError(f"{run_dir} is a file, not a run directory")
    if not (run_dir / "config.yaml").is_file():
        raise MinimoeError(f"{run_dir} is not a run directory (no config.yaml)")
    try:
        cfg = build_run_config(config_path=str(run_dir / "config.yaml"))
    except ConfigError as e:
        raise MinimoeError(f"{run_dir}/config.yaml is not a valid run config ({e})") from None
    if not (run_dir / "metrics.jsonl").exists():  # `minimoe import` and `upcycle` write no metrics
        raise MinimoeError(f"{run_dir} holds no metrics.jsonl: no training has been logged in it yet")
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    if not train and not evals:
        raise MinimoeError(f"{run_dir}/metrics.jsonl has no rows yet")
    fpt = flops_per_token(cfg.model, cfg.train.seq_len).train_per_token
    return RunData(label or run_dir.name, run_dir, cfg, train, evals, fpt)


def unique_labels(paths: list[Path]) -> list[str]:
    """Shortest path suffixes that tell the runs apart (`a/seed_1`, `b/seed_1`)."""
    parts = [p.resolve().parts for p in paths]
    for depth in range(1, max(len(p) for p in parts) + 1):
        labels = ["/".join(p[-depth:]) for p in parts]
        if len(set(labels)) == len(labels):
            return labels
    return [str(p) for p in paths]


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # headless: no display needed, and never opens a window
    import matplotlib.pyplot as plt

    return plt


def _colors(n: int) -> list:
    plt = _plt()
    cmap = plt.get_cmap("tab10" if n <= 10 else "tab20")
    return [cmap(i % cmap.N) for i in range(n)]


def _styles(runs: list[RunData]) -> list[tuple]:
    """(colour, line style, legend label) per run: one colour per group, a different dash per run inside a
    group, and one legend entry per group of several runs (a sweep's 20 seeds of a variant would
    otherwise list 20 entries each, and a legend of 40 squeezes the axes away)."""
    groups = [r.group or r.label for r in runs]
    colors = dict(zip(dict.fromkeys(groups), _colors(len(set(groups)))))
    sizes = {g: groups.count(g) for g in groups}
    seen: dict[str, int] = {}
    out = []
    for r, g in zip(runs, groups):
        i = seen.get(g, 0)
        label = r.label if sizes[g] == 1 else f"{g} ({sizes[g]} runs)" if i == 0 else "_nolegend_"
        out.append((colors[g], ("-", "--", ":", "-.")[i % 4], label))
        seen[g] = i + 1
    return out


def _clock_at(timed: list[tuple[int, float]], step: int) -> float:
    """The run's clock at the end of `step`, from the logged (step, elapsed_s) rows: that row's, else
    linear in the step between the logged rows around it, else the nearest logged row's (before the first
    or after the last; nan when none)."""
    if not timed:
        return float("nan")
    after = next((i for i, (s, _) in enumerate(timed) if s >= step), None)
    if after is None:
        return timed[-1][1]
    s1, t1 = timed[after]
    if s1 == step or after == 0:
        return t1
    s0, t0 = timed[after - 1]
    return t0 + (t1 - t0) * (step - s0) / (s1 - s0)


def loss_figure(runs: list[RunData], x: str = "tokens"):
    """Two panels: training loss and validation loss against tokens seen, training FLOPs or training time.

    Args:
        runs: the runs to overlay.
        x: "tokens", "flops" or "time" (the logged elapsed_s: seconds on the run's train.clock).
    Returns:
        Figure with 2 axes.
    """
    if x not in ("tokens", "flops", "time"):
        raise ValueError(f"x must be tokens, flops or time, got {x!r}")
    plt = _plt()
    fig, (ax_t, ax_v) = plt.subplots(1, 2, figsize=(12, 4.5), constrained_layout=True)
    for run, (c, ls, label) in zip(runs, _styles(runs)):
        scale = run.train_flops_per_token if x == "flops" else 1.0
        xs = [t * scale for t in run.tokens_at("train")]
        if x == "time":
            timed = [(r["step"], r["elapsed_s"]) for r in run.train if "elapsed_s" in r]
            xs = [r.get("elapsed_s", float("nan")) for r in run.train]
        if run.train:
            # cross-entropy when logged: the total loss adds aux/z/MTP terms that differ between variants
            ys = [r.get("ce", r["loss"]) for r in run.train]
            ax_t.plot(xs, ys, color=c, ls=ls, lw=1.0, label=label, alpha=0.85)
        if run.evals:
            xv = [t * scale for t in run.tokens_at("eval")]
            if x == "time":
                xv = [_clock_at(timed, r["step"]) for r in run.evals]
            ys = [r["val_loss"] for r in run.evals]
            ax_v.plot(xv, ys, marker="o", color=c, ls=ls, lw=1.5, ms=4, label=label)
    xlabel = {
        "tokens": "tokens seen",
        "flops": "training FLOPs (activated parameters + attention)",
        "time": "training time (s on the run's clock: wall, or CPU time of the process)",
    }[x]
    for ax, title in ((ax_t, "training cross-entropy (per logging window)"), (ax_v, "validation loss (CE)")):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("loss (nats/token)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    if x == "flops":
        for ax in (ax_t, ax_v):
            ax.ticklabel_format(axis="x", style="sci", scilimits=(0, 0))
    fig.suptitle(f"loss vs {({'tokens': 'tokens', 'flops': 'training FLOPs', 'time': 'training time'})[x]}")
    return fig


def lr_figure(runs: list[RunData]):
    """Learning rate against optimizer step, one line per run. Returns a Figure with 1 axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for run, (c, ls, label) in zip(runs, _styles(runs)):
        steps, lr = run.series("lr")
        ax.plot(steps, lr, color=c, ls=ls, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("learning rate")
    ax.set_title("learning-rate schedule")
    ax.grid(alpha=0.3)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    if ax.lines:
        ax.legend(fontsize=8)
    return fig


def moe_runs(runs: list[RunData]) -> list[RunData]:
    """The runs that logged expert loads (MoE models)."""
    return [r for r in runs if any("max_vio" in row for row in r.train)]


def maxvio_figure(runs: list[RunData]):
    """MaxVio per MoE layer over training, one panel per run (shared y axis). MaxVio = max load / mean
    load - 1 over each logging window.

    Returns:
        Figure with one axis per MoE run.
    """
    runs = moe_runs(runs)
    if not runs:
        raise MinimoeError("no run logged expert loads (dense models have no MaxVio)")
    plt = _plt()
    cols = min(len(runs), 3)
    rows = math.ceil(len(runs) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(5.5 * cols, 4 * rows), squeeze=False, sharey=True, constrained_layout=True
    )
    for ax, run in zip(axes.flat, runs):
        layers = sorted({k for row in run.train for k in row.get("max_vio", {})}, key=int)
        colors = _colors(len(layers))
        for layer, c in zip(layers, colors):
            pts = [(r["step"], r["max_vio"][layer]) for r in run.train if layer in r.get("max_vio", {})]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], color=c, lw=1, label=layer_label(run, layer))
        steps, mean = run.series("max_vio_mean")
        ax.plot(steps, mean, color="black", lw=2, ls="--", label="mean over layers")
        ax.set_title(run.label, fontsize=10)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("MaxVio (max load / mean load - 1)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for ax in list(axes.flat)[len(runs) :]:
        ax.set_visible(False)
    fig.suptitle("expert load imbalance per layer (0 = perfectly balanced)")
    return fig


def router_z_figure(runs: list[RunData]):
    """The router z (the unweighted z-loss: mean squared logsumexp of the router logits, summed over
    MoE layers; the mean of each logging window) against optimizer step, one line per run that logged
    it; the steps where the z-spike alert fired are marked. Returns a Figure with 1 axis."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(7, 4), constrained_layout=True)
    for run, (c, ls, label) in zip(runs, _styles(runs)):
        steps, z = run.series("router_z")
        if not steps:
            continue  # a run logged before router_z was
        ax.plot(steps, z, color=c, ls=ls, lw=1, label=label)
        spikes = [(r["step"], r["router_z"]) for r in run.train if _z_spike(r) and "router_z" in r]
        if spikes:
            ax.plot(*zip(*spikes), ls="", marker="v", color=c, ms=7)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("router z (mean logsumexp² of router logits)")
    ax.set_title("router z per logging window (▼ = z-spike alert)")
    ax.grid(alpha=0.3, which="both")
    if ax.lines:
        ax.legend(fontsize=8)
    return fig


def _z_spike(row: dict) -> bool:
    return any(a.get("kind") == "z_spike" for a in row.get("alerts", []))


def layer_label(run: RunData, key: str) -> str:
    """How figures name the MoE layer logged as `key`: blocks after the last layer are MTP modules."""
    i, n = int(key), run.cfg.model.num_hidden_layers
    if i < n:
        return f"layer {i}"
    return "MTP" if run.cfg.model.mtp_depth == 1 else f"MTP {i - n + 1}"


def pick_steps(run: RunData, steps: list[int] | None, n_default: int = 3) -> list[int]:
    """Logged steps nearest to the requested ones (default: first, middle and last logged step); a step
    shown in place of another is said in a warning."""
    logged = [r["step"] for r in run.train if "load_frac" in r]
    if not logged:
        return []
    if not steps:
        idx = sorted({0, len(logged) // 2, len(logged) - 1})[:n_default]
        return [logged[i] for i in idx]
    out = []
    for s in steps:
        nearest = min(logged, key=lambda x: (abs(x - s), x))
        if nearest != s:
            log.warning(
                "%s: step %d has no expert loads logged; showing step %d, the nearest", run.label, s, nearest
            )
        if nearest not in out:
            out.append(nearest)
    return out


def load_heatmap_figure(run: RunData, steps: list[int] | None = None):
    """Per-layer expert-load heatmaps (layers x experts, colour = share of the layer's token slots) at
    the chosen logged steps, one panel per step and one shared colour bar.

    Args:
        run: a MoE run.
        steps: steps to show (nearest logged step is used); None = first, middle, last.
    Returns:
        Figure with one heatmap axis per step plus the colour-bar axis.
    """
    chosen = pick_steps(run, steps)
    if not chosen:
        raise MinimoeError(f"{run.label} logged no expert loads (a dense model?)")
    plt = _plt()
    by_step = {r["step"]: r for r in run.train}
    mats, layer_names = [], []
    for s in chosen:
        lf = by_step[s]["load_frac"]
        layer_names = sorted(lf, key=int)
        mats.append([lf[k] for k in layer_names])
    n_exp = len(mats[0][0])
    vmax = max(max(max(row) for row in m) for m in mats)
    fig, axes = plt.subplots(
        1,
        len(chosen),
        figsize=(max(3.0, 0.35 * n_exp + 1.5) * len(chosen) + 1, 0.5 * len(layer_names) + 2.2),
        squeeze=False,
        constrained_layout=True,
    )
    im = None
    for ax, s, m in zip(axes[0], chosen, mats):
        im = ax.imshow(m, aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_title(f"step {s} ({by_step[s]['tokens']:,} tokens)", fontsize=9)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(
            range(len(layer_names)), [layer_label(run, k).removeprefix("layer ") for k in layer_names]
        )
        ticks = range(0, n_exp, max(1, n_exp // 16))
        ax.set_xticks(list(ticks), [str(t) for t in ticks])
    cbar = fig.colorbar(im, ax=list(axes[0]), shrink=0.9)
    cbar.set_label(f"share of token slots (uniform = {1 / n_exp:.3f})")
    fig.suptitle(f"{run.label}: expert load per layer")
    return fig


def safe_name(label: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in label).strip("_") or "run"


# the largest image drawn: Agg refuses 2^16 pixels a side, and allocates the whole RGBA canvas up front
# (so a huge --dpi was an allocator failure, not a message)
MAX_SIDE_PX = 2**16 - 1
MAX_PIXELS = 2**28  # 1 GiB of RGBA


def check_pixels(figures: list, dpi: int) -> None:
    """MinimoeError naming the largest --dpi that draws every figure, when `dpi` makes one too large."""
    limit = dpi
    for _, fig in figures:
        w, h = fig.get_size_inches()
        limit = min(limit, int(MAX_SIDE_PX / max(w, h)), int(math.sqrt(MAX_PIXELS / (w * h))))
    if limit < dpi:
        raise MinimoeError(f"--dpi {dpi} makes images too large to draw; use --dpi {limit} or less")


def plot_runs(
    run_dirs: list[str | Path], out_dir: str | Path, steps: list[int] | None = None, dpi: int = 110
) -> list[Path]:
    """Write every figure for these runs as PNGs into `out_dir`.

    Files: loss_vs_tokens.png, loss_vs_flops.png, lr.png, and for MoE runs maxvio.png, router_z.png
    (runs that logged it) and one expert_load_<run>.png each.

    Args:
        run_dirs: run directories to overlay.
        out_dir: created if missing.
        steps: steps for the expert-load heatmaps (None = first, middle, last logged).
        dpi: resolution.
    Returns:
        paths written.
    """
    if not run_dirs:
        raise MinimoeError("give at least one run directory")
    paths = [Path(p) for p in run_dirs]
    runs = [load_run_data(p, lab) for p, lab in zip(paths, unique_labels(paths))]
    out = Path(out_dir)
    plt = _plt()
    figures = [
        ("loss_vs_tokens.png", loss_figure(runs, "tokens")),
        ("loss_vs_flops.png", loss_figure(runs, "flops")),
        ("lr.png", lr_figure(runs)),
    ]
    moe = moe_runs(runs)  # a dense run logs router_z 0: it has no router
    if moe:
        figures.append(("maxvio.png", maxvio_figure(runs)))
        if any(r.series("router_z")[0] for r in moe):
            figures.append(("router_z.png", router_z_figure(moe)))
        for run in moe:
            figures.append((f"expert_load_{safe_name(run.label)}.png", load_heatmap_figure(run, steps)))
    try:  # before --out is created: a refused --dpi leaves nothing behind
        check_pixels(figures, dpi)
        out.mkdir(parents=True, exist_ok=True)
    except (MinimoeError, OSError) as e:
        for _, fig in figures:
            plt.close(fig)
        if isinstance(e, OSError):
            raise MinimoeError(f"cannot create output directory {out} ({e.strerror})") from None
        raise
    written = []
    for name, fig in figures:
        fig.savefig(out / name, dpi=dpi)
        plt.close(fig)
        written.append(out / name)
    return written
