"""RMSNorm (computed in fp32, cast back), as in Llama / DeepSeek."""

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # HF's order: normalise in fp32, cast back to x's dtype, then scale by the weight. One fused
        # op (F.rms_norm) in fp32 instead of five: it is called 2-3 times per layer per decoded token.
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        acc = torch.promote_types(x.dtype, torch.float32)  # fp64 stays fp64 (float64 tests)
        return self.weight * F.rms_norm(x.to(acc), (x.shape[-1],), None, self.eps).to(x.dtype)
