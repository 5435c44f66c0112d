"""File-system helpers shared across the package: writing checkpoints, exports and quantized runs
durably, and listing the files of a data folder."""

from __future__ import annotations

import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from minimoe.errors import MinimoeError


def current_umask() -> int:
    """The process umask, read without changing it where Linux reports it (else set and restored)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def as_umask_allows(path: str | Path) -> None:
    """Give `path` the permissions a plain open() would (0644 under the usual umask 022): safetensors
    writes its files 0600, which other users and tools that serve the folder could not read."""
    os.chmod(path, 0o666 & ~current_umask())


def fsync_file(path: Path) -> None:
    """Flush a written file's bytes to the disk."""
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def fsync_dir(path: Path) -> None:
    """Flush a directory's entries to the disk: a new or renamed file's name lives in its directory."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsync every file under `root`, then every directory deepest first, then `root`: what a folder
    written under a temporary name needs before the rename that publishes it, so that a power loss cannot
    leave a folder readers trust holding empty or missing files."""
    entries = sorted(root.rglob("*"), key=lambda p: (p.is_dir(), -len(p.parts)))
    for p in entries:
        (fsync_dir if p.is_dir() else fsync_file)(p)
    fsync_dir(root)


def read_json_object(path: Path) -> dict:
    """A JSON file holding one object, with one clear sentence when it is not."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise MinimoeError(f"{path} is not valid JSON") from None
    if not isinstance(data, dict):
        raise MinimoeError(f"{path} does not hold a JSON object")
    return data


def make_dir(path: Path, what: str, name_as: Path | None = None) -> None:
    """`path.mkdir(parents=True, exist_ok=True)`, with one sentence naming `what` (e.g. "--out runs/x") when
    the file system refuses it. Creating a directory fails with "no such file" where its file system takes
    no new entries (/proc, /sys): said as such, not as a path that does not exist. An error names
    `name_as` where given (the path the user chose, for a temporary directory beside it)."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        from minimoe.errors import describe_os_error

        shown = name_as or path
        if e.errno == errno.ENOENT:
            reason = f"the file system at {shown.parent} does not allow creating {shown.name} there"
        else:
            reason = describe_os_error(OSError(e.errno, e.strerror, str(shown))) or e.strerror
        raise MinimoeError(f"cannot create {what} ({reason})") from None


def fresh_temp_dir(out: Path, tag: str) -> Path:
    """An empty directory beside `out`, to be renamed onto it once complete. An error creating it names
    `out`, the path the user chose, not the temporary one."""
    make_dir(out.parent, str(out))
    tmp = out.parent / f".{out.name}.tmp-{tag}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    make_dir(tmp, str(out), name_as=out)
    return tmp


def check_new_run_dir(out: Path, force: bool) -> None:
    """Refuse to write a new run (import, upcycle) into `out` when it holds a run or other files, unless
    `force`: the run's config.yaml and tokenizer/ would replace files of the same names there."""
    if force or not out.is_dir():
        return
    if (out / "checkpoints").exists() and any((out / "checkpoints").iterdir()):
        raise MinimoeError(f"{out} already holds a run; choose another --out or pass --force")
    if any(out.iterdir()):
        raise MinimoeError(
            f"{out} already exists and is not empty (a run's config.yaml and tokenizer/ would replace "
            "files there); choose another --out or pass --force"
        )


def visible_files(root: Path, skip_dirs: frozenset = frozenset()) -> Iterator[tuple[str, Path]]:
    """(relative '/'-separated path, path) of each file under `root` in walk order, leaving out hidden
    names (starting with '.') and folders named in `skip_dirs`. Training data folders and eval task
    folders read their files through it, so both skip the same copies (.ipynb_checkpoints, .git); hidden
    folders are pruned while walking, so a .git or .venv inside costs nothing."""
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d not in skip_dirs]
        rel = Path(dirpath).relative_to(root).as_posix()
        prefix = "" if rel == "." else rel + "/"
        for name in filenames:
            if not name.startswith("."):
                yield prefix + name, Path(dirpath) / name
