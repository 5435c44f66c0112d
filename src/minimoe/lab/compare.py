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
import signal
from collections.abc import Callable
from functools import partial
from pathlib import Path

from minimoe.config import RunConfig
from minimoe.config_yaml import build_run_config, load_yaml
from minimoe.errors import ConfigError, MinimoeError
from minimoe.files import make_dir
from minimoe.lab.flops import flops_per_token, steps_for_budget
from minimoe.lab.report import write_report
from minimoe.lab.sweep import PlannedRun, Sweep, run_state
from minimoe.lab.workers import signals_to_workers, worker_signals
from minimoe.presets import TOKENIZER_FALLBACKS

SWEEP_KEYS = (
    "name", "description", "base", "data", "val_data", "budget", "seeds", "variants", "contrasts", "equivalence",
    "report",
)  # fmt: skip
BUDGET_KINDS = ("tokens", "flops", "steps", "minutes")
TIME_BUDGET_MAX_STEPS = 1_000_000  # a minutes budget stops on the clock; this only bounds the step count


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
        if not _folder_name(name):
            raise MinimoeError(f"sweep file {path}: variant name {name!r} cannot be a directory name")
    if d.get("name") is not None and not _folder_name(str(d["name"])):  # the default out: runs/sweeps/NAME
        raise MinimoeError(f"sweep file {path}: name {d['name']!r} cannot be a directory name")
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
        if isinstance(value, bool):  # float(True) is 1.0: `steps: true` is no budget of 1 step
            raise TypeError
        value = float(value)
    except (TypeError, ValueError):
        raise MinimoeError(f"sweep file {path}: budget {kind} must be a number, got {value!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise MinimoeError(f"sweep file {path}: budget {kind} must be a positive finite number, got {value}")
    if kind == "steps" and value != int(value):  # int() would train 2.7 as 2 steps, and 0.5 as none
        raise MinimoeError(f"sweep file {path}: budget steps must be a whole number, got {value:g}")
    seeds = d.get("seeds", [1337])
    if (
        not isinstance(seeds, list)
        or not seeds
        or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    ):
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
    for key, v in (("base.preset", base.get("preset")), ("base.config", base.get("config")),
                   ("data", d.get("data")), ("val_data", d.get("val_data"))):  # fmt: skip
        if v is not None and not isinstance(v, str):
            raise MinimoeError(f"sweep file {path}: {key} must be a name or a path, got {v!r}")
    if not isinstance(d.get("contrasts") or [], list):
        raise MinimoeError(f"sweep file {path}: contrasts must be a list of [variant, reference] pairs")
    contrasts = []
    for c in d.get("contrasts") or []:
        if not (isinstance(c, list) and len(c) == 2 and all(isinstance(v, str) for v in c)):
            raise MinimoeError(f"sweep file {path}: each contrast must be a [variant, reference] pair")
        missing = [v for v in c if v not in variants]
        if missing:
            raise MinimoeError(f"sweep file {path}: contrast names an unknown variant '{missing[0]}'")
        if c[0] == c[1]:
            raise MinimoeError(f"sweep file {path}: contrast [{c[0]}, {c[1]}] compares a variant with itself")
        contrasts.append((c[0], c[1]))
    equivalence = d.get("equivalence")
    if equivalence is not None:
        try:  # YAML reads 1e-2 (no dot) as a string: take numeric strings too
            margin = None if isinstance(equivalence, bool) else float(equivalence)
        except (TypeError, ValueError, OverflowError):
            margin = None
        if margin is None or not (math.isfinite(margin) and margin > 0):
            raise MinimoeError(
                f"sweep file {path}: equivalence must be a positive margin in nats of val loss (e.g. 0.02), "
                f"got {equivalence!r}"
            )
        equivalence = margin
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
        equivalence=equivalence,
        report=_report_file(d.get("report", "report.md"), path),
        # neither preset nor config: `minimoe train`'s default, the tiny preset (what the runs train from)
        base_preset=base.get("preset") or (None if base.get("config") else "tiny"),
        base_config=_resolve_path(base.get("config"), here),
        base_overrides=_override_list(base.get("overrides"), "base.overrides"),
        data=_resolve_path(data, cwd) if data else _resolve_path(d.get("data"), here),
        val_data=_resolve_path(val_data, cwd) if val_data else _resolve_path(d.get("val_data"), here),
    )


def _folder_name(name) -> bool:
    """Whether `name` is one folder's name (no separator, not hidden, not `..`)."""
    return (
        isinstance(name, str)
        and bool(name)
        and "/" not in name
        and "\\" not in name
        and not name.startswith(".")
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


def _auto_precision(cfg: RunConfig) -> str:
    """What train.precision=auto becomes for runs of `cfg` (bf16 or fp32 on a CPU, by a timing), decided
    at the runs' thread count."""
    import torch

    from minimoe.dist.init import resolve_device
    from minimoe.infer.common import num_threads
    from minimoe.train.precision import resolve_precision

    with num_threads(cfg.train.threads or torch.get_num_threads()):
        return resolve_precision("auto", resolve_device(cfg.train.device))


def _sets_vocab(config_path: str | None, overrides: list[str]) -> bool:
    """Whether the config file or the overrides set model.vocab_size (`minimoe train` keeps it then)."""
    if any(o.split("=", 1)[0].strip() == "model.vocab_size" for o in overrides):
        return True
    return config_path is not None and "vocab_size" in (load_yaml(config_path).get("model") or {})


def plan(sweep: Sweep) -> list[PlannedRun]:
    """Resolve every variant x seed: config, training FLOPs per token, and max_steps from the budget.

    The data is prepared (tokenizer trained, text tokenized) once per source here, before any run's
    clock starts, so no run pays for it. Unless the base config or the overrides set it, the vocabulary
    is fitted to the tokenizer (as `minimoe train` does) and pinned with an explicit `model.vocab_size`,
    so that the FLOPs count here is the model that trains. `train.precision=auto` is decided here, once
    per device and thread count, and pinned: runs timed in their own processes (two at a time, on a busy
    machine) could otherwise decide differently and not compare.
    """
    _check_sources(sweep)
    data_ov = [f"data.path={sweep.data}"] if sweep.data else []
    vocabs: dict[tuple, int] = {}  # (data source, tokenizer) -> fitted vocab size
    precisions: dict[tuple, str] = {}  # (device, threads) -> what auto is there
    out = []
    for variant, ov in sweep.variants.items():
        base_ov = sweep.base_overrides + ov + data_ov
        try:
            cfg = build_run_config(sweep.base_preset, sweep.base_config, base_ov)
        except ConfigError as e:
            raise MinimoeError(f"sweep {sweep.name}, variant '{variant}': {e}") from None
        if cfg.train.early_stop_patience:
            # an early stop ends a run before its budget: the report would never count it (it is not done)
            # and a rerun could not resume it
            raise MinimoeError(
                f"sweep {sweep.name}, variant '{variant}': train.early_stop_patience="
                f"{cfg.train.early_stop_patience} would end runs before the budget the sweep compares them "
                "at; set it to 0"
            )
        if not (sweep.val_data or cfg.data.val_path) and cfg.data.val_fraction == 0:
            # such runs train without validation (the trainer allows it) and leave nothing to compare
            raise MinimoeError(
                f"sweep {sweep.name}, variant '{variant}': a sweep compares validation losses, but with no "
                "val_data and data.val_fraction=0 these runs have none; give val_data or set "
                "data.val_fraction above 0"
            )
        if sweep.budget_kind == "minutes" and sweep.clock == "cpu" and cfg.train.threads != 1:
            raise MinimoeError(
                f"sweep {sweep.name}, variant '{variant}': a CPU-clock budget counts the CPU time of every "
                f"thread of a run, OpenMP workers spinning between products included, so runs on "
                f"train.threads={cfg.train.threads} would not be charged alike; add train.threads=1 to the "
                "base overrides (and run several at a time with --jobs)"
            )
        key = (cfg.data.path, cfg.data.tokenizer, cfg.data.text_field, cfg.data.val_fraction)
        fitted = not _sets_vocab(sweep.base_config, base_ov)
        if key not in vocabs:
            try:
                vocabs[key] = _fitted_vocab(cfg, sweep.val_data)  # prepares the data, before any run
            except MinimoeError:
                if fitted:
                    raise
                # a set vocabulary needs nothing from here: the runs prepare what they train on (a seed
                # preset whose tokenizer is missing trains its stated fallback), and say what is wrong
                vocabs[key] = cfg.model.vocab_size
        if fitted:
            base_ov = base_ov + [f"model.vocab_size={vocabs[key]}"]
            cfg = build_run_config(sweep.base_preset, sweep.base_config, base_ov)
        if cfg.train.precision == "auto":
            where = (cfg.train.device, cfg.train.threads)
            if where not in precisions:
                precisions[where] = _auto_precision(cfg)
            base_ov = base_ov + [f"train.precision={precisions[where]}"]
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


def _report_file(name, path: Path) -> str:
    if not isinstance(name, str) or not name.endswith(".md") or Path(name).name != name:
        raise MinimoeError(f"sweep file {path}: report must be a file name ending in .md, got {name!r}")
    return name


def _source(p: str | None) -> str | None:
    """A data source as a run's config.yaml records it (training makes paths absolute)."""
    if p is None or p.startswith("hf:"):
        return p
    return str(Path(p).expanduser().resolve())


def _trained_preset(sweep: Sweep) -> str | None:
    """The preset the sweep's runs train, whose fallback tokenizer they may have used: the base config
    file's `preset:` key wins over the base preset (as in `build_run_config` and `train_from_config`)."""
    if sweep.base_config is not None:
        return load_yaml(sweep.base_config).get("preset", sweep.base_preset)
    return sweep.base_preset


def _check_same_config(
    run_dir: Path, r: PlannedRun, val_data: str | None = None, preset: str | None = None
) -> None:
    """A run reused from another sweep file must be the run this file plans (model and training alike,
    on the same training and validation data, read with the same tokenizer; a run may have trained with
    the preset's fallback tokenizer in place of a named one it did not find)."""
    saved = run_dir / "config.yaml"
    if not saved.is_file():
        return
    d = load_yaml(saved)
    data = d.get("data") or {}
    for key, want_src in (("path", r.cfg.data.path), ("val_path", val_data or r.cfg.data.val_path)):
        if key in data and _source(data[key]) != _source(want_src):
            raise MinimoeError(
                f"{run_dir} was trained on other data (data.{key} = {data[key]!r}, this sweep wants "
                f"{_source(want_src)!r}); use another --out"
            )
    # what is read from the sources and how validation is split off (not where the cache is)
    for key in ("tokenizer", "text_field", "glob", "val_fraction"):
        want_v = getattr(r.cfg.data, key)
        fallback = TOKENIZER_FALLBACKS.get(preset) if key == "tokenizer" else None
        if key in data and data[key] not in (want_v, fallback or want_v):
            raise MinimoeError(
                f"{run_dir} was trained on other data (data.{key} = {data[key]!r}, this sweep wants "
                f"{want_v!r}); use another --out"
            )
    want = r.cfg.to_dict()  # train.precision as `plan` pinned it, where the sweep says auto
    for section in ("model", "train"):
        theirs = d.get(section) or {}
        diff = [k for k, v in want[section].items() if k in theirs and theirs[k] != v]
        if diff:
            raise MinimoeError(
                f"{run_dir} was trained with another config ({section}.{diff[0]} = {theirs[diff[0]]!r}, this "
                f"sweep wants {want[section][diff[0]]!r}); use another --out"
            )


def _train_run(kwargs: dict, train_log_level: int) -> tuple[float, float, str]:
    """One run of a sweep (top level, so a worker process can run it): (val_loss, elapsed_s, why it
    stopped)."""
    import logging

    from minimoe.train.run import train_from_config

    logging.getLogger("minimoe.train").setLevel(train_log_level)
    res = train_from_config(**kwargs)
    return res.val_loss, res.elapsed_s, res.stopped


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path,
    on_event: Callable[[str, PlannedRun, str], None] | None = None,
    figures: bool = True,
    jobs: int = 1,
) -> Path:
    """Train every planned run that is not finished yet, then write OUT/report.md and figures.

    Args:
        sweep: from load_sweep.
        out_dir: sweep output directory (one run directory per variant x seed).
        on_event: called with (event, run, detail) for "skip", "start", "resume", "done", "failed" (a
            run that stopped with an error, e.g. diverged: the other runs still train, the report leaves
            it out, and a rerun tries it again) and "stopped" (interrupted: the sweep raises
            KeyboardInterrupt).
        figures: draw the figures (tests may turn them off).
        jobs: runs trained at the same time, each in its own process (give each run
            train.threads=1 and at most one job per core, or they slow each other down).
    Returns:
        the report path.
    """
    import logging
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    out_dir = Path(out_dir)
    make_dir(out_dir, f"the sweep's output directory {out_dir}")  # before any run, not once per run
    runs = plan(sweep)
    todo = []
    preset = _trained_preset(sweep)
    for r in runs:
        run_dir = out_dir / r.variant / f"seed_{r.seed}"
        state = run_state(run_dir, r.cfg.train.max_steps, r.cfg.train.max_minutes)
        if state != "new":  # a run without a checkpoint starts clean below, whatever config it had
            _check_same_config(run_dir, r, sweep.val_data, preset)
        if state == "done":
            on_event and on_event("skip", r, "already complete")
            continue
        if state == "new" and run_dir.exists():
            shutil.rmtree(run_dir)  # an attempt that died before its first checkpoint: start clean
        kwargs = dict(
            overrides=None if state == "partial" else r.overrides,
            preset=None if state == "partial" else sweep.base_preset,
            config_path=None if state == "partial" else sweep.base_config,
            run_dir=run_dir,
            resume=state == "partial",
            val_source=sweep.val_data,
            progress=False,
            sample=False,
        )
        todo.append((r, "resume" if state == "partial" else "start", kwargs))
    level = logging.getLogger("minimoe.train").getEffectiveLevel()

    def finished(r: PlannedRun, result: Callable[[], tuple[float, float, str]]) -> bool:
        """Report how a run ended; True when it was interrupted (and the sweep must stop)."""
        try:
            val_loss, elapsed, stopped = result()
        except MinimoeError as e:  # one diverged variant must not keep every later run from training
            on_event and on_event("failed", r, str(e))
            return False
        if stopped == "interrupted":
            # the trainer took the Ctrl-C (or SIGTERM) and saved a checkpoint: it was meant for the
            # sweep, which stops too instead of starting the next run; a rerun resumes this one
            on_event and on_event("stopped", r, "interrupted; rerun the sweep to resume it")
            return True
        loss = "no val_loss" if val_loss is None else f"val_loss {val_loss:.4f}"
        on_event and on_event("done", r, f"{loss} in {elapsed:.0f} s")
        return False

    if jobs == 1:
        for r, kind, kwargs in todo:
            on_event and on_event(kind, r, str(kwargs["run_dir"]))
            if finished(r, partial(_train_run, kwargs, level)):
                raise KeyboardInterrupt
    elif todo:
        stop: list[int] = []  # the stop signals received: after one, no new run starts
        # spawn, not fork: a forked child would inherit this process's torch thread pools
        context = multiprocessing.get_context("spawn")
        with (
            ProcessPoolExecutor(max_workers=jobs, mp_context=context, initializer=worker_signals) as pool,
            signals_to_workers(stop),
        ):
            queue, running = list(todo), {}
            while (queue and not stop) or running:
                while queue and not stop and len(running) < jobs:
                    r, kind, kwargs = queue.pop(0)
                    on_event and on_event(kind, r, str(kwargs["run_dir"]))
                    running[pool.submit(_train_run, kwargs, level)] = r
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    if finished(running.pop(fut), fut.result) and not stop:
                        stop.append(signal.SIGINT)  # a worker saw the signal first
        if stop:
            raise KeyboardInterrupt
    return write_report(sweep, out_dir, runs, figures=figures)
