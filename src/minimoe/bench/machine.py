"""The machine a benchmark runs on: its caches, the peak memory of a block, and what the report names
(CPU, cores, GPU, library versions)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
from pathlib import Path

import torch


def largest_cache_bytes(device: torch.device) -> int:
    """The largest cache between the device's cores and its memory: a GPU's L2, a CPU's last-level cache
    as Linux lists it (per core complex where an L3 is split), 0 where unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip().upper()
        with contextlib.suppress(ValueError):
            sizes.append(int(text.rstrip("KMG")) * {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1))
    return max(sizes, default=0)


class PeakMemory:
    """Peak memory of a block in MiB: allocated bytes on CUDA; resident set on Linux (the kernel's
    high-water mark, reset through /proc/self/clear_refs), else the process's lifetime maximum."""

    def __init__(self, device: torch.device):
        self.device = device
        self.mib = 0.0

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        else:
            with contextlib.suppress(OSError):
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            self.mib = max(self.mib, torch.cuda.max_memory_allocated(self.device) / 2**20)
            return
        try:
            with open("/proc/self/status") as f:
                hwm = next(line for line in f if line.startswith("VmHWM:"))
            self.mib = max(self.mib, int(hwm.split()[1]) / 1024)
        except (OSError, StopIteration):
            import resource

            self.mib = max(self.mib, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def machine_info(device: torch.device) -> dict:
    """CPU model, core count, GPU name and library versions, for the report."""
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    info = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "date": datetime.date.today().isoformat(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    with contextlib.suppress(ImportError):
        import transformers

        info["transformers"] = transformers.__version__
    return info
