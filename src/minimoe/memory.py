"""How much memory a model will need against how much the machine has, checked before anything is
allocated: a config far larger than memory is one sentence, not an allocator failure or a machine
that swaps until it stops."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from minimoe.errors import MinimoeError

SKIP_ENV = "MINIMOE_SKIP_MEMORY_CHECK"  # set to 1: load or train whatever the estimate says


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def _cgroup_room() -> int | None:
    """Bytes left under this process's cgroup (v2) memory limit, or None without a limit."""
    root = Path("/sys/fs/cgroup")
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((root / "memory.current").read_text())
        for line in (root / "memory.stat").read_text().splitlines():
            if line.startswith("inactive_file "):  # page cache the kernel reclaims before failing
                used -= int(line.split()[1])
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_bytes(device: torch.device | str = "cpu") -> int | None:
    """Memory a new allocation can use on `device`: free GPU memory, or on the CPU the smaller of the
    kernel's MemAvailable and the room under a cgroup limit. None where it cannot be read."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free
    if device.type != "cpu":
        return None
    room = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                room = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    cg = _cgroup_room()
    if cg is not None:
        room = cg if room is None else min(room, cg)
    return room


def check_fits(
    need: int,
    device: torch.device | str,
    doing: str,
    override: str,
    remedy: str = "choose a smaller model (minimoe params ... --memory estimates it)",
) -> None:
    """Raise MinimoeError when `need` bytes exceed what `device` has available.

    Args:
        need: estimated bytes.
        doing: what needs them, e.g. "training this model (fp32 weights, gradients and AdamW state)".
        override: how the user skips the check, e.g. "--skip-memory-check".
        remedy: what to change so that it fits.
    """
    if os.environ.get(SKIP_ENV, "") not in ("", "0"):
        return
    have = available_bytes(device)
    if have is not None and need > have:
        raise MinimoeError(
            f"{doing} needs at least {_gib(need)} but {torch.device(device).type} has {_gib(have)} "
            f"available; {remedy}, or {override} to try anyway"
        )
