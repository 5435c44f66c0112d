"""Rotary position embeddings with optional YaRN scaling, as pure functions.

Two layouts rotate the same pairs of frequencies but store them differently:
- interleaved: dims (2i, 2i+1) form pair i (DeepSeek's complex multiply; HF `deepseek_v3`
  with `rope_interleave=True`). MLA uses it so exported weights need no permutation.
- half-split: dims (i, i + d/2) form pair i (Llama / Mixtral / Qwen `rotate_half`). GQA uses it.
"""

from __future__ import annotations

import math

import torch


def yarn_get_mscale(scale: float = 1.0, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * mscale * ln(scale) + 1 for scale > 1 (DeepSeek-V2)."""
    if scale <= 1:
        return 1.0
    return 0.1 * mscale * math.log(scale) + 1.0


def _correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    # the dimension index whose wavelength makes `num_rotations` turns over `max_pos` positions
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def yarn_inv_freq(dim: int, base: float, rope_scaling: dict) -> torch.Tensor:
    """YaRN inverse frequencies (dim/2,): high-frequency dims keep the original frequency,
    low-frequency dims are interpolated by `factor`, with a linear ramp between
    `beta_fast` and `beta_slow` rotations over the original context."""
    factor = float(rope_scaling["factor"])
    orig = int(rope_scaling["original_max_position_embeddings"])
    beta_fast = float(rope_scaling.get("beta_fast", 32))
    beta_slow = float(rope_scaling.get("beta_slow", 1))
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim)
    inv_extra = 1.0 / pos_freqs
    inv_inter = 1.0 / (factor * pos_freqs)
    low = max(math.floor(_correction_dim(beta_fast, dim, base, orig)), 0)
    high = min(math.ceil(_correction_dim(beta_slow, dim, base, orig)), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    extra_weight = 1.0 - ramp
    return inv_inter * (1 - extra_weight) + inv_extra * extra_weight


def yarn_attention_factor(rope_scaling: dict) -> float:
    """Factor applied to cos/sin, following HF's YaRN: mscale(f, mscale) / mscale(f, mscale_all_dim)
    when both are given (1.0 for DeepSeek-V3's config), else mscale(f)."""
    factor = float(rope_scaling["factor"])
    if "mscale" in rope_scaling and "mscale_all_dim" in rope_scaling:
        return yarn_get_mscale(factor, rope_scaling["mscale"]) / yarn_get_mscale(
            factor, rope_scaling["mscale_all_dim"]
        )
    return yarn_get_mscale(factor)


def softmax_scale(qk_head_dim: int, rope_scaling: dict | None) -> float:
    """1/sqrt(d), times mscale(factor, mscale_all_dim)^2 under DeepSeek YaRN."""
    scale = qk_head_dim**-0.5
    if rope_scaling and rope_scaling.get("mscale_all_dim"):
        m = yarn_get_mscale(float(rope_scaling["factor"]), float(rope_scaling["mscale_all_dim"]))
        scale = scale * m * m
    return scale


def rope_cos_sin(
    dim: int, max_len: int, base: float, rope_scaling: dict | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Tables cos, sin of shape (max_len, dim/2) in fp32."""
    if rope_scaling:
        inv_freq = yarn_inv_freq(dim, base, rope_scaling)
        attn_factor = yarn_attention_factor(rope_scaling)
    else:
        inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))
        attn_factor = 1.0
    t = torch.arange(max_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)  # (L, dim/2)
    return (freqs.cos() * attn_factor).float(), (freqs.sin() * attn_factor).float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """Rotate the last dim of x (..., T, H, d) by position tables cos/sin (T, d/2), or (B, T, d/2) when
    each row has its own positions (left-padded batches)."""
    dtype = x.dtype
    # at least fp32; fp64 stays fp64, so float64 tests compare paths without fp32 rounding in between
    x = x.to(torch.promote_types(dtype, torch.float32))
    cos, sin = cos.to(x.dtype), sin.to(x.dtype)
    if interleaved and torch.compiler.is_compiling():
        # inductor generates no complex kernels (it would call eager ones); the real form of the
        # same rotation fuses into one kernel
        x1, x2 = x[..., 0::2], x[..., 1::2]  # pairs (2i, 2i+1)
        cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
        return torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).flatten(-2).to(dtype)
    if interleaved:
        # pairs (2i, 2i+1) are complex numbers: one complex multiply rotates them all (3 kernels
        # instead of 12 per call; RoPE runs twice per layer per decoded token)
        rot = torch.complex(cos, sin).unsqueeze(-2)  # (T, 1, d/2) or (B, T, 1, d/2)
        x_c = torch.view_as_complex(x.unflatten(-1, (-1, 2)).contiguous())  # (..., d/2)
        return torch.view_as_real(x_c * rot).flatten(-2).to(dtype)
    cos = cos.unsqueeze(-2)  # (T, 1, d/2) or (B, T, 1, d/2): broadcast over heads
    sin = sin.unsqueeze(-2)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # pairs (i, i + d/2)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).to(dtype)
