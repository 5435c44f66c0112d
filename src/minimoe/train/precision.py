"""Training precision: what `train.precision=auto` means on a device, and the autocast context of each
precision. The weights and AdamW state stay fp32 in every precision; autocast runs the matmuls in bf16
or fp16 (the router, softmax and losses stay fp32, and on CPU so does attention: model/attention.py)."""

from __future__ import annotations

import contextlib
import functools
import time

import torch

from minimoe.infer.common import num_threads


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA GPU that supports it, or a CPU with AVX-512
    BF16 or AMX (elsewhere oneDNN emulates bf16, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


BF16_MIN_SPEEDUP = 1.1  # what bf16 products (casts included) must gain over fp32 for autocast to pay


@functools.cache
def cpu_bf16_speedup(threads: int) -> float:
    """fp32 time / bf16 time of a training-sized matrix product on this CPU at `threads` threads, the bf16
    side casting its fp32 operands as autocast does (best of 3 rounds of 4 products, about 50 ms in all).
    A CPU's AVX-512 BF16 flag does not settle it: on a 2-core Intel Xeon with the flag and no AMX these
    products ran at 0.6x fp32's speed and `tiny` trained at 0.74x, while on an AMD EPYC with the flag bf16
    trained `tiny` at 1.34x (BENCHMARKS.md, "Training throughput at small scale", ratio E)."""
    a, b = torch.randn(1024, 256), torch.randn(256, 512)

    def best(fn) -> float:
        fn()  # oneDNN builds its kernel on first use
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(4):
                fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    with num_threads(threads):
        return best(lambda: a @ b) / best(lambda: a.bfloat16() @ b.bfloat16())


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision with "auto" made concrete for `device`: bf16 where it is native and, on a CPU,
    measured faster than fp32 (`cpu_bf16_speedup` at the threads in use, once per process), else fp32."""
    if precision != "auto":
        return precision
    if not native_bf16(device):
        return "fp32"
    if device.type == "cpu" and cpu_bf16_speedup(torch.get_num_threads()) < BF16_MIN_SPEEDUP:
        return "fp32"
    return "bf16"


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
