"""Sweep reports: per-run summaries read from the run directories, paired contrasts by seed (mean,
standard error, 95% t-interval), the Markdown table and the figures that `minimoe compare` writes."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from minimoe.errors import missing_package
from minimoe.lab.flops import tokens_per_step
from minimoe.lab.sweep import FAILED_MARKER, PlannedRun, Sweep, run_state
from minimoe.params import count_params
from minimoe.provenance import history_label

log = logging.getLogger("minimoe.lab")


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
    code: str | None = None  # the code that trained it (minimoe.provenance.history_label), None if unrecorded


def summarize_run(run_dir: Path, r: PlannedRun) -> RunSummary | None:
    """Final numbers of one finished run (None when it has not reached its budget: a run stopped
    half-way has an evaluation, but not the final one)."""
    from minimoe.lab.plot import read_metrics

    if not (run_dir / "metrics.jsonl").is_file():
        return None
    if run_state(run_dir, r.cfg.train.max_steps, r.cfg.train.max_minutes) != "done":
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
        code=_run_code(run_dir),
    )


def _run_code(run_dir: Path) -> str | None:
    """The code label its latest checkpoint recorded, every version in turn where the run was resumed under
    other code (None without a checkpoint, or one saved before the record)."""
    from minimoe.train.checkpoint import latest_checkpoint

    ckpt = latest_checkpoint(run_dir)
    try:
        meta = json.loads((ckpt / "meta.json").read_text(encoding="utf-8")) if ckpt else {}
    except (OSError, ValueError):
        return None
    return history_label(meta)


def code_note(rows: list[dict], time_budget: bool) -> str:
    """One paragraph naming the code that trained the report's runs; where it differs between runs, which
    runs each version trained (under a time budget a faster version trains more: not like for like)."""
    by_code: dict[str | None, list[str]] = {}
    for r in rows:
        for seed, code in r["code_by_seed"].items():
            by_code.setdefault(code, []).append(f"{r['variant']}/{seed}")
    if not by_code:
        return ""
    names = {c: c or "code not recorded (checkpoints written before minimoe recorded it)" for c in by_code}
    if len(by_code) == 1:
        return f"Code: every run was trained by {names[next(iter(by_code))]}."
    parts = [f"{names[c]}: {', '.join(runs)}" for c, runs in by_code.items()]
    warn = (
        " Under a time budget a faster version trains further in the same minutes: compare runs of one version."
        if time_budget
        else ""
    )
    return f"Code: the runs were trained by {len(by_code)} versions; " + "; ".join(parts) + "." + warn


def mean_std(values: list[float | None], fmt: str = ".4f") -> str:
    """'m ± s' over seeds (sample std), 'm' for one value, '–' when none."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    bad = sum(not math.isfinite(v) for v in vals)
    if bad:  # statistics.stdev cannot take NaN or inf (it raises)
        return f"not finite in {bad} of {len(vals)} seeds"
    if len(vals) == 1:
        return format(vals[0], fmt)
    return f"{statistics.fmean(vals):{fmt}} ± {statistics.stdev(vals):{fmt.replace('+', '')}}"


# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond, `t975` expands it)
T975 = (
    12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
    2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042,
)  # fmt: skip


def paired_stats(diffs: list[float]) -> dict | None:
    """Mean, standard error and 95% t-interval of per-seed differences; None for fewer than 2, or when
    one is NaN or inf (a diverged seed: no interval, and so no verdict)."""
    if len(diffs) < 2 or not all(math.isfinite(d) for d in diffs):
        return None
    n = len(diffs)
    mean = statistics.fmean(diffs)
    se = statistics.stdev(diffs) / math.sqrt(n)
    t = t975(n - 1)
    return {"n": n, "mean": mean, "se": se, "lo": mean - t * se, "hi": mean + t * se}


def t975(df: int) -> float:
    """Two-sided 95% quantile of Student's t with `df` degrees of freedom: the table up to 30, beyond it
    the normal quantile's Cornish-Fisher expansion in 1/df (Abramowitz & Stegun 26.7.5; within 1e-5)."""
    if df <= len(T975):
        return T975[df - 1]
    z = 1.959963984540054  # the normal's 97.5% quantile
    g = (
        (z**3 + z) / 4,
        (5 * z**5 + 16 * z**3 + 3 * z) / 96,
        (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384,
        (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160,
    )
    return z + sum(gi / df ** (i + 1) for i, gi in enumerate(g))


def seeds_to_resolve(st: dict | None, limit: int = 1000) -> int | None:
    """Seeds at which a contrast with this mean and this per-seed spread would resolve (its 95%
    interval exclude 0): the smallest n with t(n - 1) * sd / sqrt(n) < |mean|. A planning number for
    the next run, not a result (the mean itself moves as seeds are added). None when the mean is 0 or
    it would take more than `limit`."""
    if st is None:
        return None
    sd, mean = st["se"] * math.sqrt(st["n"]), abs(st["mean"])
    for n in range(2, limit + 1):
        if t975(n - 1) * sd / math.sqrt(n) < mean:
            return n
    return None


def _paired(a: dict[int, float | None], b: dict[int, float | None]) -> list[float]:
    return [a[k] - b[k] for k in a if k in b and a[k] is not None and b[k] is not None]


def contrast_rows(sweep: Sweep, rows: list[dict]) -> list[dict]:
    """The sweep's contrasts (default: every variant against the first), paired by seed."""
    by_name = {r["variant"]: r for r in rows}
    pairs = sweep.contrasts or [(r["variant"], rows[0]["variant"]) for r in rows[1:]]
    out = []
    for a, b in pairs:
        ra, rb = by_name[a], by_name[b]
        # nats per token do not compare across tokenizers: bits per byte of the same text do
        measure = "val_loss" if ra.get("tokenizer") == rb.get("tokenizer") else "val_bpb"
        res = {"variant": a, "reference": b, "measure": measure}
        for key in ("val_loss", "val_bpb", "max_vio_batch", "max_vio_global"):
            res[key] = paired_stats(_paired(ra[key + "_by_seed"], rb[key + "_by_seed"]))
        res["seeds"] = len(_paired(ra["val_loss_by_seed"], rb["val_loss_by_seed"]))
        # seeds of the sweep without a pair (a run not finished, failed or diverged): the verdict stands
        # on the others, which may not be a random subset (a variant that diverges on its hardest seeds)
        res["unpaired"] = [
            s for s in sweep.seeds
            if any(r["val_loss_by_seed"].get(s) is None for r in (ra, rb))
        ]  # fmt: skip
        res["failed"] = [s for s in res["unpaired"] if s in ra["failed_seeds"] or s in rb["failed_seeds"]]
        res["both_moe"] = ra["is_moe"] and rb["is_moe"]
        res["equivalence"] = sweep.equivalence if measure == "val_loss" else None  # a margin in nats
        out.append(res)
    return out


def _fmt_stats(st: dict | None, fmt: str = "+.4f") -> str:
    if st is None:
        return "–"
    return f"{st['mean']:{fmt}} ± {st['se']:.4f} [{st['lo']:{fmt}}, {st['hi']:{fmt}}]"


def _table(columns: list[tuple[str, Callable[[dict], str]]], items: list[dict]) -> str:
    """A Markdown table: one column per (header, cell of an item), one line per item."""
    lines = ["| " + " | ".join(head for head, _ in columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(cell(item) for _, cell in columns) + " |" for item in items]
    return "\n".join(lines)


def verdict(st: dict | None, equivalence: float | None = None) -> str:
    """What a contrast's 95% interval decides: a difference when it excludes 0 ("lower" or "higher"),
    a tie when it lies inside +-equivalence (when the sweep sets a margin), else nothing yet."""
    if st is None:
        return "–"
    if st["hi"] < 0:
        return "yes: lower"
    if st["lo"] > 0:
        return "yes: higher"
    if equivalence is not None and -equivalence < st["lo"] and st["hi"] < equivalence:
        return f"yes: equal within ±{equivalence:g}"
    return "no"


def _verdict_cell(c: dict) -> str:
    """The verdict, marked provisional where it rests on fewer seeds than the sweep has: the seeds left
    out (failed, or not finished yet) need not be a random subset, as when a variant fails on its hardest
    seeds."""
    v = verdict(c[_measure(c)], c["equivalence"])
    if v.startswith("yes") and c.get("unpaired"):
        failed = len(c.get("failed", []))
        rest = len(c["unpaired"]) - failed
        why = [f"{failed} failed"] * bool(failed) + [f"{rest} not finished"] * bool(rest)
        v += f" (provisional: {c['seeds']} of {c['seeds'] + len(c['unpaired'])} seeds; {', '.join(why)})"
    if v != "–" and _measure(c) == "val_bpb":
        v += " (on val bpb: the tokenizers differ)"
    return v


def _measure(c: dict) -> str:
    """What a contrast's verdict and seed count are decided on: val_loss, or val_bpb across tokenizers."""
    return c.get("measure", "val_loss")


def _seeds_cell(c: dict) -> str:
    """The planning number for a contrast not yet resolved; "–" once its interval decides it (a tie
    within the margin needs no interval that excludes 0)."""
    st = c[_measure(c)]
    if st is None or verdict(st, c["equivalence"]) != "no":
        return "–"
    n = seeds_to_resolve(st)
    return "> 1000" if n is None else str(n)


def _pairs_cell(c: dict) -> str:
    """The seeds paired, and which of the sweep's seeds have no pair yet: "3 (of 5; not 2, 4)"."""
    if not c.get("unpaired"):
        return str(c["seeds"])
    missing = ", ".join(str(s) for s in c["unpaired"])
    return f"{c['seeds']} (of {c['seeds'] + len(c['unpaired'])}; not {missing})"


def _loss_cell(c: dict) -> str:
    if _measure(c) == "val_bpb":
        return "tokenizers differ: see Δ val bpb"
    if c["val_loss"] is None and c["seeds"] == 1:  # one difference has no spread: no SE, no interval
        return "1 seed: no interval (needs 2)"
    if c["val_loss"] is None and c["seeds"] >= 2:
        return "not finite: a seed's loss is NaN or inf"
    return _fmt_stats(c["val_loss"])


def contrast_table(contrasts: list[dict]) -> str:
    return _table(
        [
            ("contrast", lambda c: f"{c['variant']} − {c['reference']}"),
            ("seeds", _pairs_cell),
            ("Δ val loss: mean ± SE [95% interval]", _loss_cell),
            ("resolved", _verdict_cell),
            ("seeds to resolve at this mean and spread", _seeds_cell),
            ("Δ val bpb: mean ± SE [95%]", lambda c: _fmt_stats(c["val_bpb"])),
            (
                "Δ MaxVio batch: mean ± SE [95%]",
                lambda c: _fmt_stats(c["max_vio_batch"], "+.3f") if c["both_moe"] else "–",
            ),
        ],
        contrasts,
    )


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
        failed = [
            r.seed
            for r, s in zip(vr, sums)
            if s is None and (out_dir / variant / f"seed_{r.seed}" / FAILED_MARKER).is_file()
        ]
        cfg = vr[0].cfg
        rep = count_params(cfg.model)
        steps = cfg.train.max_steps
        if sweep.budget_kind == "minutes":  # the clock decides: the mean over finished seeds
            steps = round(statistics.fmean(s.steps for s in done)) if done else 0
        rows.append(
            {
                "variant": variant,
                "seeds_done": len(done),
                "failed_seeds": failed,  # its last attempt stopped with an error (not merely unfinished)
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
                "code_by_seed": {s.seed: s.code for s in done},
                "is_moe": cfg.model.n_routed_experts > 0,
                "tokenizer": cfg.data.tokenizer,
            }
        )
    # paired by seed against the first variant: a seed fixes the data order, and much of the
    # seed-to-seed spread is shared by all variants, so per-seed differences are less noisy
    ref = rows[0]["val_loss_by_seed"] if rows else {}
    for r in rows:
        r["delta_vs_first"] = [v - ref[seed] for seed, v in r["val_loss_by_seed"].items() if seed in ref]
    return rows


def markdown_table(rows: list[dict]) -> str:
    return _table(
        [
            ("variant", lambda r: r["variant"]),
            ("seeds", lambda r: f"{r['seeds_done']}/{r['seeds']}"),
            ("steps", lambda r: str(r["steps"])),
            ("tokens", lambda r: _human(r["tokens"])),
            ("train FLOPs", lambda r: f"{r['train_flops']:.3g}"),
            ("val loss", lambda r: mean_std(r["val_loss"])),
            ("Δ val loss (paired)", lambda r: "–" if r is rows[0] else mean_std(r["delta_vs_first"], "+.4f")),
            ("val bpb", lambda r: mean_std(r["val_bpb"])),
            ("MaxVio global (val)", lambda r: mean_std(r["max_vio_global"], ".3f") if r["is_moe"] else "–"),
            ("MaxVio batch (train)", lambda r: mean_std(r["max_vio_batch"], ".3f") if r["is_moe"] else "–"),
            ("tokens/s", lambda r: mean_std(r["tokens_per_s"], ".0f")),
            ("activated params", lambda r: f"{r['activated']:,}"),
            ("total params", lambda r: f"{r['total']:,}"),
            ("KV cache B/token (bf16)", lambda r: f"{r['cache_bytes']:,}"),
        ],
        rows,
    )


def write_report(sweep: Sweep, out_dir: Path, runs: list[PlannedRun], figures: bool = True) -> Path:
    """Write OUT/report.md (table, noise note, per-seed numbers, figures) and return its path."""
    rows = report_rows(sweep, out_dir, runs)
    contrasts = contrast_rows(sweep, rows)
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
        "a 95% Student-t interval (which needs at least 2 seeds done by both). A contrast is resolved when its interval excludes 0 (a difference)"
        + (
            f" or lies inside ±{sweep.equivalence:g} nats (equal to within that margin, the sweep's `equivalence`)."
            if sweep.equivalence is not None
            else "."
        )
        + " A verdict that rests on fewer seeds than the sweep has (runs failed or not finished) is marked "
        "provisional: the seeds left out need not be a random subset (a variant may fail on its hardest seeds).",
        *_tokenizer_note(sweep, contrasts),
        "",
        contrast_table(contrasts),
        "",
        "Per seed (final validation loss):",
        "",
    ]
    for r in rows:
        vals = ", ".join(f"seed {k}: {v:.4f}" for k, v in r["val_loss_by_seed"].items()) or "none done"
        parts.append(f"- {r['variant']}: {vals}")
    note = code_note(rows, sweep.budget_kind == "minutes")
    if note:
        parts += ["", note]
    if figures and importlib.util.find_spec("matplotlib") is None:  # the numbers need no figures
        note = f"Figures: not drawn, they need {missing_package('matplotlib')}."
        log.warning("%s", note)
        parts += ["", note]
    elif figures:
        prefix = "" if sweep.report == "report.md" else Path(sweep.report).stem
        names = _report_figures(out_dir, runs, prefix=prefix)
        parts += [""] + [f"![{n}]({n})" for n in names]
    out = out_dir / sweep.report
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(parts) + "\n", encoding="utf-8")
    return out


def _tokenizer_note(sweep: Sweep, contrasts: list[dict]) -> list[str]:
    """A paragraph for contrasts between variants that read the data with different tokenizers."""
    across = [f"{c['variant']} − {c['reference']}" for c in contrasts if _measure(c) == "val_bpb"]
    if not across:
        return []
    text = (
        f"Contrasts between variants with different tokenizers ({', '.join(across)}) are decided on validation "
        "bits per byte, and their seeds to resolve counted on it: nats per token do not compare across "
        "tokenizers."
    )
    if sweep.budget_kind != "minutes":
        text += (
            f" At an equal budget of {'training FLOPs' if sweep.budget_kind == 'flops' else sweep.budget_kind}, such "
            "variants also train on different amounts of text (a token holds more bytes under one tokenizer)."
        )
    return ["", text]


def _report_figures(out_dir: Path, runs: list[PlannedRun], prefix: str = "") -> list[str]:
    """Overlaid loss curves (every finished seed, as in the tables; one colour per variant) and MaxVio
    (first finished seed of each MoE variant); returns file names in out_dir."""
    from minimoe.lab.plot import _plt, load_run_data, loss_figure, maxvio_figure, moe_runs

    data = []
    for r in sorted(runs, key=lambda r: list(dict.fromkeys(x.variant for x in runs)).index(r.variant)):
        d = out_dir / r.variant / f"seed_{r.seed}"
        if (d / "metrics.jsonl").is_file() and run_state(
            d, r.cfg.train.max_steps, r.cfg.train.max_minutes
        ) == "done":
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
