"""File-system helpers shared by the writers of checkpoints, exports and quantized runs."""

from __future__ import annotations

import os
from pathlib import Path


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
