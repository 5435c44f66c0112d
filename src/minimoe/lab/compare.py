"""Sweeps: train variants of one base config on the same data with the same seeds, at the same token
budget, the same training FLOPs, the same steps or the same minutes, and write a Markdown report with
figures and paired contrasts (mean, standard error and 95% interval of the per-seed differences).

The sweep file format is in `minimoe compare --help` (minimoe.cli.compare.SWEEP_FORMAT).

A minutes budget sets train.max_minutes and train.clock. `clock: wall` is equal wall-clock time, the
question a user with a machine to themselves asks. `clock: cpu` counts the CPU time of the training
process (time.process_time): with one thread per run (train.threads=1) it is the compute a run used, and
other jobs on a shared machine do not shrink it the way they shrink a wall-clock budget. The LR schedule of
a time-limited run follows the clock (warmup counts steps), so every run finishes its decay.

Run directories: OUT/VARIANT/seed_S. A run whose latest checkpoint already reached its max_steps is
skipped, an unfinished one is resumed, so running the sweep again continues it. Several sweep files may
share one name (and so one output folder): a long sweep split into files that run one at a time, whose
later files reuse the reference variant's runs (a reused run must have the same config). Each such file
names its own report with `report: report_2a.md` (default report.md).
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

SWEEP_KEYS = (
    "name", "description", "base", "data", "val_data", "budget", "seeds", "variants", "contrasts", "report",
)  # fmt: skip
BUDGET_KINDS = ("tokens", "flops", "steps", "minutes")
TIME_BUDGET_MAX_STEPS = 1_000_000  # a minutes budget stops on the clock; this only bounds the step count


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
    shape = "{tokens: N}, {flops: F}, {steps: N} or {minutes: M, clock: wall|cpu}"
    if not isinstance(budget, dict):
        raise MinimoeError(f"sweep file {path}: budget must be {shape}")
    budget = dict(budget)
    clock = budget.pop("clock", None)
    if len(budget) != 1 or next(iter(budget)) not in BUDGET_KINDS:
        raise MinimoeError(f"sweep file {path}: budget must be {shape}")
    kind, value = next(iter(budget.items()))
    if clock is not None and kind != "minutes":
        raise MinimoeError(f"sweep file {path}: budget clock goes with a minutes budget only")
    if clock not in (None, "wall", "cpu"):
        raise MinimoeError(f"sweep file {path}: budget clock must be wall or cpu, got {clock!r}")
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
    contrasts = []
    for c in d.get("contrasts") or []:
        if not (isinstance(c, list) and len(c) == 2 and all(isinstance(v, str) for v in c)):
            raise MinimoeError(f"sweep file {path}: each contrast must be a [variant, reference] pair")
        missing = [v for v in c if v not in variants]
        if missing:
            raise MinimoeError(f"sweep file {path}: contrast names an unknown variant '{missing[0]}'")
        contrasts.append((c[0], c[1]))
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
        clock=clock or "wall",
        contrasts=contrasts,
        report=_report_file(d.get("report", "report.md"), path),
        # neither preset nor config: `minimoe train`'s default, the tiny preset (what the runs train from)
        base_preset=base.get("preset") or (None if base.get("config") else "tiny"),
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
        if sweep.budget_kind == "steps":
            steps, limit = int(sweep.budget), ["train.max_minutes=null"]
        elif sweep.budget_kind == "minutes":
            steps = TIME_BUDGET_MAX_STEPS
            limit = [f"train.max_minutes={sweep.budget}", f"train.clock={sweep.clock}"]
        else:
            # a preset's time limit (tiny has one) must not cut a token or FLOPs budget short
            steps, limit = (
                steps_for_budget(cfg, **{sweep.budget_kind: sweep.budget}),
                ["train.max_minutes=null"],
            )
        for seed in sweep.seeds:
            full = base_ov + limit + [f"train.seed={seed}", f"train.max_steps={steps}"]
            run_cfg = build_run_config(sweep.base_preset, sweep.base_config, full)
            out.append(PlannedRun(variant, seed, full, run_cfg, fpt))
    # seed-major order: every variant's first seed trains before any second seed, so a sweep cut short
    # still compares all variants
    out.sort(key=lambda r: sweep.seeds.index(r.seed))
    return out


def run_state(run_dir: Path, max_steps: int, max_minutes: float | None = None) -> str:
    """'done' (latest checkpoint at max_steps, or at max_minutes on its clock), 'partial' (a checkpoint
    before that) or 'new'."""
    import json

    latest = run_dir / "checkpoints" / "latest"
    if not latest.is_file():
        return "new"
    meta = run_dir / "checkpoints" / latest.read_text().strip() / "meta.json"
    try:
        m = json.loads(meta.read_text())
        step = m["step"]
    except (OSError, ValueError, KeyError):
        return "new"
    # a time budget ends a little early (the trainer stops when the next step and the final evaluation
    # would not fit) and records it in the checkpoint
    if max_minutes is not None and (m.get("out_of_time") or m.get("elapsed_s", 0.0) >= max_minutes * 60):
        return "done"
    return "done" if step >= max_steps else "partial"


def _report_file(name, path: Path) -> str:
    if not isinstance(name, str) or not name.endswith(".md") or Path(name).name != name:
        raise MinimoeError(f"sweep file {path}: report must be a file name ending in .md, got {name!r}")
    return name


def report_name(sweep: Sweep) -> str:
    return sweep.report


def _check_same_config(run_dir: Path, r: PlannedRun) -> None:
    """A run reused from another sweep file must be the run this file plans (model and training alike)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    d = load_yaml(saved)
    want = r.cfg.to_dict()
    for section in ("model", "train"):
        theirs = d.get(section) or {}
        diff = [k for k, v in want[section].items() if k in theirs and theirs[k] != v]
        if diff:
            raise MinimoeError(
                f"{run_dir} was trained with another config ({section}.{diff[0]} = {theirs[diff[0]]!r}, this "
                f"sweep wants {want[section][diff[0]]!r}); use another --out"
            )


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
        _check_same_config(run_dir, r)
        state = run_state(run_dir, r.cfg.train.max_steps, r.cfg.train.max_minutes)
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
    if r.cfg.train.clock == "cpu" and train and train[-1].get("elapsed_s"):
        # a CPU-clock run: tokens per CPU-second of the process, which other jobs do not dilute
        speeds = [train[-1]["tokens"] / train[-1]["elapsed_s"]]
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


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond 30 the normal's 1.96 is
# used; the error is under 2% there)
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def paired_stats(diffs: list[float]) -> dict | None:
    """Mean, standard error and 95% t-interval of per-seed differences; None for fewer than 2."""
    if len(diffs) < 2:
        return None
    n = len(diffs)
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    t = T975[n - 2] if n - 1 <= len(T975) else 1.96
    return {"n": n, "mean": mean, "se": se, "lo": mean - t * se, "hi": mean + t * se}


def _paired(a: dict[int, float | None], b: dict[int, float | None]) -> list[float]:
    return [a[k] - b[k] for k in a if k in b and a[k] is not None and b[k] is not None]


def contrast_rows(sweep: Sweep, rows: list[dict]) -> list[dict]:
    """The sweep's contrasts (default: every variant against the first), paired by seed."""
    by_name = {r["variant"]: r for r in rows}
    pairs = sweep.contrasts or [(r["variant"], rows[0]["variant"]) for r in rows[1:]]
    out = []
    for a, b in pairs:
        ra, rb = by_name[a], by_name[b]
        res = {"variant": a, "reference": b}
        for key in ("val_loss", "val_bpb", "max_vio_batch", "max_vio_global"):
            res[key] = paired_stats(_paired(ra[key + "_by_seed"], rb[key + "_by_seed"]))
        res["both_moe"] = ra["is_moe"] and rb["is_moe"]
        out.append(res)
    return out


def _fmt_stats(st: dict | None, fmt: str = "+.4f") -> str:
    if st is None:
        return "–"
    return f"{st['mean']:{fmt}} ± {st['se']:.4f} [{st['lo']:{fmt}}, {st['hi']:{fmt}}]"


def contrast_table(contrasts: list[dict]) -> str:
    head = (
        "| contrast | seeds | Δ val loss: mean ± SE [95% interval] | resolved | Δ val bpb: mean ± SE [95%] "
        "| Δ MaxVio batch: mean ± SE [95%] |"
    )
    lines = [head, "|" + " --- |" * head.count(" | ") + " --- |"]
    for c in contrasts:
        st = c["val_loss"]
        resolved = "–" if st is None else ("yes" if st["lo"] > 0 or st["hi"] < 0 else "no")
        lines.append(
            f"| {c['variant']} − {c['reference']} | {st['n'] if st else 0} | {_fmt_stats(st)} | {resolved} "
            f"| {_fmt_stats(c['val_bpb'])} | {_fmt_stats(c['max_vio_batch'], '+.3f') if c['both_moe'] else '–'} |"
        )
    return "\n".join(lines)


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
        steps = cfg.train.max_steps
        if sweep.budget_kind == "minutes":  # the clock decides: the mean over finished seeds
            steps = round(statistics.fmean(s.steps for s in done)) if done else 0
        rows.append(
            {
                "variant": variant,
                "seeds_done": len(done),
                "seeds": len(vr),
                "steps": steps,
                "tokens": steps * tokens_per_step(cfg),
                "train_flops": vr[0].train_flops_per_token * steps * tokens_per_step(cfg),
                "flops_per_token": vr[0].train_flops_per_token,
                "activated": rep.activated,
                "total": rep.total,
                "cache_bytes": rep.kv_cache_bytes_per_token["bf16"],
                "val_loss": [s.val_loss for s in done],
                "val_loss_by_seed": {s.seed: s.val_loss for s in done if s.val_loss is not None},
                "val_bpb_by_seed": {s.seed: s.val_bpb for s in done},
                "max_vio_batch_by_seed": {s.seed: s.max_vio_batch for s in done},
                "max_vio_global_by_seed": {s.seed: s.max_vio_global for s in done},
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
    budget = {
        "tokens": f"{sweep.budget:,.0f} training tokens",
        "flops": f"{sweep.budget:.3g} training FLOPs (6 x activated matmul parameters + causal attention, per token)",
        "steps": f"{sweep.budget:,.0f} optimizer steps",
        "minutes": f"{sweep.budget:g} minutes of "
        + ("wall-clock time" if sweep.clock == "wall" else "CPU time of each training process"),
    }[sweep.budget_kind]
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
        "median over logging windows (wall clock, noisy on a shared machine), or tokens per CPU-second for "
        "CPU-clock budgets. Δ val loss is the "
        f"variant's loss minus `{rows[0]['variant'] if rows else ''}`'s with the same seed (same data "
        "order), mean ± std over seeds; negative is better.",
        "",
        markdown_table(rows),
        "",
        "Contrasts, paired by seed: the mean of the per-seed differences, its standard error (std / √n) and "
        "a 95% Student-t interval. A contrast is resolved when its interval excludes 0.",
        "",
        contrast_table(contrast_rows(sweep, rows)),
        "",
        "Per seed (final validation loss):",
        "",
    ]
    for r in rows:
        vals = ", ".join(f"seed {k}: {v:.4f}" for k, v in r["val_loss_by_seed"].items()) or "not run yet"
        parts.append(f"- {r['variant']}: {vals}")
    if figures:
        prefix = "" if sweep.report == "report.md" else Path(sweep.report).stem
        names = _report_figures(out_dir, runs, prefix=prefix)
        parts += [""] + [f"![{n}]({n})" for n in names]
    out = out_dir / report_name(sweep)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


def _report_figures(out_dir: Path, runs: list[PlannedRun], prefix: str = "") -> list[str]:
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
    if any(r.cfg.train.max_minutes is not None for r in runs):
        figs.append(("loss_vs_time.png", loss_figure(data, "time")))
    first = list({r.group: r for r in reversed(data)}.values())[::-1]  # first seed of each variant
    if moe_runs(first):
        figs.append(("maxvio.png", maxvio_figure(first)))
    for name, fig in figs:
        name = f"{prefix}_{name}" if prefix else name
        fig.savefig(out_dir / name, dpi=100)
        plt.close(fig)
        names.append(name)
    return names
