"""Crash safety, numerical faults and untrusted files, tested with real processes.

- SIGKILL during checkpoint saves: a forked copy of this process (torch already imported) saves
  checkpoints back to back and is killed at random moments spread over the save duration; after every
  kill `latest` is one complete saved version (never a mix, never older than the last finished save)
  and a resumed Trainer continues from it. Then the same with a real `python -m minimoe train`.
- SIGINT and SIGTERM: the real CLI saves, exits 0, and the checkpoint resumes.
- A full disk during a save: a small tmpfs in a private mount namespace (where the kernel lets an
  unprivileged process make one) and RLIMIT_FSIZE (everywhere).
- The NaN guard: one bad step is skipped without touching the weights; K in a row stop the run.
- Files that would run code when loaded (pickles, Hugging Face `auto_map` modules) run nothing.
"""

from __future__ import annotations

import ast
import ctypes
import json
import logging
import os
import pickle
import random
import shutil
import signal
import statistics
import subprocess
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_train import TINY

from minimoe.cli.main import main
from minimoe.config_yaml import build_run_config
from minimoe.errors import MinimoeError
from minimoe.train import checkpoint as ckpt_lib
from minimoe.train.run import data_cache_dir, train_from_config
from minimoe.train.trainer import MAX_BAD_STEPS, Trainer

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork (POSIX)")
SRC = Path(__file__).resolve().parents[1] / "src" / "minimoe"


# ---------------------------------------------------------------------- shared tiny run


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    """A corpus, its prepared shards (cache path in the config, so a CLI resume finds them) and the
    overrides that train a tiny model on it."""
    root = tmp_path_factory.mktemp("reliability")
    words = "the cat sat on a mat and the dog ran to the red ball while a bird sang".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(400)]
    corpus = root / "corpus.txt"
    corpus.write_text("\n".join(lines) + "\n", encoding="utf-8")
    overrides = TINY + [f"data.path={corpus}", f"data.cache_dir={root / 'cache'}", "model.vocab_size=320"]
    return {"root": root, "corpus": corpus, "overrides": overrides}


def _trainer(setup: dict, run_dir: Path, *extra: str, resume: bool = False) -> Trainer:
    from minimoe.data import prepare

    cfg = build_run_config("tiny", None, setup["overrides"] + ["train.max_steps=100000", *extra])
    data = prepare(cfg.data.path, "byte", data_cache_dir(cfg.data, None), workers=0, progress=False)
    return Trainer(cfg, run_dir, data, data.tokenizer(), resume=resume, progress=False)


@pytest.fixture(scope="module")
def trained_run(setup) -> Path:
    """A finished 2-step run; tests copy it before changing anything."""
    run = setup["root"] / "trained"
    train_from_config(
        overrides=setup["overrides"] + ["train.max_steps=2", "train.eval_every=2"],
        run_dir=run,
        progress=False,
        sample=False,
    )
    return run


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _floats(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Every floating-point tensor of the state dict (parameters and the routing bias)."""
    return {k: v for k, v in model.state_dict().items() if v.is_floating_point()}


def _snapshot(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in _floats(model).items()}


def _same(model: torch.nn.Module, want: dict[str, torch.Tensor]) -> bool:
    got = _floats(model)
    return got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _step_of(ckpt: Path) -> int:
    return int(ckpt.name.removeprefix("step_"))


def _leftovers(run: Path) -> list[str]:
    """Names a crash can leave behind in checkpoints/: temporary directories and pointer files."""
    root = run / ckpt_lib.CKPT
    return sorted(p.name for p in root.iterdir() if p.name.startswith("."))


def _cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def _one_sentence(err: str, *words: str) -> str:
    """The last stderr line, checked to be the CLI's one-sentence error (log lines may precede it)."""
    assert "Traceback" not in err, err
    line = err.strip().splitlines()[-1]
    assert line.startswith("minimoe ") and ": error: " in line, err
    for w in words:
        assert w in line, (w, line)
    return line


# ---------------------------------------------------------------------- SIGKILL during saves


def _set_version(trainer: Trainer, base: dict[str, torch.Tensor], step: int) -> None:
    """Make the trainer hold version `step`: every float tensor is base + step, so a file that mixed
    two versions (or a half-written tensor) cannot match any version."""
    trainer.step = step
    with torch.no_grad():
        for k, v in _floats(trainer.model).items():
            v.copy_(base[k] + step)


def _version(base: dict[str, torch.Tensor], step: int) -> dict[str, torch.Tensor]:
    return {k: v + step for k, v in base.items()}


def _save_until_killed(trainer: Trainer, base: dict, first: int, pipe: tuple[int, int]) -> None:
    """The forked child: save versions first, first+1, ... and report B(egin)/E(nd) with the time of
    each on the pipe (small writes to a pipe are atomic). Never returns."""
    os.close(pipe[0])
    fd = pipe[1]
    try:
        for step in range(first, first + 10_000):
            _set_version(trainer, base, step)
            os.write(fd, f"B {step} {time.monotonic()}\n".encode())
            trainer.save()
            os.write(fd, f"E {step} {time.monotonic()}\n".encode())
    except BaseException:  # noqa: BLE001 - reported to the parent, which fails the test
        os.write(fd, ("X " + traceback.format_exc().replace("\n", " | ")).encode()[:3000] + b"\n")
    finally:
        os._exit(1)


def _fork(child, *args) -> int:
    """Run `child(*args)` in a forked copy of this process (which must end with os._exit); its pid."""
    with warnings.catch_warnings():  # Python 3.12 warns about fork() with threads; the child uses none
        warnings.simplefilter("ignore", DeprecationWarning)
        pid = os.fork()
    if pid == 0:
        try:
            child(*args)
        finally:
            os._exit(1)
    return pid


def _read_all(fd: int) -> str:
    chunks = []
    while chunk := os.read(fd, 65536):
        chunks.append(chunk)
    os.close(fd)
    return b"".join(chunks).decode()


def _where(run: Path, events: list[tuple[str, int, float]], child: int, latest: int) -> str:
    """Which part of a save the kill interrupted, from the child's last event and what is on disk."""
    if not events or events[-1][0] == "E":
        return "between saves"
    step = events[-1][1]
    root = run / ckpt_lib.CKPT
    if (root / f".tmp-{ckpt_lib.step_dir_name(step)}-{child}").exists():
        return "writing the temporary directory"
    if latest == step:
        return "after moving latest (pruning)"
    if (root / ckpt_lib.step_dir_name(step) / "meta.json").exists():
        return "after the rename, before moving latest"
    return "before the first write (gathering state)"


@needs_fork
def test_sigkill_during_checkpoint_saves(setup, tmp_path):
    """MINIMOE_KILL_TRIALS (default 24) forked children, each SIGKILLed at a random moment."""
    trials = int(os.environ.get("MINIMOE_KILL_TRIALS", "24"))
    run = tmp_path / "run"
    rng = random.Random(int(os.environ.get("MINIMOE_KILL_SEED", "0")))
    trainer = _trainer(setup, run, "train.eval_every=100000", "train.keep_last=2")
    trainer.fit(stop_after=1)
    base = _snapshot(trainer.model)
    written = {1: base}  # steps a (resumed) trainer wrote by training; any other step s is base + s
    durations = []
    for step in range(2, 7):  # the save duration, measured with the code the children run
        _set_version(trainer, base, step)
        t = time.perf_counter()
        trainer.save()
        durations.append(time.perf_counter() - t)
    save_s = statistics.median(durations)

    def expected(step: int) -> dict[str, torch.Tensor]:
        return written.get(step) or _version(base, step)

    where: Counter = Counter()
    offsets = []  # how far into its save each mid-save kill landed, as a fraction of the median save
    start = time.perf_counter()
    for _ in range(trials):
        # resume from what the last kill left, and continue: a real step, evaluated and saved
        trainer = _trainer(setup, run, "train.eval_every=100000", "train.keep_last=2", resume=True)
        before = trainer.step
        assert _same(trainer.model, expected(before)), f"resumed weights are not version {before}"
        trainer.fit(stop_after=1)
        assert trainer.step == before + 1
        written[trainer.step] = _snapshot(trainer.model)
        resumed = trainer.step
        on_disk, _, _, _ = ckpt_lib.load_run(run, "latest")  # even where a killed run left this step
        assert _same(on_disk, written[resumed]), f"step {resumed} on disk is not what the trainer saved"

        r, w = os.pipe()
        pid = _fork(_save_until_killed, trainer, base, resumed + 1, (r, w))
        os.close(w)
        time.sleep(rng.uniform(0.0, 3.0 * save_s))
        killed_at = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        log = _read_all(r)
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, log
        events = [(kind, int(s), float(t)) for kind, s, t in (line.split() for line in log.splitlines())]

        ckpt = ckpt_lib.find_checkpoint(run, "latest")
        latest = _step_of(ckpt)
        done = [s for kind, s, _ in events if kind == "E"]
        begun = [s for kind, s, _ in events if kind == "B"]
        # never older than the last finished save, never a version that was not being written
        assert latest >= (done[-1] if done else resumed), (latest, events)
        assert latest == resumed or latest in begun, (latest, events)
        model, _, _, meta = ckpt_lib.load_run(run, "latest")
        assert meta["step"] == ckpt_lib.load_state(ckpt)["step"] == latest
        assert _same(model, expected(latest)), f"checkpoint {ckpt.name} is not version {latest}"
        place = _where(run, events, pid, latest)
        where[place] += 1
        if place != "between saves":
            offsets.append((killed_at - events[-1][2]) / save_s)
    elapsed = time.perf_counter() - start

    # the leftovers of the last kill do not get in the way of the next run's saves
    trainer = _trainer(setup, run, "train.eval_every=100000", "train.keep_last=2", resume=True)
    step = trainer.step
    trainer.fit(stop_after=2)
    assert _step_of(ckpt_lib.find_checkpoint(run, "latest")) == step + 2
    assert _leftovers(run) == []
    mid = trials - where["between saves"]
    quarters = Counter(min(int(f * 4), 4) for f in offsets)
    print(
        f"\n{trials} SIGKILL trials in {elapsed:.1f} s (save median {save_s * 1e3:.1f} ms); "
        f"{mid} landed inside a save: {dict(where)}; offset into the save by quarter "
        f"(4 = past the median): {dict(sorted(quarters.items()))}"
    )
    assert mid >= trials // 2, where  # the trials really hit saves


def test_a_step_saved_again_replaces_the_old_files(tmp_path, trained_run):
    """A run killed after renaming step N into place but before moving `latest` leaves a complete
    step N that `latest` does not name. The resumed run's own step N must replace it, not be dropped."""
    run = _copy_run(trained_run, tmp_path / "run")
    model, tok, cfg, meta = ckpt_lib.load_run(run, "latest")
    text = (ckpt_lib.find_checkpoint(run) / "config.yaml").read_text()
    orphan = {k: v + 1 for k, v in model.state_dict().items()}
    ckpt_lib.save_checkpoint(run, 3, orphan, {"step": 3}, {"step": 3}, text, tok)
    (run / ckpt_lib.CKPT / "latest").write_text("step_00000002\n")  # the kill came before this moved
    ours = {k: v + 2 for k, v in model.state_dict().items()}
    ckpt_lib.save_checkpoint(run, 3, ours, {"step": 3, "mine": True}, {"step": 3}, text, tok)
    got, _, _, _ = ckpt_lib.load_run(run, "latest")
    assert all(torch.equal(got.state_dict()[k], ours[k]) for k in ours)
    assert ckpt_lib.load_state(ckpt_lib.find_checkpoint(run))["mine"] is True
    assert _leftovers(run) == []


def test_a_run_killed_in_its_first_save_trains_again_from_scratch(setup, tmp_path, capsys, trained_run):
    """A kill during the first save leaves only a `.tmp-*` directory in checkpoints/: nothing to resume,
    so a new run in the folder is let through (it was refused with advice to --resume, which refuses too),
    and it keeps none of the dead attempt's metrics rows or TensorBoard events."""
    run = _copy_run(trained_run, tmp_path / "run")
    root = run / ckpt_lib.CKPT
    for p in list(root.iterdir()):
        if p.name.startswith("step_"):
            p.rename(root / f".tmp-{p.name}-12345")
        else:
            p.unlink()
    with open(run / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": 9, "tokens": 1, "loss": 9.0}) + "\n")
    (run / "tb").mkdir(exist_ok=True)
    (run / "tb" / "events.out.tfevents.1.dead").write_bytes(b"")  # the dead attempt's TensorBoard log
    code, _, err = _cli(capsys, "train", "--resume", run)
    assert code == 2 and "no complete checkpoint" in _one_sentence(err)
    argv = ["train", "--out", run, *setup["overrides"], "train.max_steps=1", "train.eval_every=1"]
    argv.append("--no-sample")
    code, _, err = _cli(capsys, *argv)
    assert code == 0, err
    assert _latest_step(run) == 1 and _leftovers(run) == []
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps and max(steps) == 1 and not (run / "tb").exists()


def test_a_resume_that_changes_the_model_is_refused(tmp_path, capsys, trained_run):
    """`--resume RUN model.num_experts_per_tok=1` (same weight shapes, another model) is one sentence and
    leaves the run as it was; a training-only model setting may change."""
    run = _copy_run(trained_run, tmp_path / "run")
    config = (run / "config.yaml").read_text()
    for change in ("model.num_experts_per_tok=1", "model.scoring_func=softmax"):
        code, _, err = _cli(capsys, "train", "--resume", run, "train.max_steps=3", change, "--no-sample")
        assert code == 2 and change.split("=")[0] in _one_sentence(err, "trained with")
        assert (run / "config.yaml").read_text() == config and _latest_step(run) == 2
    # a training-only setting, and a longer context with YaRN (a context extension continues the run)
    yarn = "model.rope_scaling={type: yarn, factor: 2.0, original_max_position_embeddings: 64}"
    extend = ["model.z_loss_coef=0.001", "model.max_position_embeddings=128", yarn]
    code, _, err = _cli(capsys, "train", "--resume", run, "train.max_steps=3", *extend, "--no-sample")
    assert code == 0, err
    assert _latest_step(run) == 3


class FileOps:
    """Records os.fsync / os.rename / os.replace in order: the path behind each fsynced descriptor with
    the file's bytes at that moment, and whether `watch` existed at each operation."""

    def __init__(self, monkeypatch, watch: Path):
        self.events: list[
            tuple[str, Path, Path | bytes | None, bool]
        ] = []  # (kind, path, dst or bytes, existed)
        real_fsync, real_rename, real_replace = os.fsync, os.rename, os.replace

        def note(kind, path, extra):
            self.events.append((kind, path, extra, watch.exists()))

        def fsync(fd):
            path = Path(os.readlink(f"/proc/self/fd/{fd}"))
            note("fsync", path, path.read_bytes() if path.is_file() else None)
            real_fsync(fd)

        def rename(src, dst, *a, **kw):
            note("rename", Path(src), Path(dst))
            real_rename(src, dst, *a, **kw)

        def replace(src, dst, *a, **kw):
            note("rename", Path(src), Path(dst))
            real_replace(src, dst, *a, **kw)

        monkeypatch.setattr(os, "fsync", fsync)
        monkeypatch.setattr(os, "rename", rename)
        monkeypatch.setattr(os, "replace", replace)

    def renames(self, src: Path | None = None, dst: Path | None = None) -> list[int]:
        return [
            i
            for i, (k, p, x, _) in enumerate(self.events)
            if k == "rename" and (src is None or p == src) and (dst is None or x == dst)
        ]

    def fsyncs(
        self, path: Path, after: int = -1, before: int | None = None
    ) -> list[tuple[int, bytes | None]]:
        end = len(self.events) if before is None else before
        return [
            (i, x)
            for i, (k, p, x, _) in enumerate(self.events)
            if after < i < end and k == "fsync" and p == path
        ]


def _check_published(ops: FileOps, root: Path, final: Path, since: int = 0) -> int:
    """The step directory was built under a temporary name, every file and directory in it fsynced
    (files with their final bytes) before the one rename that published it, nothing existed under the
    final name from event `since` until then, and `root` was fsynced after the rename.
    Returns the index of that root fsync."""
    published = ops.renames(dst=final)
    assert len(published) == 1, f"{final.name} was not published by one rename: {ops.events}"
    i_pub = published[0]
    tmp = ops.events[i_pub][1]
    assert tmp.parent == root and not tmp.name.startswith("step_"), tmp  # never a name readers trust
    assert not any(existed for *_, existed in ops.events[since:i_pub]), "files were written under step_N"
    for f in [final, *final.rglob("*")]:
        synced = ops.fsyncs(tmp / f.relative_to(final), before=i_pub)
        assert synced, f"{f.relative_to(root)} was not fsynced before the rename that published it"
        if f.is_file():
            assert synced[-1][1] == f.read_bytes(), f"{f.name} changed after its fsync"
    assert not [i for i, (_, _, x, _) in enumerate(ops.events) if isinstance(x, Path) and final in x.parents]
    durable = ops.fsyncs(root, after=i_pub)
    assert durable, "the checkpoints directory was not fsynced after the rename"
    return durable[0][0]


def _check_pointer(ops: FileOps, root: Path, name: str, target: str, after: int) -> None:
    """`root/name` was replaced, after event `after`, by a fsynced temporary file naming `target`, and
    the directory was fsynced after the replace."""
    (i_ptr,) = ops.renames(dst=root / name)
    assert i_ptr > after, f"{name} moved before the step directory's rename was durable"
    synced = ops.fsyncs(ops.events[i_ptr][1], before=i_ptr)
    assert synced and synced[-1][1] == (target + "\n").encode()
    assert ops.fsyncs(root, after=i_ptr), f"the checkpoints directory was not fsynced after moving {name}"


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fsynced paths from /proc/self/fd")
def test_checkpoint_file_operations_are_ordered_for_crash_safety(trained_run, tmp_path, monkeypatch):
    """The SIGKILL trials cannot see a save without fsyncs (the page cache survives a killed process)
    or one written straight into step_N, so record the file operations of two saves: the trainer's
    (a module) with `best`, and a gathered state dict replacing an existing step."""
    run = _copy_run(trained_run, tmp_path / "run")
    model, tok, _, _ = ckpt_lib.load_run(run, "latest")
    text = (ckpt_lib.find_checkpoint(run) / "config.yaml").read_text()
    root = run / ckpt_lib.CKPT
    final = root / ckpt_lib.step_dir_name(3)

    with monkeypatch.context() as mp:
        ops = FileOps(mp, final)
        ckpt_lib.save_checkpoint(run, 3, model, {"step": 3}, {"step": 3}, text, tok, is_best=True)
    durable = _check_published(ops, root, final)
    _check_pointer(ops, root, "latest", final.name, durable)
    _check_pointer(ops, root, "best", final.name, durable)
    names = {f.relative_to(final).as_posix() for f in final.rglob("*")}
    assert {"model.safetensors", "state.pt", "config.yaml", "meta.json", "tokenizer"} <= names

    ours = {k: v + 1 for k, v in model.state_dict().items()}
    with monkeypatch.context() as mp:
        ops = FileOps(mp, final)
        ckpt_lib.save_checkpoint(run, 3, ours, {"step": 3}, {"step": 3}, text, tok)
    (moved,) = ops.renames(src=final)  # the old step 3 is moved aside, never written into
    _check_pointer(ops, root, "latest", final.name, _check_published(ops, root, final, since=moved + 1))
    got, _, _, _ = ckpt_lib.load_run(run, "latest")
    assert all(torch.equal(got.state_dict()[k], ours[k]) for k in ours)
    assert _leftovers(run) == []


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="reads fsynced paths from /proc/self/fd")
@pytest.mark.parametrize("writer", ["quantize", "export"])
def test_quantized_and_exported_folders_are_fsynced_before_their_rename(
    trained_run, tmp_path, monkeypatch, writer
):
    """save_quantized and export_model renamed their temporary folder into place without an fsync: a power
    loss could leave zero-length files in a folder `load_run` (or from_pretrained) trusts. Every file and
    directory is now fsynced before the rename, and the parent directory after it, as checkpoints are."""
    from minimoe.hf.export import export_model
    from minimoe.infer.quantize import quantize_model, save_quantized

    model, tok, _, meta = ckpt_lib.load_run(trained_run, "latest")
    out = tmp_path / "out"
    with monkeypatch.context() as mp:
        ops = FileOps(mp, out)
        if writer == "quantize":
            save_quantized(quantize_model(model, 8), meta["path"], out)
        else:
            export_model(model, tok, out, shard_size="40KB")  # several shards and an index
    _check_published(ops, tmp_path, out)
    assert len([f for f in out.rglob("*") if f.is_file()]) >= 4


def _wait_for(pred, timeout: float, what: str, proc: subprocess.Popen | None = None) -> None:
    deadline = time.time() + timeout
    while not pred():
        if proc is not None and proc.poll() is not None:
            pytest.fail(f"the process exited ({proc.returncode}) before {what}: {proc.stderr.read()}")
        if time.time() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)


def _latest_step(run: Path) -> int:
    try:
        return _step_of(ckpt_lib.find_checkpoint(run, "latest"))
    except MinimoeError:
        return -1


def test_cli_train_sigkill_resume_sigint_resume(setup, tmp_path, capsys):
    """A real `python -m minimoe train` saving every step is SIGKILLed mid-run; `--resume` continues
    (another real process), which a Ctrl-C stops with a checkpoint and exit 0; so does a SIGTERM of the
    next; a last resume ends it."""
    run = tmp_path / "run"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    train = [sys.executable, "-m", "minimoe", "train", "--no-progress", "--no-sample"]
    cmd = train + ["--out", str(run), *setup["overrides"]]
    cmd += ["train.max_steps=100000", "train.eval_every=100000", "train.save_every=1", "train.keep_last=2"]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        _wait_for(lambda: _latest_step(run) >= 3, 120, "the third checkpoint", proc)
        time.sleep(random.uniform(0, 0.05))  # somewhere in the save-every-step loop
    finally:
        proc.kill()
        proc.communicate()
    assert proc.returncode == -signal.SIGKILL
    killed = _latest_step(run)
    model, _, _, meta = ckpt_lib.load_run(run, "latest")
    assert meta["step"] == killed >= 3

    def resume_then_stop(sig: signal.Signals, more: int) -> tuple[int, str]:
        """A real `--resume` stopped by `sig` once it saved `more` checkpoints: (the step it stopped
        at, its stderr); it must have saved there and exited 0 cleanly."""
        start = _latest_step(run)
        proc = subprocess.Popen(
            train + ["--resume", str(run)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        try:
            _wait_for(lambda: _latest_step(run) >= start + more, 120, f"{more} more checkpoints", proc)
            proc.send_signal(sig)
            out, err = proc.communicate(timeout=120)
        finally:
            proc.kill()
        assert proc.returncode == 0, err
        assert "(interrupted)" in out and "Traceback" not in err
        stopped = int(out.split()[1])  # "step N (interrupted)"
        assert _latest_step(run) == stopped >= start + more
        return stopped, err

    stopped, err = resume_then_stop(signal.SIGINT, 2)
    assert f"resumed from {run / 'checkpoints' / ckpt_lib.step_dir_name(killed)} at step {killed}" in err
    # SIGTERM (a batch scheduler's or torchrun's stop) saves and exits as Ctrl-C does
    stopped, _ = resume_then_stop(signal.SIGTERM, 1)

    code, out, err = _cli(
        capsys, "train", "--resume", run, "--no-progress", "--no-sample", f"train.max_steps={stopped + 2}"
    )
    assert code == 0, err
    assert _latest_step(run) == stopped + 2 and _leftovers(run) == []


# ---------------------------------------------------------------------- a full disk


CLONE_NEWNS, CLONE_NEWUSER = 0x00020000, 0x10000000
MS_REC, MS_PRIVATE, MS_REMOUNT = 0x4000, 0x40000, 0x20


def _mount_tmpfs(where: Path, size: int) -> None:
    """In this (single-threaded, forked) process: a private mount namespace, as root there through a
    user namespace when not root, with a tmpfs of `size` bytes at `where`. OSError if not allowed."""
    libc = ctypes.CDLL(None, use_errno=True)

    def check(rc: int, what: str) -> None:
        if rc != 0:
            e = ctypes.get_errno()
            raise OSError(e, f"{what}: {os.strerror(e)}")

    uid, gid = os.geteuid(), os.getegid()
    check(libc.unshare(CLONE_NEWNS | (CLONE_NEWUSER if uid else 0)), "unshare")
    if uid:
        Path("/proc/self/setgroups").write_text("deny")
        Path("/proc/self/uid_map").write_text(f"0 {uid} 1")
        Path("/proc/self/gid_map").write_text(f"0 {gid} 1")
    check(libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None), "private mounts")
    check(libc.mount(b"tmpfs", str(where).encode(), b"tmpfs", 0, f"size={size}".encode()), "mount")


def _grow_tmpfs(where: Path) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"tmpfs", str(where).encode(), b"tmpfs", MS_REMOUNT, b"size=64m") != 0:
        raise OSError(ctypes.get_errno(), "remount")


def _full_disk_child(how: str, src: Path, work: Path, report: Path) -> None:
    """The forked child: put a copy of `src` where writes fail, resume it (the save fails), record what
    happened in `report` (JSON on the real disk), lift the limit, resume again."""
    import resource  # POSIX only, like fork

    facts: dict = {}
    try:
        run = work / "run"
        if how == "tmpfs":
            used = sum(p.stat().st_size + 4096 for p in src.rglob("*") if p.is_file())
            try:
                _mount_tmpfs(work, used + 96 * 1024)  # room for the copy and its logs, not a checkpoint
            except OSError as e:
                facts["unavailable"] = str(e)
                return
            shutil.copytree(src, run)
        else:
            shutil.copytree(src, run)
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))  # a safetensors file is ~170 KiB
        old = ckpt_lib.find_checkpoint(run, "latest")
        old_files = {str(p): p.read_bytes() for p in old.rglob("*") if p.is_file()}
        facts["old"] = old.name
        sys.stdout = open(os.devnull, "w")
        sys.stderr = open(report.with_suffix(".err"), "w")  # the CLI's one line lands here
        facts["code"] = main(
            ["train", "--resume", str(run), "--no-progress", "--no-sample", "train.max_steps=4"]
        )
        sys.stderr.close()
        facts["err"] = report.with_suffix(".err").read_text()
        facts["latest_after"] = ckpt_lib.find_checkpoint(run, "latest").name
        facts["old_unchanged"] = old_files == {str(p): p.read_bytes() for p in old.rglob("*") if p.is_file()}
        facts["loads"] = ckpt_lib.load_run(run, "latest")[3]["step"]
        facts["leftovers"] = _leftovers(run)
        if how == "tmpfs":
            _grow_tmpfs(work)
        else:
            resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        sys.stderr = open(report.with_suffix(".err2"), "w")
        facts["code_after"] = main(
            ["train", "--resume", str(run), "--no-progress", "--no-sample", "train.max_steps=4"]
        )
        facts["latest_after_room"] = ckpt_lib.find_checkpoint(run, "latest").name
        facts["leftovers_after_room"] = _leftovers(run)
    except BaseException:  # noqa: BLE001 - reported to the parent
        facts["error"] = traceback.format_exc()
    finally:
        report.write_text(json.dumps(facts))
        os._exit(0)


@needs_fork
@pytest.mark.parametrize("how", ["tmpfs", "rlimit"])
def test_full_disk_during_save_keeps_the_old_checkpoint(trained_run, tmp_path, how):
    work = tmp_path / "small"
    work.mkdir()
    report = tmp_path / "report.json"
    pid = _fork(_full_disk_child, how, trained_run, work, report)
    os.waitpid(pid, 0)
    facts = json.loads(report.read_text())
    assert "error" not in facts, facts["error"]
    if "unavailable" in facts:
        pytest.skip(f"cannot mount a tmpfs here ({facts['unavailable']}); the rlimit case still runs")
    assert facts["code"] == 2, facts
    reason = "No space left on device" if how == "tmpfs" else "File too large"
    line = _one_sentence(facts["err"], reason, "step_00000004", facts["old"], "intact")
    assert len(facts["err"].strip().splitlines()) == 1, facts["err"]
    print(f"\n{how}: {line}")
    assert facts["latest_after"] == facts["old"] and facts["old_unchanged"]
    assert facts["loads"] == 2 and facts["leftovers"] == []
    # with room again, the same resume succeeds: nothing the failed save left blocks it
    assert facts["code_after"] == 0, facts
    assert facts["latest_after_room"] == "step_00000004" and facts["leftovers_after_room"] == []


# ---------------------------------------------------------------------- the NaN guard


def _poison(monkeypatch, bad_calls: set[int], how: str = "loss") -> None:
    """Make training forward calls number `bad_calls` (1-based) give a NaN loss, or a finite loss whose
    gradient is NaN (d sqrt(u)/du at u = 0 is inf, times 0)."""
    from minimoe.model.transformer import Transformer

    real = Transformer.forward
    calls = {"n": 0}

    def forward(self, *a, **k):
        out = real(self, *a, **k)
        if self.training and out.loss is not None:
            calls["n"] += 1
            if calls["n"] in bad_calls:
                if how == "loss":
                    out.loss = out.loss * float("nan")
                else:
                    out.loss = out.loss + (self.norm.weight * 0).sum().sqrt()
        return out

    monkeypatch.setattr(Transformer, "forward", forward)


@pytest.mark.parametrize("how", ["loss", "grad"])
def test_one_bad_step_is_skipped_and_the_weights_are_untouched(setup, tmp_path, monkeypatch, caplog, how):
    _poison(monkeypatch, {3}, how)
    trainer = _trainer(setup, tmp_path / "run", "train.eval_every=100000", "train.max_steps=5")
    before_each: list[dict] = []  # the weights before each training step, skipped or not
    real_step = trainer._train_step

    def spy():
        before_each.append(_snapshot(trainer.model))
        return real_step()

    trainer._train_step = spy
    with caplog.at_level(logging.WARNING, logger="minimoe.train"):
        res = trainer.fit()
    assert res.step == 5 and res.stopped == "max_steps"
    assert len(before_each) == 6  # five good steps and the skipped one
    warned = [r.getMessage() for r in caplog.records if "skipped" in r.getMessage()]
    assert warned == ["step 3: non-finite loss or gradient, step skipped (1 in a row)"]
    changed = [not all(torch.equal(a[k], b[k]) for k in a) for a, b in zip(before_each, before_each[1:])]
    assert changed == [True, True, False, True, True]  # the third call (after step 2) changed nothing
    adam_steps = {int(s["step"]) for s in trainer.optimizer.state.values() if "step" in s}
    assert adam_steps == {5}
    assert all(torch.isfinite(v).all() for v in _floats(trainer.model).values())


def test_consecutive_bad_steps_stop_the_cli_with_the_checkpoint_intact(
    setup, tmp_path, monkeypatch, capsys, caplog
):
    _poison(monkeypatch, set(range(3, 100)))  # steps 1-2 fine, then NaN for good
    run = tmp_path / "run"
    with caplog.at_level(logging.WARNING, logger="minimoe.train"):
        code, _, err = _cli(
            capsys, "train", "--out", run, "--no-progress", "--no-sample", *setup["overrides"],
            "train.max_steps=20", "train.eval_every=2",
        )  # fmt: skip
    assert code == 2
    line = _one_sentence(err, "diverged", f"{MAX_BAD_STEPS} consecutive", "step_00000002", "intact")
    assert len(err.strip().splitlines()) == 1
    assert sum("step skipped" in r.getMessage() for r in caplog.records) == MAX_BAD_STEPS
    print(f"\nNaN guard: {line}")
    model, _, _, meta = ckpt_lib.load_run(run, "latest")
    assert meta["step"] == 2 and all(torch.isfinite(v).all() for v in _floats(model).values())
    # diverging before the first checkpoint: the message does not promise one
    monkeypatch.undo()
    _poison(monkeypatch, set(range(1, 100)))
    with pytest.raises(MinimoeError, match="no checkpoint was written"):
        train_from_config(
            overrides=setup["overrides"] + ["train.max_steps=20"], run_dir=tmp_path / "run2", progress=False
        )


# ---------------------------------------------------------------------- files that would run code


class _RunsCode:
    """Unpickling this creates `marker`: what a malicious checkpoint would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # torch, about the bare pickle
def test_pickles_are_refused_and_run_nothing(trained_run, tmp_path, capsys):
    marker = tmp_path / "code-ran"
    payload = {"step": 2, "x": _RunsCode(marker)}
    run = _copy_run(trained_run, tmp_path / "run")
    ckpt = ckpt_lib.find_checkpoint(run)
    # as a state file, in torch's zip format and as a bare pickle: a resume refuses it
    for writer in (lambda f: torch.save(payload, f), lambda f: f.write_bytes(pickle.dumps(payload))):
        writer(ckpt / "state.pt")
        code, _, err = _cli(capsys, "train", "--resume", run, "--no-progress", "train.max_steps=3")
        assert code == 2
        _one_sentence(err, "state.pt", "refusing")
        assert len(err.strip().splitlines()) == 1 and not marker.exists()
    # as model weights: only safetensors is ever read, so the pickle is just a corrupt file
    torch.save(payload, ckpt / "model.safetensors")
    code, _, err = _cli(capsys, "generate", run, "--prompt", "the", "--max-new-tokens", "2")
    assert code == 2
    _one_sentence(err, "model.safetensors", "corrupt")
    assert not marker.exists()


def test_hf_import_never_runs_the_folders_code(trained_run, tmp_path, capsys):
    """An exported folder given an `auto_map` to a module that would create a marker when imported,
    a pickled pytorch_model.bin and a tokenizer_config.json naming a custom class: the import reads
    config.json, safetensors and tokenizer.json only."""
    marker = tmp_path / "code-ran"
    hf = tmp_path / "hf"
    code, _, err = _cli(capsys, "export", trained_run, "--out", hf)
    assert code == 0, err
    cfg = json.loads((hf / "config.json").read_text())
    cfg["auto_map"] = {"AutoConfig": "evil.EvilConfig", "AutoModelForCausalLM": "evil.EvilModel"}
    (hf / "config.json").write_text(json.dumps(cfg))
    (hf / "evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).touch()\n")
    (hf / "pytorch_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    tc = hf / "tokenizer_config.json"
    tc_data = json.loads(tc.read_text()) if tc.exists() else {}
    tc.write_text(json.dumps({**tc_data, "auto_map": {"AutoTokenizer": ["evil.EvilTokenizer", None]}}))
    code, out, err = _cli(capsys, "import", hf, "--out", tmp_path / "imported")
    assert code == 0, err
    assert not marker.exists()
    got, _, _, _ = ckpt_lib.load_run(tmp_path / "imported")
    want, _, _, _ = ckpt_lib.load_run(trained_run)
    ids = torch.tensor([[1, 2, 3, 4]])
    assert torch.allclose(got(ids).logits, want(ids).logits, atol=1e-5)
    # with only the pickle left, the folder is refused rather than unpickled
    (hf / "model.safetensors").unlink()
    code, _, err = _cli(capsys, "import", hf, "--out", tmp_path / "again")
    assert code == 2
    _one_sentence(err, "safetensors only")
    assert not marker.exists()


def test_lora_adapter_weights_come_only_from_safetensors(trained_run, tmp_path, capsys):
    pytest.importorskip("peft")
    marker = tmp_path / "code-ran"
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["o_proj"]})
    )
    (adapter / "adapter_model.bin").write_bytes(pickle.dumps(_RunsCode(marker)))
    code, _, err = _cli(capsys, "lora", trained_run, "--adapter", adapter, "--merge", "--out", tmp_path / "m")
    assert code == 2
    _one_sentence(err, "adapter_model.safetensors")
    assert not marker.exists()


def _unsafe_calls(tree: ast.AST) -> list[str]:
    """Calls that can run code from data: torch.load without weights_only=True, pickle/marshal/shelve
    loads, numpy loads allowing pickles, yaml.load/unsafe_load, trust_remote_code=<not False>, eval/exec."""
    found = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        f = node.func
        name = ast.unparse(f)
        kw = {k.arg: k.value for k in node.keywords}
        const = {k: v.value for k, v in kw.items() if isinstance(v, ast.Constant)}
        if name == "torch.load" and const.get("weights_only") is not True:
            found.append(f"{name} without weights_only=True")
        if name in ("pickle.load", "pickle.loads", "marshal.loads", "shelve.open", "dill.load"):
            found.append(name)
        if name in ("np.load", "numpy.load") and const.get("allow_pickle", False) is not False:
            found.append(f"{name} with allow_pickle")
        if name in ("yaml.load", "yaml.unsafe_load", "yaml.full_load"):
            found.append(name)
        if "trust_remote_code" in kw and const.get("trust_remote_code", True) is not False:
            found.append(f"{name}(trust_remote_code=...)")
        if isinstance(f, ast.Name) and f.id in ("eval", "exec"):
            found.append(f.id)
    return found


def test_no_code_path_unpickles_or_trusts_remote_code():
    assert _unsafe_calls(ast.parse("torch.load(f)\nexec(s)\nx(trust_remote_code=True)")) == [
        "torch.load without weights_only=True",
        "exec",
        "x(trust_remote_code=...)",
    ]
    bad = {}
    for path in sorted(SRC.rglob("*.py")):
        hits = _unsafe_calls(ast.parse(path.read_text(encoding="utf-8")))
        if hits:
            bad[str(path.relative_to(SRC))] = hits
    assert bad == {}


def test_a_pointer_or_config_written_on_a_full_disk_keeps_the_old_one(tmp_path, monkeypatch):
    """`atomic_write_text` (the `latest` / `best` pointers, config.yaml) writes beside the file and renames:
    a write that fails (here the disk fills up at fsync) leaves the old content whole and no stray file."""
    import errno

    from minimoe.train import checkpoint

    path = tmp_path / "latest"
    path.write_text("step_00000010", encoding="utf-8")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint.os, "fsync", full)
    with pytest.raises(OSError, match="No space left"):
        checkpoint.atomic_write_text(path, "step_00000020")
    assert path.read_text(encoding="utf-8") == "step_00000010"
    assert [p.name for p in tmp_path.iterdir()] == ["latest"]
    monkeypatch.undo()
    checkpoint.atomic_write_text(path, "step_00000020")
    assert path.read_text(encoding="utf-8") == "step_00000020" and len(list(tmp_path.iterdir())) == 1
