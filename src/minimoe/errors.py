"""Errors a user can cause. The CLI turns them into one sentence and a non-zero exit."""

from __future__ import annotations

import errno
import importlib.util


class MinimoeError(Exception):
    """A mistake in the user's input: a bad argument, file, config or checkpoint."""


class ConfigError(MinimoeError):
    """An invalid or unknown configuration value; the message names the field."""


# optional packages -> the extra of pyproject.toml that installs them
EXTRAS = {
    "matplotlib": "plot", "datasets": "data", "pyarrow": "data", "transformers": "hf", "peft": "hf",
    "accelerate": "hf", "lm_eval": "eval", "sacrebleu": "eval", "rouge_score": "eval", "tensorboard": "track",
    "wandb": "track",
}  # fmt: skip


def missing_package(module: str | None) -> str | None:
    """What to install for an optional package that is not there ("matplotlib (pip install
    'minimoe[plot]')"), or None when `module` is none of them."""
    top = (module or "").partition(".")[0]
    return f"{top} (pip install 'minimoe[{EXTRAS[top]}]')" if top in EXTRAS else None


def require(what: str, *modules: str) -> None:
    """MinimoeError naming what to install when an optional package `what` needs is missing, so that a
    command says so before its work rather than after it."""
    for m in modules:
        if importlib.util.find_spec(m) is None:
            raise MinimoeError(f"{what} needs {missing_package(m)}")


def one_line(text: str) -> str:
    """`text` with its lines joined by spaces: what the CLI prints must stay one line."""
    return " ".join(line.strip() for line in str(text).splitlines() if line.strip())


# errno -> what it means for the path it names; the rest use the system's own wording
_OS_REASONS = {
    errno.ENOENT: "{path} does not exist",
    errno.ENOTDIR: "{path}: a parent of it is a file, not a directory",
    errno.EISDIR: "{path} is a directory, not a file",
    errno.EEXIST: "{path} already exists and is not a directory",
    errno.EACCES: "permission denied for {path}",
    errno.EPERM: "permission denied for {path}",
    errno.EROFS: "{path} is on a read-only file system",
    errno.ENOSPC: "no space left on the device holding {path}",
}


def describe_os_error(e: OSError) -> str | None:
    """One sentence for a file-system error that names a path (a missing file, a directory that
    cannot be written, a full disk), or None when `e` names no path and so is not the user's to fix.

    Args:
        e: the error, e.g. from `open` or `Path.mkdir`.
    Returns:
        e.g. "permission denied for runs/x/checkpoints"; None without `e.filename`.
    """
    if e.filename is None:
        return None
    path = e.filename if isinstance(e.filename, str) else str(e.filename)
    template = _OS_REASONS.get(e.errno)
    if template is None:
        return f"cannot use {path} ({e.strerror or type(e).__name__})"
    return template.format(path=path)
