"""Attention: grouped-query (GQA/MHA) and DeepSeek multi-head latent attention (MLA), with a KV cache.

MLA keeps two paths in one module (as DeepSeek-V3's reference does):
- naive: expand the latent through kv_b_proj into per-head keys/values and call SDPA (training, prefill);
- absorbed: fold kv_b_proj into the query (keys) and the output (values) and attend over the cached
  latent directly, so the cache holds only `kv_lora_rank + qk_rope_head_dim` numbers per token.

Shapes: B batch, T new tokens, S cached + new tokens, H heads, D hidden, r kv_lora_rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minimoe.config import ModelConfig
from minimoe.model.norm import RMSNorm
from minimoe.model.rope import apply_rope, softmax_scale


class LayerCache:
    """Preallocated per-layer cache of two tensors `a`, `b` of shape (B, max_len, ...).

    GQA stores a=keys, b=values (B, L, H_kv, d); MLA stores a=normalised latent (B, L, r),
    b=RoPE'd shared key (B, L, d_rope). With `joint`, a and b are the two halves of one (B, L, ra + rb)
    buffer, so MLA's absorbed decode reads [latent | rope key] as one key tensor without a copy.
    """

    def __init__(
        self, a_shape: tuple[int, ...], b_shape: tuple[int, ...], dtype, device, joint: bool = False
    ):
        self.a_dim = a_shape[-1]
        if joint:
            self._set_buffer(
                torch.zeros(*a_shape[:-1], a_shape[-1] + b_shape[-1], dtype=dtype, device=device)
            )
        else:
            self.buf = None
            self.a = torch.zeros(a_shape, dtype=dtype, device=device)
            self.b = torch.zeros(b_shape, dtype=dtype, device=device)

    def _set_buffer(self, buf: torch.Tensor) -> None:
        self.buf = buf
        self.a, self.b = buf[..., : self.a_dim], buf[..., self.a_dim :]

    def update(self, a: torch.Tensor, b: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write T new entries at [start, start+T) and return views of everything up to start+T."""
        end = start + a.shape[1]
        if end > self.a.shape[1]:
            raise ValueError(f"KV cache is full: {end} tokens > capacity {self.a.shape[1]}")
        self.a[:, start:end] = a.to(self.a.dtype)
        self.b[:, start:end] = b.to(self.b.dtype)
        return self.a[:, :end], self.b[:, :end]

    def reorder(self, index: torch.Tensor) -> None:
        """Select batch rows (beam search, dropping finished sequences)."""
        if self.buf is not None:
            self._set_buffer(self.buf.index_select(0, index))
            return
        self.a = self.a.index_select(0, index)
        self.b = self.b.index_select(0, index)

    def nbytes(self) -> int:
        if self.buf is not None:
            return self.buf.numel() * self.buf.element_size()
        return self.a.numel() * self.a.element_size() + self.b.numel() * self.b.element_size()


def _causal_mask(t: int, s: int, start: int, device) -> torch.Tensor | None:
    """Boolean (T, S) mask: new token i (absolute position start+i) sees positions <= start+i."""
    if t == 1:
        return None  # a single new token sees the whole cache
    q_pos = torch.arange(start, start + t, device=device)[:, None]
    k_pos = torch.arange(s, device=device)[None, :]
    return k_pos <= q_pos


def padding_causal_mask(key_valid: torch.Tensor, t: int, start: int) -> torch.Tensor:
    """Causal mask that also hides padded keys, for left-padded batches.

    Args:
        key_valid: (B, S) bool, True for real tokens, over the cached and the T new positions.
        t: number of new tokens (queries), at absolute cache positions [start, start + t).
        start: tokens already in the cache.
    Returns:
        (B, 1, T, S) bool, True where a query may attend. A padded query also sees itself (a left-padded
        one sees only itself), so its softmax stays finite; its output is never read by a real token.
    """
    s = key_valid.shape[1]
    q_pos = torch.arange(start, start + t, device=key_valid.device)[:, None]  # (T, 1)
    k_pos = torch.arange(s, device=key_valid.device)[None, :]  # (1, S)
    mask = (k_pos <= q_pos) & key_valid[:, None, :]  # (B, T, S)
    return (mask | (k_pos == q_pos)).unsqueeze(1)  # (B, 1, T, S)


def _sdpa(
    q, k, v, scale: float, start: int, dropout_p: float, enable_gqa: bool = False, attn_mask=None
) -> torch.Tensor:
    """SDPA over (B, H, T, d) tensors with a causal mask offset by `start` cached tokens, or with
    `attn_mask` (B, 1, T, S) when given (padded batches)."""
    if q.device.type == "cpu" and torch.is_autocast_enabled("cpu"):
        # CPU autocast would run SDPA in bf16, whose flash-attention backward took 3.6x the fp32 one's
        # time at the `tiny` shapes (AVX-512 BF16 host, torch 2.13; BENCHMARKS.md): attention stays fp32
        with torch.autocast("cpu", enabled=False):
            return _sdpa(q.float(), k.float(), v.float(), scale, start, dropout_p, enable_gqa, attn_mask)
    t, s = q.shape[-2], k.shape[-2]
    dv, dqk = v.shape[-1], q.shape[-1]
    if dv < dqk:
        # flash kernels (CUDA, and the CPU one) need equal QK and V head dims: pad V and slice the
        # output. Without it CPU SDPA falls back to the slower math path (BENCHMARKS.md).
        v = F.pad(v, (0, dqk - dv))
    elif dv > dqk:  # (MLA with v_head_dim > nope + rope) zero columns add nothing to q.k; scale is explicit
        q, k = F.pad(q, (0, dv - dqk)), F.pad(k, (0, dv - dqk))
    if attn_mask is not None:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=attn_mask, scale=scale, dropout_p=dropout_p, enable_gqa=enable_gqa
        )
    elif start == 0 and t == s:
        out = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, scale=scale, dropout_p=dropout_p, enable_gqa=enable_gqa
        )
    else:
        mask = _causal_mask(t, s, start, q.device)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, scale=scale, dropout_p=dropout_p, enable_gqa=enable_gqa
        )
    return out[..., :dv]


class GQAttention(nn.Module):
    """Grouped-query attention with half-split RoPE (Llama/Mixtral/Qwen layout).

    `cfg.qk_norm` adds RMSNorms `q_norm`, `k_norm` on queries and keys before RoPE: "head" normalises
    each head's d numbers with one (d,) weight shared by the heads (Qwen3-MoE), "full" the whole
    projection output with an (H*d,) weight (OLMoE).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_attention_heads, self.num_key_value_heads, self.head_dim = (
            cfg.num_attention_heads,
            cfg.kv_heads,
            cfg.gqa_head_dim,
        )
        d = cfg.hidden_size
        self.q_proj = nn.Linear(d, self.num_attention_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(d, self.num_key_value_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.num_key_value_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.num_attention_heads * self.head_dim, d, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm != "none":
            full = cfg.qk_norm == "full"
            self.q_norm = RMSNorm(self.head_dim * (self.num_attention_heads if full else 1), cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim * (self.num_key_value_heads if full else 1), cfg.rms_norm_eps)
        self.scale = softmax_scale(self.head_dim, cfg.rope_scaling)
        self.attn_dropout = cfg.attn_dropout

    def make_cache(self, batch: int, max_len: int, dtype, device) -> LayerCache:
        shape = (batch, max_len, self.num_key_value_heads, self.head_dim)
        return LayerCache(shape, shape, dtype, device)

    def cache_numbers_per_token(self) -> int:
        return 2 * self.num_key_value_heads * self.head_dim

    def forward(
        self, x, cos, sin, cache: LayerCache | None = None, start: int = 0, attn_mask=None
    ) -> torch.Tensor:
        """attn_mask: optional (B, 1, T, S) bool from `padding_causal_mask` (replaces the causal mask)."""
        B, T, _ = x.shape
        q, k = self.q_proj(x), self.k_proj(x)  # (B, T, H*d), (B, T, Hkv*d)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, T, self.num_attention_heads, self.head_dim)  # (B, T, H, d)
        k = k.view(B, T, self.num_key_value_heads, self.head_dim)  # (B, T, Hkv, d)
        v = self.v_proj(x).view(B, T, self.num_key_value_heads, self.head_dim)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q = apply_rope(q, cos, sin, interleaved=False)
        k = apply_rope(k, cos, sin, interleaved=False)
        if cache is not None:
            k, v = cache.update(k, v, start)  # (B, S, Hkv, d)
        q, k, v = (t.transpose(1, 2) for t in (q, k.to(q.dtype), v.to(q.dtype)))  # (B, H*, S, d)
        p = self.attn_dropout if self.training else 0.0
        y = _sdpa(
            q, k, v, self.scale, start, p, self.num_key_value_heads != self.num_attention_heads, attn_mask
        )
        y = y.transpose(1, 2).reshape(B, T, self.num_attention_heads * self.head_dim)  # (B, T, H*d)
        return self.o_proj(y)


class MLAttention(nn.Module):
    """DeepSeek-V2/V3 multi-head latent attention, HF parameter names, interleaved RoPE."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        d, H = cfg.hidden_size, cfg.num_attention_heads
        self.num_attention_heads = H
        self.q_lora_rank, self.kv_lora_rank = cfg.q_lora_rank, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.qk_dim = self.nope + self.rope
        # DeepSeek's code (its inference/model.py, the remote modeling files, transformers) builds the
        # latent norms with the default eps 1e-6 whatever rms_norm_eps says (Moonlight: 1e-5)
        latent_eps = 1e-6
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(d, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, self.q_lora_rank, bias=False)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, latent_eps)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.kv_lora_rank + self.rope, bias=False)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, latent_eps)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, d, bias=False)
        self.scale = softmax_scale(self.qk_dim, cfg.rope_scaling)
        self.attn_dropout = cfg.attn_dropout

    def make_cache(self, batch: int, max_len: int, dtype, device) -> LayerCache:
        shapes = (batch, max_len, self.kv_lora_rank), (batch, max_len, self.rope)
        return LayerCache(*shapes, dtype, device, joint=True)

    def cache_numbers_per_token(self) -> int:
        return self.kv_lora_rank + self.rope

    def _query(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.num_attention_heads, self.qk_dim)  # (B, T, H, nope+rope)
        return q.split([self.nope, self.rope], dim=-1)

    def forward(
        self,
        x,
        cos,
        sin,
        cache: LayerCache | None = None,
        start: int = 0,
        absorb: bool | None = None,
        attn_mask=None,
    ) -> torch.Tensor:
        """absorb=None picks naive for full sequences and prefill, absorbed when decoding from a cache.
        attn_mask: optional (B, 1, T, S) bool from `padding_causal_mask` (replaces the causal mask)."""
        B, T, _ = x.shape
        q_nope, q_pe = self._query(x)  # (B, T, H, nope), (B, T, H, rope)
        q_pe = apply_rope(q_pe, cos, sin, interleaved=True)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([self.kv_lora_rank, self.rope], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv)  # (B, T, r)
        k_pe = apply_rope(k_pe.unsqueeze(2), cos, sin, interleaved=True).squeeze(2)  # (B, T, rope)
        if absorb is None:
            absorb = cache is not None and start > 0
        if cache is not None:
            c_kv_all, k_pe_all = cache.update(c_kv, k_pe, start)  # (B, S, r), (B, S, rope)
        else:
            c_kv_all, k_pe_all = c_kv, k_pe
        if absorb:
            kv = cache.buf[:, : c_kv_all.shape[1]] if cache is not None and cache.buf is not None else None
            y = self._absorbed(q_nope, q_pe, c_kv_all, k_pe_all, start, attn_mask, kv)
        else:
            if cache is not None and start > 0:
                c_kv, k_pe = c_kv_all.to(x.dtype), k_pe_all.to(x.dtype)
            y = self._naive(q_nope, q_pe, c_kv, k_pe, start, attn_mask)
        return self.o_proj(y.reshape(B, T, self.num_attention_heads * self.v_dim))

    def _naive(self, q_nope, q_pe, c_kv, k_pe, start: int, attn_mask=None) -> torch.Tensor:
        """Expand the latent into per-head keys and values; returns (B, T, H, v)."""
        B, S, _ = c_kv.shape
        H = self.num_attention_heads
        kv = self.kv_b_proj(c_kv).view(B, S, H, self.nope + self.v_dim)  # (B, S, H, nope+v)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_pe[:, :, None, :].expand(B, S, H, self.rope)], dim=-1)  # (B, S, H, qk)
        q = torch.cat([q_nope, q_pe], dim=-1)  # (B, T, H, qk)
        p = self.attn_dropout if self.training else 0.0
        y = _sdpa(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), self.scale, start, p, False, attn_mask
        )
        return y.transpose(1, 2)  # (B, T, H, v)

    def _absorbed(self, q_nope, q_pe, c_kv, k_pe, start: int, attn_mask=None, kv=None) -> torch.Tensor:
        """Attend over the cached latent with kv_b_proj folded in; returns (B, T, H, v).

        Scores are q_nope W_uk . c + q_pe . k_pe = [q_nope W_uk | q_pe] . [c | k_pe]: a single key and
        value head (c, width r) shared by every query head, so all T * H queries of a sequence go
        through one batched matmul per step instead of per-head einsums (decoding runs this per token
        per layer, where the number of kernels, not their FLOPs, sets the speed).
        `kv`: (B, S, r + rope) [c | k_pe] when the cache already holds them side by side.
        """
        B, T, H, _ = q_nope.shape
        r = self.kv_lora_rank
        # in the activations' dtype: a quantized kv_b_proj hands back its weight dequantized in fp32
        w = self.kv_b_proj.weight.to(q_nope.dtype).view(H, self.nope + self.v_dim, r)
        w_uk, w_uv = w[:, : self.nope], w[:, self.nope :]  # (H, nope, r), (H, v, r)
        q_lat = torch.bmm(q_nope.reshape(B * T, H, self.nope).transpose(0, 1), w_uk)  # (H, BT, r)
        q_lat = q_lat.transpose(0, 1).reshape(B, T * H, r)  # rows (t, h)
        q = torch.cat([q_lat, q_pe.reshape(B, T * H, self.rope).to(q_lat.dtype)], dim=-1)  # (B, TH, r+rope)
        k = (kv if kv is not None else torch.cat([c_kv, k_pe], dim=-1)).to(q.dtype)  # (B, S, r + rope)
        S = k.shape[1]
        scores = torch.bmm(q, k.transpose(1, 2)).view(B, T, H, S)  # (B, T, H, S)
        mask = attn_mask if attn_mask is not None else _causal_mask(T, S, start, q.device)
        if mask is not None:  # (T, S) or (B, 1, T, S)
            mask = mask.transpose(1, 2) if mask.dim() == 4 else mask[:, None, :]  # broadcast over H
            scores = scores.masked_fill(~mask, float("-inf"))
        acc = torch.promote_types(scores.dtype, torch.float32)  # fp32 softmax (fp64 stays fp64)
        probs = torch.softmax(scores.to(acc) * self.scale, dim=-1).to(k.dtype)
        if self.training and self.attn_dropout > 0:
            probs = F.dropout(probs, self.attn_dropout)
        o_lat = torch.bmm(probs.view(B, T * H, S), k[..., :r])  # (B, TH, r)
        o = torch.bmm(o_lat.view(B * T, H, r).transpose(0, 1), w_uv.transpose(1, 2))  # (H, BT, v)
        return o.transpose(0, 1).reshape(B, T, H, self.v_dim)


def build_attention(cfg: ModelConfig) -> nn.Module:
    return MLAttention(cfg) if cfg.attn_type == "mla" else GQAttention(cfg)
