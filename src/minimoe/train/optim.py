"""AdamW with weight decay on matrices only (nanoGPT's rule: p.dim() >= 2), optionally 8-bit."""

from __future__ import annotations

import torch
from torch import nn

from minimoe.config import TrainConfig
from minimoe.errors import MinimoeError


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build_optimizer(model: nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, tc.weight_decay)
    betas = (tc.beta1, tc.beta2)
    if tc.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise MinimoeError(
                "train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes); use adamw instead"
            ) from None
        if device.type != "cuda":
            raise MinimoeError("train.optimizer=adamw8bit runs only on a CUDA GPU; use adamw on this device")
        return bnb.optim.AdamW8bit(groups, lr=tc.lr, betas=betas)
    # torch's fused AdamW kernel runs on CPU too: one pass per tensor instead of ~10 elementwise ops.
    # Measured 7x faster than the default single-tensor loop on CPU (13.6M parameters, 2 threads).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=tc.lr, betas=betas, fused=fused)
