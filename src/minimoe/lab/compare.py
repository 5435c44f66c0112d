"""Sweeps: train variants of one base config on the same data with the same seeds, at the same token
budget, the same training FLOPs, the same steps or the same minutes, and write a Markdown report with
figures and paired contrasts (mean, standard error and 95% interval of the per-seed differences).

The sweep file format is in `minimoe compare --help` (minimoe.cli.compare.SWEEP_FORMAT).

A minutes budget sets train.max_minutes and train.clock. `clock: wall` is equal wall-clock time, the
question a user with a machine to themselves asks. `clock: cpu` counts the CPU time of the training
process (time.process_time): with one thread per run (train.threads=1) it is the compute a run used, and
other jobs on a shared machine do not shrink it the way they shrink a wall-clock budget. The LR schedule of
a time-limited run follows the clock (warmup counts steps), so every run finishes its decay.

Training the planned runs (OUT/VARIANT/seed_S) and writing the report is minimoe.lab.runs. Several sweep
files may share one name (and so one output folder): a long sweep split into files that run one at a
time, whose later files reuse the reference variant's runs (a reused run must have the same config).
Each such file names its own report with `report: report_2a.md` (default report.md).
"""

from __future__ import annotations

import difflib
import math
from pathlib import Path

from minimoe.config import RunConfig
from minimoe.config_yaml import build_run_config, load_yaml
from minimoe.errors import ConfigError, MinimoeError
from minimoe.lab.flops import flops_per_token, steps_for_budget
from minimoe.lab.sweep import PlannedRun, Sweep

SWEEP_KEYS = (
    "name", "description", "base", "data", "val_data", "budget", "seeds", "variants", "contrasts", "equivalence",
    "report",
)  # fmt: skip
BUDGET_KINDS = ("tokens", "flops", "steps", "minutes")
TIME_BUDGET_MAX_STEPS = 1_000_000  # a minutes budget stops on the clock; this only bounds the step count


def _override_list(value, where: str) -> list[str]:
    if value is None:
        return []
    # {model.hidden_size: 128} or {model: {hidden_size: 128}} read better for some
    if isinstance(value, dict):
        return _flatten(value)
    if not isinstance(value, list) or not all(isinstance(v, str) and "=" in v for v in value):
        raise MinimoeError(f"{where} must be a list of dotted key=value overrides")
    return list(value)


def _flatten(d: dict, prefix: str = "") -> list[str]:
    """Dotted overrides of a mapping, nested mappings flattened: {model: {hidden_size: 64}} gives
    model.hidden_size=64."""
    out = []
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append(f"{prefix}{k}={_yaml_scalar(v)}")
    return out


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
        d = load_yaml(path, "sweep file")
    except ConfigError as e:
        raise MinimoeError(str(e)) from None
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
        for key, source, what in (
            ("data.path", sweep.data, "data"),
            ("data.val_path", sweep.val_data, "val_data"),
        ):
            given = [o for o in sweep.base_overrides + ov if o.split("=", 1)[0].strip() == key]
            if source and given:  # the sweep's source would replace it without a word
                raise MinimoeError(
                    f"sweep {sweep.name}, variant '{variant}': {given[0]} conflicts with the sweep's {what} "
                    f"({source}); give the data in one place"
                )
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
