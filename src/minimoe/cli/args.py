"""argparse value types shared by the subcommands: numbers must be finite and integers must fit the
64-bit integers torch and numpy take (a seed of 2**70 is a user error, not an overflow deep inside)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

CHECKPOINTS = ("best", "latest")


def integer(text: str) -> int:
    """An int that fits in a signed 64-bit integer."""
    try:
        value = int(text.replace("_", ""))
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not -(2**63) <= value < 2**63:
        raise argparse.ArgumentTypeError(f"{text} does not fit in a signed 64-bit integer")
    return value


def number(text: str) -> float:
    """A finite float (nan and inf are refused)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid float value: {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def stop_string(text: str) -> str:
    """A `--stop` string: `--stop "\\n"` from a shell arrives as a backslash and an n; it means the
    newline (and backslash-t the tab)."""
    return text.replace("\\n", "\n").replace("\\t", "\t")


def add_checkpoint_arg(p: argparse.ArgumentParser, help: str = "which checkpoint to load") -> None:
    """--checkpoint best|latest: which checkpoint of a run directory `load_run` reads."""
    p.add_argument("--checkpoint", choices=CHECKPOINTS, default="best", help=help)


def add_device_args(p: argparse.ArgumentParser, threads: bool = False) -> None:
    """--device and, with `threads`, --threads (for commands that run the model; see `set_threads`)."""
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    if threads:
        p.add_argument(
            "--threads",
            type=integer,
            default=0,
            help="CPU threads (0 = torch default; 1 is often fastest for decoding)",
        )


def set_threads(threads: int) -> None:
    """Apply --threads: torch's intra-op threads for this process (0 leaves torch's default)."""
    from minimoe.errors import MinimoeError

    if threads < 0:
        raise MinimoeError(f"--threads must be >= 0, got {threads}")
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def check_writable(path: str | Path, flag: str, what: str = "the output") -> None:
    """Raise MinimoeError now if the file `path` cannot be written, before any work that would be lost.
    An existing file is left as it is; a probe file that did not exist is removed again."""
    from minimoe.errors import MinimoeError, describe_os_error

    p = Path(path)
    if p.is_dir():
        raise MinimoeError(f"cannot write {what} ({p} is a directory); choose another {flag}")
    existed = p.exists()
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        with open(p, "a", encoding="utf-8"):
            pass
    except OSError as e:
        reason = describe_os_error(e) or e.strerror
        raise MinimoeError(f"cannot write {what} ({reason}); choose another {flag}") from None
    if not existed:
        p.unlink()
