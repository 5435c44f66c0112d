"""Running a sweep: train every planned run that is not finished yet (one at a time, or several in worker
processes), then write the report.

Run directories: OUT/VARIANT/seed_S. A run whose latest checkpoint already reached its max_steps is
skipped, an unfinished one is resumed, so running the sweep again continues it. A run found on disk must
have been trained with the config the sweep plans for it (`_check_same_config`), or the sweep is refused.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path

from minimoe.config_yaml import load_yaml
from minimoe.errors import ConfigError, MinimoeError, one_line
from minimoe.files import make_dir
from minimoe.lab.compare import plan
from minimoe.lab.report import write_report
from minimoe.lab.sweep import FAILED_MARKER, PlannedRun, Sweep, run_state
from minimoe.lab.workers import signals_to_workers, worker_signals
from minimoe.presets import TOKENIZER_FALLBACKS

LOCK_FILE = ".compare.lock"  # in the sweep's output folder (a variant's name cannot start with a dot)


@contextlib.contextmanager
def sweep_lock(out_dir: Path) -> Iterator[None]:
    """Hold `out_dir` for this process while it trains runs there or writes their report: an exclusive
    flock on OUT/.compare.lock, so a second `minimoe compare` on the folder (which would delete the run
    folders this one is writing, or train the same runs into them) is refused. The OS drops the lock when
    the process ends, a crash or a kill included; the file stays. No lock where the OS has no flock."""
    try:
        import fcntl
    except ImportError:  # not POSIX
        yield
        return
    path = out_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise MinimoeError(
                f"another `minimoe compare` is running on {out_dir} (it holds {path}); wait for it to end "
                "or give another --out"
            ) from None
        yield
    finally:
        os.close(fd)


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

    logger = logging.getLogger("minimoe.train")
    level = logger.level  # put back after a run in this process (--jobs 1); a worker's ends with it
    logger.setLevel(train_log_level)
    try:
        res = train_from_config(**kwargs)
    finally:
        logger.setLevel(level)
    return res.val_loss, res.elapsed_s, res.stopped


def run_sweep(
    sweep: Sweep,
    out_dir: str | Path,
    on_event: Callable[[str, PlannedRun, str], None] | None = None,
    figures: bool = True,
    jobs: int = 1,
) -> Path:
    """Train every planned run that is not finished yet, then write OUT/report.md and figures. The sweep
    holds OUT's lock (`sweep_lock`) throughout: a second sweep on the same folder is refused.

    Args:
        sweep: from load_sweep.
        out_dir: sweep output directory (one run directory per variant x seed).
        on_event: called with (event, run, detail) for "skip", "start", "resume", "done", "failed" (a
            run that stopped with an error, e.g. diverged or out of memory: the other runs still train,
            the report leaves it out, and a rerun tries it again) and "stopped" (interrupted: the sweep raises
            KeyboardInterrupt).
        figures: draw the figures (tests may turn them off).
        jobs: runs trained at the same time, each in its own process (give each run
            train.threads=1 and at most one job per core, or they slow each other down).
    Returns:
        the report path.
    """
    if jobs < 1:
        raise ConfigError(f"jobs must be at least 1, got {jobs}")
    out_dir = Path(out_dir)
    make_dir(out_dir, f"the sweep's output directory {out_dir}")  # before any run, not once per run
    with sweep_lock(out_dir):
        runs = plan(sweep)
        _train_runs(sweep, out_dir, runs, on_event, jobs)
        return write_report(sweep, out_dir, runs, figures=figures)


def report_only(sweep: Sweep, out_dir: Path, runs: list[PlannedRun], figures: bool = True) -> Path:
    """Rewrite the report from the runs already in `out_dir` (`minimoe compare --report-only`), holding
    the folder's lock as run_sweep does: refused while a sweep trains there. A run there trained with
    another config than the sweep plans is refused as a rerun refuses it, not reported as this sweep's."""
    preset = _trained_preset(sweep)
    with sweep_lock(out_dir):
        for r in runs:
            _checked_state(out_dir, r, sweep, preset)
        return write_report(sweep, out_dir, runs, figures=figures)


def _checked_state(out_dir: Path, r: PlannedRun, sweep: Sweep, preset: str | None) -> tuple[Path, str]:
    """(run folder, `run_state`) of a planned run, after checking that a run found there (one with a
    checkpoint) was trained with the config the sweep plans; one without starts clean, whatever it had."""
    run_dir = out_dir / r.variant / f"seed_{r.seed}"
    state = run_state(run_dir, r.cfg.train.max_steps, r.cfg.train.max_minutes)
    if state != "new":
        _check_same_config(run_dir, r, sweep.val_data, preset)
    return run_dir, state


def _train_runs(
    sweep: Sweep,
    out_dir: Path,
    runs: list[PlannedRun],
    on_event: Callable[[str, PlannedRun, str], None] | None,
    jobs: int,
) -> None:
    """run_sweep's training: every run not done yet, `jobs` at a time."""
    import logging
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
    from concurrent.futures.process import BrokenProcessPool

    todo = []
    preset = _trained_preset(sweep)
    for r in runs:
        run_dir, state = _checked_state(out_dir, r, sweep, preset)
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

    def starting(r: PlannedRun, kind: str, kwargs: dict) -> None:
        (kwargs["run_dir"] / FAILED_MARKER).unlink(missing_ok=True)  # an earlier attempt's
        on_event and on_event(kind, r, str(kwargs["run_dir"]))

    def finished(r: PlannedRun, result: Callable[[], tuple[float, float, str]]) -> bool:
        """Report how a run ended; True when it was interrupted (and the sweep must stop)."""
        try:
            val_loss, elapsed, stopped = result()
        except Exception as e:  # noqa: BLE001 - one run's error (it diverged, a CUDA out-of-memory, a
            # kernel error in one variant) must not keep every later run from training or the report from
            # being written; KeyboardInterrupt and SystemExit still stop the sweep
            if not isinstance(e, MinimoeError):
                logging.getLogger("minimoe.lab").debug("%s failed", r.name, exc_info=True)
            detail = one_line(str(e) if isinstance(e, MinimoeError) else f"{type(e).__name__}: {e}")
            with contextlib.suppress(OSError):  # the report tells a failed run from one not run yet
                run_dir = out_dir / r.variant / f"seed_{r.seed}"
                run_dir.mkdir(parents=True, exist_ok=True)
                (run_dir / FAILED_MARKER).write_text(detail + "\n", encoding="utf-8")
            on_event and on_event("failed", r, detail)
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
            starting(r, kind, kwargs)
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
                    starting(r, kind, kwargs)
                    try:
                        running[pool.submit(_train_run, kwargs, level)] = r
                    except BrokenProcessPool:  # a worker was killed (the system's out-of-memory killer)
                        raise MinimoeError(
                            f"a worker process of the sweep died (killed from outside, e.g. for want of "
                            f"memory), so {r.name} cannot run; rerun the sweep to continue it"
                        ) from None
                done, _ = wait(running, return_when=FIRST_COMPLETED)
                for fut in done:
                    if finished(running.pop(fut), fut.result) and not stop:
                        stop.append(signal.SIGINT)  # a worker saw the signal first
        if stop:
            raise KeyboardInterrupt
