"""The prepared-data folder's trust and locking: a folder is trusted only when its meta.json has our
format version and every file it lists has exactly the listed size; one lock per folder makes
concurrent runs (torchrun ranks, two terminals) prepare it once; leftovers of killed runs are removed."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
from collections.abc import Iterator
from pathlib import Path

from minimoe.errors import MinimoeError

FORMAT_VERSION = 1
_SHARD_RE = re.compile(r"^(train|val)_\d{3,}\.bin$")
_OWN_NAMES = {"meta.json", "meta.json.tmp", "tokenizer"}


def read_trusted(d: Path) -> tuple[dict | None, str]:
    """meta.json of `d` if every file it lists exists with its exact size, else (None, why)."""
    mp_ = d / "meta.json"
    if not mp_.is_file():
        return None, "no meta.json" if d.is_dir() else "the folder does not exist"
    try:
        meta = json.loads(mp_.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "meta.json is not valid JSON"
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        return None, f"meta.json is not format version {FORMAT_VERSION}"
    for rel, size in meta.get("files", {}).items():
        p = d / rel
        if not p.is_file() or p.stat().st_size != size:
            return None, f"{rel} is missing or not {size} bytes"
    return meta, ""


def check_ours(d: Path) -> None:
    """Refuse to replace a folder holding files we did not write (it may be the user's)."""
    if not d.exists():
        return
    if not d.is_dir():
        raise MinimoeError(f"prepared-data path {d} is a file, not a folder")
    for p in d.iterdir():
        if p.name not in _OWN_NAMES and not _SHARD_RE.match(p.name):
            raise MinimoeError(
                f"{d} holds files minimoe did not write ({p.name}); choose an empty or new folder for prepared data"
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(d: Path) -> None:
    """Remove temp/old siblings left by runs whose process is gone (killed mid-write)."""
    pat = re.compile(rf"^\.{re.escape(d.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    for p in d.parent.iterdir() if d.parent.is_dir() else []:
        m = pat.match(p.name)
        if m and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def lock(d: Path) -> Iterator[None]:
    """An exclusive lock per prepared folder, so concurrent runs (e.g. torchrun ranks) prepare once."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; rank 0 should prepare alone
        yield
        return
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f".{d.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
