"""The decoder-only transformer: pre-norm blocks (attention, then dense MLP or MoE), final norm,
LM head, optional MTP modules; forward returns logits, a loss split into parts, and routing stats."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minimoe.config import ModelConfig
from minimoe.model.attention import LayerCache, build_attention, padding_causal_mask
from minimoe.model.experts import MLP
from minimoe.model.loss import linear_cross_entropy
from minimoe.model.moe import MoE, MoEStats
from minimoe.model.mtp import MTPModule
from minimoe.model.norm import RMSNorm
from minimoe.model.rope import rope_cos_sin


@dataclass
class ModelOutput:
    logits: torch.Tensor | None  # (B, T, V) or (B, keep, V); None when return_logits=False
    loss: torch.Tensor | None = None  # ce + aux + z + mtp (aux and z are 0 without gradients)
    losses: dict[str, torch.Tensor] = field(default_factory=dict)  # "ce", "aux", "z", "mtp"
    moe_stats: dict[int, MoEStats] = field(
        default_factory=dict
    )  # layer index -> stats (MTP: num_hidden_layers + k)
    hidden: torch.Tensor | None = None  # (B, T, D) last hidden state before the final norm
    router_z: torch.Tensor | None = None  # the unweighted router z summed over MoE layers (with targets)


class KVCache:
    """Per-layer caches plus the number of tokens already written (`pos`)."""

    def __init__(self, layers: list[LayerCache]):
        self.layers = layers
        self.pos = 0

    def nbytes(self) -> int:
        return sum(c.nbytes() for c in self.layers)

    def reorder(self, index: torch.Tensor) -> None:
        for c in self.layers:
            c.reorder(index)


def reaches_a_target(targets: torch.Tensor) -> torch.Tensor:
    """(B, T) bool: the positions whose token reaches a scored target (not -100) at or after it in its
    row, which is every position a causal model's losses depend on. The padding after a row's last
    scored target (a fine-tuning batch's) reaches none: the MoE layers' loads and balance losses leave
    it out."""
    return (targets != -100).flip(1).cumsum(1).flip(1) > 0


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = build_attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.is_moe = cfg.is_moe_layer(layer_idx)
        self.mlp = MoE(cfg) if self.is_moe else MLP(cfg.hidden_size, cfg.intermediate_size, "swiglu")
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(
        self,
        x,
        cos,
        sin,
        cache: LayerCache | None = None,
        start: int = 0,
        attn_mask=None,
        keep=None,
        valid=None,
    ):
        """x (B, T, D) -> (B, T, D) and the MoE stats. keep: optional (B, K) long, the positions of each
        row whose output is wanted (a decode step that needs the cache entries of every position but
        the output of one): the FFN runs on those only and the output is (B, K, D). valid: optional
        (B, T) bool, the tokens an MoE layer's statistics count (`MoE.forward`)."""
        a = self.self_attn(self.input_layernorm(x), cos, sin, cache, start, attn_mask=attn_mask)
        x = x + self.dropout(a)
        if keep is not None:
            x = x.gather(1, keep[..., None].expand(-1, -1, x.shape[-1]))
        h = self.post_attention_layernorm(x)
        if self.is_moe:
            y, stats = self.mlp(h, valid if keep is None else None)
        else:
            y, stats = self.mlp(h), None
        return x + self.dropout(y), stats


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        cfg.validate()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.dropout = nn.Dropout(cfg.dropout)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(
            MTPModule(cfg, Block(cfg, cfg.num_hidden_layers + k)) for k in range(cfg.mtp_depth)
        )
        cos, sin = rope_cos_sin(cfg.rope_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.register_buffer("rope_cos", cos, persistent=False)  # (max_position_embeddings, rope_dim/2)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.gradient_checkpointing = False
        self.reset_parameters()

    # ------------------------------------------------------------------ setup
    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, initializer_range) for matrices; output projections scaled by 1/sqrt(2 num_hidden_layers) (GPT-2)."""
        std = self.cfg.initializer_range
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                scaled = name.endswith(("o_proj.weight", "down_proj.weight", "down_proj"))
                nn.init.normal_(p, 0.0, std / math.sqrt(2 * self.cfg.num_hidden_layers) if scaled else std)
            elif name.endswith("norm.weight"):
                nn.init.ones_(p)
            else:
                nn.init.zeros_(p)
        for name, b in self.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.zero_()

    def moe_layers(self) -> dict[int, MoE]:
        """Layer index -> MoE module, main layers then MTP blocks (index num_hidden_layers + k)."""
        blocks = list(self.layers) + [m.block for m in self.mtp]
        return {b.layer_idx: b.mlp for b in blocks if b.is_moe}

    def make_cache(self, batch: int, max_len: int | None = None, dtype=None, device=None) -> KVCache:
        max_len = max_len or self.cfg.max_position_embeddings
        dtype = dtype or self.embed_tokens.weight.dtype
        device = device or self.embed_tokens.weight.device
        return KVCache([b.self_attn.make_cache(batch, max_len, dtype, device) for b in self.layers])

    def cache_bytes_per_token(self, dtype: torch.dtype = torch.bfloat16) -> int:
        """KV-cache bytes per token over all main layers (MLA: (kv_lora_rank + rope) * bytes per layer)."""
        per_layer = self.layers[0].self_attn.cache_numbers_per_token()
        return per_layer * len(self.layers) * torch.empty((), dtype=dtype).element_size()

    # ------------------------------------------------------------------ forward
    def _run_block(self, block: nn.Module, x, cos, sin, cache, start, attn_mask=None, valid=None):
        if self.gradient_checkpointing and self.training and cache is None:
            return checkpoint(block, x, cos, sin, None, 0, attn_mask, None, valid, use_reentrant=False)
        return block(x, cos, sin, cache, start, attn_mask, None, valid)

    def forward(
        self,
        input_ids: torch.Tensor,
        targets: torch.Tensor | None = None,
        cache: KVCache | None = None,
        num_logits_to_keep: int = 0,
        attention_mask: torch.Tensor | None = None,
        return_logits: bool = True,
    ) -> ModelOutput:
        """Args:
            input_ids: (B, T) token ids.
            targets: (B, T) next-token ids (-100 = ignore); enables the loss and the MTP heads.
            cache: a KVCache from make_cache(); the new tokens are appended at cache.pos.
            num_logits_to_keep: if > 0, compute logits only for the last positions (decoding).
            attention_mask: optional (B, cache.pos + T) mask, 1 for real tokens and 0 for padding, over
                the cached and the new tokens (as in HF). Each row's RoPE positions then count its real
                tokens only, so a left-padded row computes what it would alone.
            return_logits: False (with targets) skips the logits: the loss then takes the fused
                chunked head + cross-entropy (model/loss.py), which is faster and never holds (B, T, V).
        Returns:
            ModelOutput with logits (B, T or keep, V) and, with targets, the loss and its parts.
        """
        B, T = input_ids.shape
        if targets is not None and num_logits_to_keep:
            raise ValueError("num_logits_to_keep is for decoding: the loss needs every position's logits")
        start = cache.pos if cache is not None else 0
        if start + T > self.cfg.max_position_embeddings:
            raise ValueError(
                f"sequence of {start + T} tokens exceeds max_position_embeddings ({self.cfg.max_position_embeddings})"
            )
        attn_mask = real = None
        if attention_mask is None:
            cos, sin = self.rope_cos[start : start + T], self.rope_sin[start : start + T]  # (T, d/2)
        else:
            if tuple(attention_mask.shape) != (B, start + T):
                raise ValueError(f"attention_mask must be (B, cache.pos + T) = {(B, start + T)}")
            valid = attention_mask.bool()
            pos = (valid.long().cumsum(-1) - 1).clamp(min=0)[:, start:]  # (B, T) real tokens before each
            cos, sin = self.rope_cos[pos], self.rope_sin[pos]  # (B, T, d/2)
            attn_mask = padding_causal_mask(valid, T, start)  # (B, 1, T, S)
            real = valid[:, start:]  # (B, T): the new tokens that are not padding
        x = self.dropout(self.embed_tokens(input_ids))  # (B, T, D)
        stats: dict[int, MoEStats] = {}
        counted = reaches_a_target(targets) if targets is not None else None
        if counted is not None and real is not None:
            counted = counted & real  # left padding reaches a target but is no token
        for i, block in enumerate(self.layers):
            layer_cache = cache.layers[i] if cache is not None else None
            x, st = self._run_block(block, x, cos, sin, layer_cache, start, attn_mask, counted)
            if st is not None:
                stats[i] = st
        if cache is not None:
            cache.pos += T
        hidden = x
        h = self.norm(x)
        fused = targets is not None and not return_logits and self._fused_head_ok(h)
        logits = None
        if not fused:
            logits = self.lm_head(h[:, -num_logits_to_keep:] if num_logits_to_keep else h)
        out = ModelOutput(logits=logits, moe_stats=stats, hidden=hidden)
        if targets is None:
            return out

        zero = h.new_zeros((), dtype=torch.float32)
        if fused:
            ce = linear_cross_entropy(h, self.lm_head.weight, targets).float()
        else:
            ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        mtp = self._mtp_loss(h, input_ids, targets, stats, cos, sin, real) if self.cfg.mtp_depth else zero
        aux = sum((s.aux_loss for s in stats.values()), zero)
        z = sum((s.z_loss for s in stats.values()), zero)
        out.losses = {"ce": ce, "aux": aux, "z": z, "mtp": mtp}
        out.router_z = sum((s.router_z for s in stats.values() if s.router_z is not None), zero)
        out.loss = ce + aux + z + self.cfg.mtp_loss_weight * mtp
        return out

    def _fused_head_ok(self, h: torch.Tensor) -> bool:
        """The fused head + cross-entropy runs a plain float weight (a quantized or LoRA-wrapped head
        takes the plain path); under autocast it runs its matmuls in autocast's dtype."""
        w = getattr(self.lm_head, "weight", None)
        return isinstance(self.lm_head, nn.Linear) and isinstance(w, torch.Tensor) and w.dtype == h.dtype

    def _mtp_loss(self, h_main, input_ids, targets, stats, cos, sin, real=None) -> torch.Tensor:
        """Mean over depths of the MTP cross-entropy (unweighted; forward() applies mtp_loss_weight).
        Depth k sees positions i < T-k: it combines h_i with emb(t_{i+k}) and predicts targets[i+k];
        depth 1's h is the main model's output after its final norm (`h_main`, see model/mtp.py).
        Position i keeps the main model's RoPE position (cos, sin: (T, d/2) or (B, T, d/2)); with
        `real` (B, T) bool (a padded batch), padded keys are hidden and padded positions predict nothing."""
        T = input_ids.shape[1]
        h = h_main
        losses = []
        for k, module in enumerate(self.mtp, start=1):
            n = T - k
            if n <= 0:
                break
            emb = self.embed_tokens(input_ids[:, k:])  # (B, n, D)
            rope = cos[..., :n, :], sin[..., :n, :]
            tgt, mask = targets[:, k:], None  # (B, n)
            if real is not None:
                tgt = tgt.masked_fill(~real[:, :n], -100)
                mask = padding_causal_mask(real[:, :n], n, 0)  # (B, 1, n, n)
            valid = reaches_a_target(tgt) if real is None else reaches_a_target(tgt) & real[:, :n]
            h, h_normed, st = module(h[:, :n], emb, *rope, attn_mask=mask, valid=valid)
            if st is not None:
                stats[self.cfg.num_hidden_layers + k - 1] = st
            # a depth may have no target where the main loss has some (a fine-tuning window whose only
            # answer token is its first): its loss is 0 then, not the NaN of a mean over nothing
            if self._fused_head_ok(h_normed):  # MTP logits are never returned
                losses.append(
                    linear_cross_entropy(h_normed, self.lm_head.weight, tgt, none_is_zero=True).float()
                )
            else:
                logits = self.lm_head(h_normed).float().flatten(0, 1)  # (B * n, V)
                ce = F.cross_entropy(logits, tgt.flatten(), ignore_index=-100, reduction="sum")
                losses.append(ce / (tgt != -100).sum().clamp(min=1))
        return torch.stack(losses).mean() if losses else h_main.new_zeros((), dtype=torch.float32)

    def num_params(self, exclude_embedding: bool = False) -> int:
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if exclude_embedding else n
