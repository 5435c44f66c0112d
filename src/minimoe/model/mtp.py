"""DeepSeek-V3 multi-token prediction (MTP) modules.

Depth k predicts token i+k+1 from the depth k-1 hidden state at i and the embedding of token i+k:
h'_i = Block(eh_proj(cat[enorm(emb(t_{i+k})), hnorm(h_i)])), logits = head(norm(h'_i)).
Embedding first in the concatenation, as the released checkpoints store it (the paper's
equation writes the other order). Embedding and output head are shared with the main model.
Depth 1's h is the main model's last hidden state after its final norm (the tensor its head reads),
which is what DeepSeek-V3's released modeling code hands its MTP layer and what vLLM and SGLang feed an
exported module when they speculate with it; depth k > 1 takes depth k-1's block output.
"""

from __future__ import annotations

import torch
from torch import nn

from minimoe.config import ModelConfig
from minimoe.model.norm import RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        d = cfg.hidden_size
        self.enorm = RMSNorm(d, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * d, d, bias=False)
        self.block = block
        self.norm = RMSNorm(d, cfg.rms_norm_eps)  # HF: shared_head.norm

    def forward(
        self,
        h_prev: torch.Tensor,
        emb_next: torch.Tensor,
        cos,
        sin,
        cache=None,
        start: int = 0,
        attn_mask=None,
        keep=None,
        valid=None,
    ):
        """h_prev, emb_next: (B, T, D) -> (new hidden (B, T, D), normed hidden for the head, MoE stats).
        attn_mask: optional (B, 1, T, S) bool, as Block takes it (rows of different lengths).
        keep: optional (B, K) long: outputs at those positions only, (B, K, D) (Block.forward).
        valid: optional (B, T) bool: the tokens the MoE statistics count (Block.forward)."""
        x = self.eh_proj(torch.cat([self.enorm(emb_next), self.hnorm(h_prev)], dim=-1))  # (B, T, D)
        h, stats = self.block(x, cos, sin, cache, start, attn_mask, keep, valid)
        return h, self.norm(h), stats
