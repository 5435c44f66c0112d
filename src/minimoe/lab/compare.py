"""Sweeps: train variants of one base config on the same data with the same seeds, at the same token
budget or the same training FLOPs, and write a Markdown report with figures.

The sweep file format is in `minimoe compare --help` (minimoe.cli.compare.SWEEP_FORMAT).

Run directories: OUT/VARIANT/seed_S. A run whose latest checkpoint already reached its max_steps is
skipped, an unfinished one is resumed, so running the sweep again continues it.
"""

from __future__ import annotations

import difflib
import math
import shutil
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from minimoe.config import RunConfig
from minimoe.config_yaml import build_run_config, load_yaml
from minimoe.errors import ConfigError, MinimoeError
from minimoe.lab.flops import flops_per_token, steps_for_budget, tokens_per_step
from minimoe.params import count_params

SWEEP_KEYS = ("name", "description", "base", "data", "val_data", "budget", "seeds", "variants")


@dataclass
class Sweep:
    name: str
    path: Path
    variants: dict[str, list[str]]
    seeds: list[int]
    budget_kind: str  # "tokens" | "flops"
    budget: float
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


def _override_list(value, where: str) -> list[str]:
    if value is None:
        return []
    if isinstance(value, dict):  # {model.hidden_size: 128} reads better in YAML for some
        return [f"{k}={_yaml_scalar(v)}" for k, v in value.items()]
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise MinimoeError(f"{where} must be a list of dotted key=value overrides")
    return list(value)


def _yaml_scalar(v) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    return str(v)


def _resolve_path(p: str | None, base: Path) -> str | None:
    if p is None:
        return None
    if p.startswith("hf:"):
        return p
    q = Path(p).expanduser()
    return str(q if q.is_absolute() else (base / q).resolve())


def load_sweep(path: str | Path, data: str | None = None, val_data: str | None = None) -> Sweep:
    """Read and check a sweep file.

    Args:
        path: the YAML file.
        data, val_data: replace the file's data sources (paths relative to the working directory).
    Returns:
        the Sweep, with data paths made absolute.
    """
    path = Path(path)
    try:
        d = load_yaml(path)
    except ConfigError as e:
        raise MinimoeError(str(e).replace("config file", "sweep file", 1)) from None
    unknown = [k for k in d if k not in SWEEP_KEYS]
    if unknown:
        close = difflib.get_close_matches(str(unknown[0]), SWEEP_KEYS, n=1)
        hint = f"did you mean '{close[0]}'?" if close else f"expected {', '.join(SWEEP_KEYS)}"
        raise MinimoeError(f"sweep file {path}: unknown key '{unknown[0]}' ({hint})")
    variants = d.get("variants")
    if not isinstance(variants, dict) or not variants:
        raise MinimoeError(f"sweep file {path} needs a 'variants' mapping of name -> overrides")
    for name in variants:
        if not isinstance(name, str) or not name or "/" in name or name.startswith("."):
            raise MinimoeError(f"sweep file {path}: variant name {name!r} cannot be a directory name")
    budget = d.get("budget")
    if not isinstance(budget, dict) or len(budget) != 1 or next(iter(budget)) not in ("tokens", "flops"):
        raise MinimoeError(f"sweep file {path}: budget must be {{tokens: N}} or {{flops: F}}")
    kind, value = next(iter(budget.items()))
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise MinimoeError(f"sweep file {path}: budget {kind} must be a number, got {value!r}") from None
    if not value > 0:
        raise MinimoeError(f"sweep file {path}: budget {kind} must be positive")
    seeds = d.get("seeds", [1337])
    if not isinstance(seeds, list) or not seeds or not all(isinstance(s, int) for s in seeds):
        raise MinimoeError(f"sweep file {path}: seeds must be a list of integers")
    if len(set(seeds)) != len(seeds):
        raise MinimoeError(f"sweep file {path}: seeds repeat")
    base = d.get("base") or {}
    if isinstance(base, list):
        base = {"overrides": base}
    if not isinstance(base, dict):
        raise MinimoeError(f"sweep file {path}: base must be a mapping (preset, config, overrides)")
    bad = [k for k in base if k not in ("preset", "config", "overrides")]
    if bad:
        raise MinimoeError(
            f"sweep file {path}: unknown key 'base.{bad[0]}' (expected preset, config, overrides)"
        )
    here = path.resolve().parent
    cwd = Path.cwd()
    return Sweep(
        name=str(d.get("name") or path.stem),
        path=path,
        description=str(d.get("description") or "").strip(),
        variants={str(k): _override_list(v, f"variant '{k}'") for k, v in variants.items()},
        seeds=seeds,
        budget_kind=kind,
        budget=value,
        base_preset=base.get("preset"),
        base_config=_resolve_path(base.get("config"), here),
        base_overrides=_override_list(base.get("overrides"), "base.overrides"),
        data=_resolve_path(data, cwd) if data else _resolve_path(d.get("data"), here),
        val_data=_resolve_path(val_data, cwd) if val_data else _resolve_path(d.get("val_data"), here),
    )


def _check_sources(sweep: Sweep) -> None:
    for what, p in (("data", sweep.data), ("val_data", sweep.val_data)):
        if p and not p.startswith("hf:") and not Path(p).exists():
            raise MinimoeError(f"sweep {sweep.name}: {what} {p} does not exist")


def _fitted_vocab(cfg: RunConfig, val_data: str | None) -> int:
    """The vocab size train_from_config would pick: the tokenizer's, rounded up to a multiple of 64.
    Prepares (or reuses) the tokenized data, which training then reuses."""
    from minimoe.data import prepare
    from minimoe.train.run import data_cache_dir

    data = prepare(
        cfg.data.path, cfg.data.tokenizer, data_cache_dir(cfg.data, val_data),
        val_fraction=cfg.data.val_fraction, workers=cfg.data.workers, val_source=val_data,
        text_field=cfg.data.text_field, glob=cfg.data.glob, progress=False,
    )  # fmt: skip
    return -(-data.tokenizer().vocab_size // 64) * 64


def plan(sweep: Sweep) -> list[PlannedRun]:
    """Resolve every variant x seed: config, training FLOPs per token, and max_steps from the budget.

    The vocabulary is fitted to the tokenizer once (as `minimoe train` does) and pinned with an explicit
    `model.vocab_size` so that the FLOPs count here is the model that trains.
    """
    _check_sources(sweep)
    data_ov = [f"data.path={sweep.data}"] if sweep.data else []
    vocabs: dict[tuple, int] = {}  # (data source, tokenizer) -> fitted vocab size
    out = []
    for variant, ov in sweep.variants.items():
        base_ov = sweep.base_overrides + ov + data_ov
        try:
            cfg = build_run_config(sweep.base_preset, sweep.base_config, base_ov)
        except ConfigError as e:
            raise MinimoeError(f"sweep {sweep.name}, variant '{variant}': {e}") from None
        if not any(o.split("=", 1)[0].strip() == "model.vocab_size" for o in base_ov):
            key = (cfg.data.path, cfg.data.tokenizer, cfg.data.text_field, cfg.data.val_fraction)
            if key not in vocabs:
                vocabs[key] = _fitted_vocab(cfg, sweep.val_data)
            base_ov = base_ov + [f"model.vocab_size={vocabs[key]}"]
            cfg = build_run_config(sweep.base_preset, sweep.base_config, base_ov)
        fpt = flops_per_token(cfg.model, cfg.train.seq_len).train_per_token
        steps = steps_for_budget(cfg, **{sweep.budget_kind: sweep.budget})
        for seed in sweep.seeds:
            full = base_ov + [f"train.seed={seed}", f"train.max_steps={steps}"]
            run_cfg = build_run_config(sweep.base_preset, sweep.base_config, full)
            out.append(PlannedRun(variant, seed, full, run_cfg, fpt))
    # seed-major order: every variant's first seed trains before any second seed, so a sweep cut short
    # still compares all variants
    out.sort(key=lambda r: sweep.seeds.index(r.seed))
    return out


def run_state(run_dir: Path, max_steps: int) -> str:
    """'done' (latest checkpoint at max_steps), 'partial' (a checkpoint before it) or 'new'."""
    import json

    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return "new"
    meta = run_dir / "checkpoints" / latest.read_text().strip() / "meta.json"
    try:
        step = json.loads(meta.read_text())["step"]
    except (OSError, ValueError, KeyError):
        return "new"
    return "done" if step >= max_steps else "partial"


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path,
    on_event: Callable[[str, PlannedRun, str], None] | None = None,
    figures: bool = True,
) -> Path:
    """Train every planned run that is not finished yet, then write OUT/report.md and figures.

    Args:
        sweep: from load_sweep.
        out_dir: sweep output directory (one run directory per variant x seed).
        on_event: called with (event, run, detail) for "skip", "start", "resume" and "done".
        figures: draw the figures (tests may turn them off).
    Returns:
        the report path.
    """
    from minimoe.train.run import train_from_config

    out_dir = Path(out_dir)
    runs = plan(sweep)
    for r in runs:
        run_dir = out_dir / r.variant / f"seed_{r.seed}"
        state = run_state(run_dir, r.cfg.train.max_steps)
        if state == "done":
            on_event and on_event("skip", r, "already complete")
            continue
        if state == "new" and run_dir.exists():
            shutil.rmtree(run_dir)  # an attempt that died before its first checkpoint: start clean
        on_event and on_event("resume" if state == "partial" else "start", r, str(run_dir))
        res = train_from_config(
            overrides=None if state == "partial" else r.overrides,
            preset=None if state == "partial" else sweep.base_preset,
            config_path=None if state == "partial" else sweep.base_config,
            run_dir=run_dir,
            resume=state == "partial",
            val_source=sweep.val_data,
            progress=False,
            sample=False,
        )
        on_event and on_event("done", r, f"val_loss {res.val_loss:.4f} in {res.elapsed_s:.0f} s")
    return write_report(sweep, out_dir, runs, figures=figures)


# ---------------------------------------------------------------- report


@dataclass
class RunSummary:
    variant: str
    seed: int
    steps: int
    tokens: int
    train_flops: float
    val_loss: float | None
    val_bpb: float | None
    max_vio_global: float | None  # validation set, mean over layers
    max_vio_batch: float | None  # training batches, mean over the last 10% of logged rows
    tokens_per_s: float | None


def summarize_run(run_dir: Path, r: PlannedRun) -> RunSummary | None:
    """Final numbers of one finished run (None when it has no evaluation yet)."""
    from minimoe.lab.plot import read_metrics

    if not (run_dir / "metrics.jsonl").is_file():
        return None
    train, evals = read_metrics(run_dir / "metrics.jsonl")
    if not evals:
        return None
    last = evals[-1]
    tail = train[-max(1, math.ceil(len(train) / 10)) :] if train else []
    vios = [row["max_vio_mean"] for row in tail if "max_vio_mean" in row]
    # the first logged window includes start-up; leave it out of the speed when there are others
    speeds = [row["tokens_per_s"] for row in train[1:] or train if "tokens_per_s" in row]
    return RunSummary(
        variant=r.variant,
        seed=r.seed,
        steps=last["step"],
        tokens=last["tokens"],
        train_flops=last["tokens"] * r.train_flops_per_token,
        val_loss=last.get("val_loss"),
        val_bpb=last.get("val_bpb"),
        max_vio_global=last.get("val_max_vio_global"),
        max_vio_batch=statistics.fmean(vios) if vios else None,
        tokens_per_s=statistics.median(speeds) if speeds else None,
    )


def mean_std(values: list[float | None], fmt: str = ".4f") -> str:
    """'m ± s' over seeds (sample std), 'm' for one value, '–' when none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{statistics.fmean(vals):{fmt}} ± {statistics.stdev(vals):{fmt.replace('+', '')}}"


def _human(n: float) -> str:
    for div, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}"
    return f"{n:.0f}"


def report_rows(sweep: Sweep, out_dir: Path, runs: list[PlannedRun]) -> list[dict]:
    """One dict per variant with the table's cells and the raw per-seed numbers."""
    rows = []
    for variant in sweep.variants:
        vr = [r for r in runs if r.variant == variant]
        sums = [summarize_run(out_dir / variant / f"seed_{r.seed}", r) for r in vr]
        done = [s for s in sums if s is not None]
        cfg = vr[0].cfg
        rep = count_params(cfg.model)
        rows.append(
            {
                "variant": variant,
                "seeds_done": len(done),
                "seeds": len(vr),
                "steps": cfg.train.max_steps,
                "tokens": cfg.train.max_steps * tokens_per_step(cfg),
                "train_flops": vr[0].train_flops_per_token * cfg.train.max_steps * tokens_per_step(cfg),
                "flops_per_token": vr[0].train_flops_per_token,
                "activated": rep.activated,
                "total": rep.total,
                "cache_bytes": rep.kv_cache_bytes_per_token["bf16"],
                "val_loss": [s.val_loss for s in done],
                "val_loss_by_seed": {s.seed: s.val_loss for s in done if s.val_loss is not None},
                "val_bpb": [s.val_bpb for s in done],
                "max_vio_global": [s.max_vio_global for s in done],
                "max_vio_batch": [s.max_vio_batch for s in done],
                "tokens_per_s": [s.tokens_per_s for s in done],
                "is_moe": cfg.model.n_routed_experts > 0,
            }
        )
    # paired by seed against the first variant: a seed fixes the data order, and much of the
    # seed-to-seed spread is shared by all variants, so per-seed differences are less noisy
    ref = rows[0]["val_loss_by_seed"] if rows else {}
    for r in rows:
        r["delta_vs_first"] = [v - ref[seed] for seed, v in r["val_loss_by_seed"].items() if seed in ref]
    return rows


def markdown_table(rows: list[dict]) -> str:
    head = (
        "| variant | seeds | steps | tokens | train FLOPs | val loss | Δ val loss (paired) | val bpb | MaxVio global (val) "
        "| MaxVio batch (train) | tokens/s | activated params | total params | KV cache B/token (bf16) |"
    )
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for r in rows:
        moe = r["is_moe"]
        lines.append(
            f"| {r['variant']} | {r['seeds_done']}/{r['seeds']} | {r['steps']} | {_human(r['tokens'])} "
            f"| {r['train_flops']:.3g} | {mean_std(r['val_loss'])} "
            f"| {'–' if r is rows[0] else mean_std(r['delta_vs_first'], '+.4f')} | {mean_std(r['val_bpb'])} "
            f"| {mean_std(r['max_vio_global'], '.3f') if moe else '–'} "
            f"| {mean_std(r['max_vio_batch'], '.3f') if moe else '–'} "
            f"| {mean_std(r['tokens_per_s'], '.0f')} | {r['activated']:,} | {r['total']:,} | {r['cache_bytes']:,} |"
        )
    return "\n".join(lines)


def write_report(sweep: Sweep, out_dir: Path, runs: list[PlannedRun], figures: bool = True) -> Path:
    """Write OUT/report.md (table, noise note, per-seed numbers, figures) and return its path."""
    rows = report_rows(sweep, out_dir, runs)
    budget = (
        f"{sweep.budget:,.0f} training tokens"
        if sweep.budget_kind == "tokens"
        else f"{sweep.budget:.3g} training FLOPs (6 x activated matmul parameters + causal attention, per token)"
    )
    parts = [f"# Sweep: {sweep.name}", ""]
    if sweep.description:
        parts += [sweep.description, ""]
    parts += [
        f"Budget: {budget}; seeds {sweep.seeds}; data `{Path(sweep.data).name if sweep.data else 'built-in'}`"
        + (f", validation `{Path(sweep.val_data).name}`" if sweep.val_data else "")
        + ".",
        "",
        "Cells are mean ± sample standard deviation over seeds. Validation numbers are from the final "
        "evaluation; MaxVio batch is the mean over the last 10% of logged training windows; tokens/s is the "
        "median over logging windows (wall clock, noisy on a shared machine). Δ val loss is the "
        f"variant's loss minus `{rows[0]['variant'] if rows else ''}`'s with the same seed (same data "
        "order), mean ± std over seeds; negative is better.",
        "",
        markdown_table(rows),
        "",
        "Per seed (final validation loss):",
        "",
    ]
    for r in rows:
        vals = ", ".join(f"seed {k}: {v:.4f}" for k, v in r["val_loss_by_seed"].items()) or "not run yet"
        parts.append(f"- {r['variant']}: {vals}")
    if figures:
        names = _report_figures(out_dir, runs)
        parts += [""] + [f"![{n}]({n})" for n in names]
    out = out_dir / "report.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


def _report_figures(out_dir: Path, runs: list[PlannedRun]) -> list[str]:
    """Overlaid loss curves (every seed; one colour per variant) and MaxVio (first seed of each MoE
    variant); returns file names in out_dir."""
    from minimoe.lab.plot import _plt, load_run_data, loss_figure, maxvio_figure, moe_runs

    data = []
    for r in sorted(runs, key=lambda r: list(dict.fromkeys(x.variant for x in runs)).index(r.variant)):
        d = out_dir / r.variant / f"seed_{r.seed}"
        if (d / "metrics.jsonl").is_file():
            run = load_run_data(d, f"{r.variant} (seed {r.seed})")
            run.group = r.variant
            data.append(run)
    if not data:
        return []
    plt = _plt()
    names = []
    figs = [
        ("loss_vs_tokens.png", loss_figure(data, "tokens")),
        ("loss_vs_flops.png", loss_figure(data, "flops")),
    ]
    first = list({r.group: r for r in reversed(data)}.values())[::-1]  # first seed of each variant
    if moe_runs(first):
        figs.append(("maxvio.png", maxvio_figure(first)))
    for name, fig in figs:
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names
