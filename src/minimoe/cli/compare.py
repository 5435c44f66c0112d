"""`minimoe compare SWEEP.yaml`: train the sweep's variants at one token, FLOPs, step or time budget, write
report.md with paired contrasts."""

from __future__ import annotations

import logging
import sys
import time
from pathlib import Path

from minimoe.errors import MinimoeError

SWEEP_FORMAT = """\
The sweep file (YAML):

  name: balancing
  description: one paragraph for the report
  base:                       # what every variant starts from
    preset: tiny              # optional; no preset and no config: tiny (as `minimoe train`)
    config: base.yaml         # optional, relative to the sweep file
    overrides: [model.hidden_size=128, train.seq_len=128, ...]
  data: ../data/train.txt     # relative to the sweep file; `--data` on the command line wins
  val_data: ../data/valid.txt # optional
  budget: {tokens: 400000}    # or {flops: 2.0e12}: max_steps is computed per variant; or {steps: N};
                              # or {minutes: M, clock: wall|cpu}: every run trains for M minutes
  seeds: [1, 2]
  variants:                   # name -> dotted overrides applied on top of the base
    none: [model.aux_free_bias=false]
    bias: [model.aux_free_bias=true]
    wide: {model: {hidden_size: 256}}  # a mapping (nested or dotted keys) does too
  contrasts:                  # optional: [variant, reference] pairs; default every variant vs the first
    - [bias, none]
  equivalence: 0.02           # optional: a contrast whose 95% interval lies inside +-0.02 nats of val
                              # loss is reported as equal (without it, such a contrast stays unresolved)
  report: report.md           # optional: the report's file name (split sweeps sharing a folder)

Relative paths are relative to the sweep file. Run directories are OUT/VARIANT/seed_S. A minutes budget
with clock: cpu counts each training process's CPU time (fair on a shared machine when every run uses
one thread, train.threads=1); clock: wall counts wall time. Several files may share one name and folder
(a long sweep split in parts): later files reuse the earlier runs of a variant with the same config."""


def add_parser(sub) -> None:
    p = sub.add_parser(
        "compare",
        help="train variants of a config at equal tokens, FLOPs, steps or minutes and write a report",
        description="Train every variant x seed of a sweep file at the same budget: tokens, training FLOPs "
        "(max_steps computed per variant from exact activated-parameter FLOPs), steps, or minutes of wall "
        "clock or of CPU time; then write report.md (mean ± std over seeds, and paired contrasts with "
        "standard errors and 95% intervals) and figures. Finished runs are skipped and unfinished ones "
        "resumed, so a rerun continues the sweep.",
        epilog=SWEEP_FORMAT,
    )
    p.add_argument("sweep", help="sweep YAML file (format below)")
    p.add_argument("--out", help="output directory (default: runs/sweeps/<sweep name>)")
    p.add_argument("--data", help="training data, replacing the sweep file's `data`")
    p.add_argument("--val-data", help="validation data, replacing the sweep file's `val_data`")
    p.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="runs trained at the same time, one process each (default 1; give runs train.threads=1 and "
        "use at most one job per core)",
    )
    p.add_argument("--plan", action="store_true", help="print the runs and their budgets, train nothing")
    p.add_argument("--report-only", action="store_true", help="rewrite report.md from the runs already there")


def run(args) -> int:
    from minimoe.lab.compare import load_sweep, plan
    from minimoe.lab.runs import report_only, run_sweep

    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stderr)
    # per-step dead-expert warnings would drown the sweep's own progress lines; the report has MaxVio
    logging.getLogger("minimoe.train").setLevel(logging.ERROR)
    if args.jobs < 1:
        raise MinimoeError(f"--jobs must be at least 1, got {args.jobs}")
    sweep = load_sweep(args.sweep, data=args.data, val_data=args.val_data)
    out = Path(args.out or f"runs/sweeps/{sweep.name}")
    if args.plan or args.report_only:
        runs = plan(sweep)
        if args.plan:
            for r in runs:
                t = r.cfg.train
                tokens = t.max_steps * t.batch_size * t.seq_len * t.grad_accum
                if t.max_minutes is not None:
                    print(
                        f"{r.name:32s} {t.max_minutes:g} min ({t.clock} clock)  "
                        f"FLOPs/token {r.train_flops_per_token:,.0f}"
                    )
                    continue
                print(
                    f"{r.name:32s} steps {t.max_steps:6d}  tokens {tokens:>11,}  "
                    f"FLOPs/token {r.train_flops_per_token:,.0f}  total FLOPs {r.train_flops_per_token * tokens:.3g}"
                )
            return 0
        if not any((out / r.variant / f"seed_{r.seed}").is_dir() for r in runs):
            raise MinimoeError(
                f"{out} holds no run of this sweep (train them with `minimoe compare {args.sweep}`, or name "
                "their folder with --out)"
            )
        print(f"report: {report_only(sweep, out, runs)}")
        return 0
    if out.exists() and not out.is_dir():  # found out before any run starts
        raise MinimoeError(f"--out {out} exists and is not a directory")
    t0 = time.perf_counter()
    failed = []

    def event(kind: str, r, detail: str) -> None:
        if kind == "failed":
            failed.append(r.name)
        stamp = f"[{(time.perf_counter() - t0) / 60:5.1f} min]"
        t = r.cfg.train
        limit = f"{t.max_minutes:g} {t.clock} min" if t.max_minutes is not None else f"{t.max_steps} steps"
        print(f"{stamp} {kind:6s} {r.name}  ({limit})  {detail}", flush=True)

    report = run_sweep(sweep, out, on_event=event, jobs=args.jobs)
    print(f"report: {report}")
    if failed:
        sys.stderr.write(
            f"minimoe compare: error: {len(failed)} run{'s' * (len(failed) > 1)} failed ({', '.join(failed)}); "
            "the report leaves them out\n"
        )
        return 1
    return 0
