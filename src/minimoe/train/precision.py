"""Training precision: what `train.precision=auto` means on a device, and the autocast context of each
precision. The weights and AdamW state stay fp32 in every precision; autocast runs the matmuls in bf16
or fp16 (the router, softmax and losses stay fp32, and on CPU so does attention: model/attention.py)."""

from __future__ import annotations

import contextlib

import torch


def native_bf16(device: torch.device) -> bool:
    """Whether `device` multiplies bf16 in hardware: a CUDA GPU that supports it, or a CPU with AVX-512
    BF16 or AMX (elsewhere oneDNN emulates bf16, slower than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    if device.type != "cpu":
        return False
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in probes)


def resolve_precision(precision: str, device: torch.device) -> str:
    """train.precision with "auto" made concrete for `device`: bf16 where it is native, else fp32. On a
    2-core AVX-512 BF16 CPU bf16 autocast trains the `tiny` preset at about 2x fp32's steps per CPU-second
    (BENCHMARKS.md, "bf16 autocast on the CPU")."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
