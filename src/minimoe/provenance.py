"""Which code trained a run: minimoe's version, its git commit when minimoe runs from a checkout (and
whether its source differed from that commit), and torch's version. Checkpoints record it in meta.json;
`minimoe compare` reports it, since runs trained by different code do not compare under a time budget. A
run resumed under other code keeps the history: each version with the step it took over from."""

from __future__ import annotations

import functools
import os
import subprocess
from importlib import metadata
from pathlib import Path

import torch


def _git(src: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("GIT_DIR", "GIT_WORK_TREE")}  # -C decides
    return subprocess.run(["git", "-C", str(src), *args], capture_output=True, text=True, timeout=10, env=env)


@functools.cache
def code_version() -> dict[str, object]:
    """{"minimoe": version, "commit": sha or None, "modified": bool or None, "torch": version} of the code
    running now (read once per process: the trainer reads it when it starts, before its clock does, so
    files edited during a run do not change what the run records)."""
    try:
        version = metadata.version("minimoe")
    except metadata.PackageNotFoundError:
        version = None
    return {"minimoe": version, **git_state(Path(__file__).resolve().parent), "torch": torch.__version__}


def git_state(src: Path) -> dict[str, object]:
    """{"commit": sha, "modified": bool} of the package folder `src`: read only where its `__init__.py` is
    tracked by the repository around it (not an installed copy that sits inside some other repository);
    "modified" says whether the folder's files differ from the commit (a tracked file changed, or a new file
    that git does not ignore). Both None otherwise."""
    state: dict[str, object] = {"commit": None, "modified": None}
    try:
        if _git(src, "ls-files", "--error-unmatch", "__init__.py").returncode != 0:
            return state
        head = _git(src, "rev-parse", "HEAD")
        if head.returncode == 0:
            state["commit"] = head.stdout.strip()
            # tracked files changed or new files not ignored (a module added but not committed yet)
            status = _git(
                src, "--no-optional-locks", "status", "--porcelain", "--untracked-files=all", "--", "."
            )
            state["modified"] = bool(status.stdout.strip()) if status.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):  # no git, or it hung
        pass
    return state


def code_label(info: dict | None) -> str | None:
    """A short name for `code_version()`'s record: "commit 1a2b3c4d5e" (", modified"), or "minimoe 0.1.0"
    without a commit; None for a run that recorded none (trained before checkpoints recorded it)."""
    if not info:
        return None
    if info.get("commit"):
        return f"commit {str(info['commit'])[:10]}" + (", modified" if info.get("modified") else "")
    return f"minimoe {info.get('minimoe')}"


def continue_history(meta: dict, step: int) -> list[dict]:
    """The code history of a run resumed at `step` from a checkpoint with `meta` (meta.json): its
    `code_history`, or its single `code` record where it kept no history (a checkpoint without either
    starts one at `step`), then `code_version()` from `step` where the code is not the same."""
    history = list(
        meta.get("code_history") or ([{"from_step": 0, "code": meta["code"]}] if meta.get("code") else [])
    )
    if not history or history[-1]["code"] != code_version():
        history.append({"from_step": step, "code": code_version()})
    return history


def history_label(meta: dict) -> str | None:
    """`code_label` of the code that wrote the checkpoint with `meta`; where the run was resumed under other
    code, every version in turn: "commit aaaaaaaaaa to step 500, then commit bbbbbbbbbb"."""
    history = meta.get("code_history") or []
    if len(history) < 2:
        return code_label(meta.get("code"))
    parts = [code_label(h["code"]) or "code not recorded" for h in history]
    ends = [h["from_step"] for h in history[1:]]
    return ", then ".join([f"{p} to step {e}" for p, e in zip(parts, ends)] + parts[-1:])
