"""A minimal reference training loop for `train_small.py`, written the way nanoGPT's train.py is: one
model class, a `get_batch` that slices a memory-mapped token file, AdamW (fused) with decay on
matrices only, a cosine schedule with warmup set by hand each step, gradient clipping, no logging.

The model has the architecture and FLOPs of minimoe's dense model of the same shape (RMSNorm, RoPE
half-split, multi-head causal attention through SDPA, SwiGLU MLP, tied embedding), so the ratio
`minimoe / reference` measures minimoe's training machinery, not a different network. Like nanoGPT it
computes q, k and v with one Linear (`c_attn`).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 320
    block_size: int = 128
    n_layer: int = 6
    n_head: int = 6
    n_embd: int = 192
    n_inner: int = 512  # SwiGLU width
    rope_theta: float = 10000.0
    eps: float = 1e-6


def rope_tables(head_dim: int, length: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    freqs = torch.outer(torch.arange(length, dtype=torch.float64), inv_freq)  # (T, hd/2)
    return freqs.cos().float(), freqs.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, H, hd); pairs (i, i + hd/2) rotate by the position's angle."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, hd/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)


class GPT(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        D = cfg.n_embd
        self.wte = nn.Embedding(cfg.vocab_size, D)
        self.blocks = nn.ModuleList()
        for _ in range(cfg.n_layer):
            block = nn.ModuleDict(
                {
                    "ln_1": nn.RMSNorm(D, eps=cfg.eps),
                    "c_attn": nn.Linear(D, 3 * D, bias=False),
                    "c_proj": nn.Linear(D, D, bias=False),
                    "ln_2": nn.RMSNorm(D, eps=cfg.eps),
                    "w_gate": nn.Linear(D, cfg.n_inner, bias=False),
                    "w_up": nn.Linear(D, cfg.n_inner, bias=False),
                    "w_down": nn.Linear(cfg.n_inner, D, bias=False),
                }
            )
            self.blocks.append(block)
        self.ln_f = nn.RMSNorm(D, eps=cfg.eps)
        self.lm_head = nn.Linear(D, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying, as nanoGPT
        cos, sin = rope_tables(D // cfg.n_head, cfg.block_size, cfg.rope_theta)
        self.register_buffer("cos", cos, persistent=False)
        self.register_buffer("sin", sin, persistent=False)
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                std = (
                    0.02 / math.sqrt(2 * cfg.n_layer)
                    if name.endswith(("c_proj.weight", "w_down.weight"))
                    else 0.02
                )
                nn.init.normal_(p, 0.0, std)

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None):
        B, T = idx.shape
        H, D = self.cfg.n_head, self.cfg.n_embd
        cos, sin = self.cos[:T], self.sin[:T]
        x = self.wte(idx)  # (B, T, D)
        for blk in self.blocks:
            q, k, v = blk["c_attn"](blk["ln_1"](x)).split(D, dim=2)
            q = apply_rope(q.view(B, T, H, D // H), cos, sin).transpose(1, 2)  # (B, H, T, hd)
            k = apply_rope(k.view(B, T, H, D // H), cos, sin).transpose(1, 2)
            v = v.view(B, T, H, D // H).transpose(1, 2)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + blk["c_proj"](y.transpose(1, 2).reshape(B, T, D))
            h = blk["ln_2"](x)
            x = x + blk["w_down"](F.silu(blk["w_gate"](h)) * blk["w_up"](h))
        logits = self.lm_head(self.ln_f(x))
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.view(-1, logits.size(-1)), targets.view(-1), ignore_index=-1)
        return logits, loss

    def configure_optimizers(self, weight_decay: float, lr: float, betas: tuple[float, float]):
        params = [p for p in self.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=True)


class ReferenceLoop:
    """nanoGPT's training loop over a token array; `run(n)` trains n iterations, returns tokens/s.

    Args:
        data: 1-D array of token ids (memory-mapped shard).
        cfg: model shape.
        batch_size: sequences per step.
        lr, warmup_iters, lr_decay_iters, min_lr: nanoGPT's cosine schedule.
    """

    def __init__(
        self,
        data: np.ndarray,
        cfg: GPTConfig,
        batch_size: int = 16,
        lr: float = 1e-3,
        warmup_iters: int = 100,
        lr_decay_iters: int = 5000,
        min_lr: float = 1e-4,
        weight_decay: float = 0.1,
        grad_clip: float = 1.0,
        seed: int = 1337,
    ):
        torch.manual_seed(seed)
        self.data, self.cfg, self.batch_size = data, cfg, batch_size
        self.lr, self.warmup_iters, self.lr_decay_iters, self.min_lr = (
            lr,
            warmup_iters,
            lr_decay_iters,
            min_lr,
        )
        self.grad_clip = grad_clip
        self.model = GPT(cfg)
        self.optimizer = self.model.configure_optimizers(weight_decay, lr, (0.9, 0.95))
        self.iter_num = 0

    def get_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        T = self.cfg.block_size
        ix = torch.randint(len(self.data) - T, (self.batch_size,))
        x = torch.stack([torch.from_numpy(self.data[i : i + T].astype(np.int64)) for i in ix])
        y = torch.stack([torch.from_numpy(self.data[i + 1 : i + 1 + T].astype(np.int64)) for i in ix])
        return x, y

    def get_lr(self, it: int) -> float:
        if it < self.warmup_iters:
            return self.lr * (it + 1) / (self.warmup_iters + 1)
        if it > self.lr_decay_iters:
            return self.min_lr
        ratio = (it - self.warmup_iters) / (self.lr_decay_iters - self.warmup_iters)
        return self.min_lr + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (self.lr - self.min_lr)

    def run(self, iters: int) -> float:
        """Train `iters` iterations; returns training tokens per second over them."""
        self.model.train()
        t0 = time.perf_counter()
        X, Y = self.get_batch()
        for _ in range(iters):
            lr = self.get_lr(self.iter_num)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
            _, loss = self.model(X, Y)
            X, Y = self.get_batch()  # fetched between forward and backward, where nanoGPT does
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.iter_num += 1
        return iters * self.batch_size * self.cfg.block_size / (time.perf_counter() - t0)
