"""Weight-only quantization for inference: int8 per output channel, int4 group-wise.

Every `nn.Linear` (attention, dense MLPs, shared experts, MTP projections, an untied LM head) and the
stacked routed-expert weights are replaced by integer weights plus scales; the embedding, norms and
router stay in floating point (the router is tiny and decides which experts run). Weights are
dequantized on the fly in forward, so activations and the KV cache keep the model's dtype.

Both schemes are symmetric (no zero point): w ~= q * scale with
- int8: q in [-127, 127], one fp32 scale per output row (max |w| / 127);
- int4: q in [-8, 7], one fp16 scale per `group_size` inputs of a row (max |w| / 7), stored two
  per byte (low nibble first). Rows are zero-padded to a multiple of the group size.

On CPU in fp32, int8 matmuls use torch's `_weight_int8pack_mm` kernel when a probe shows it matches
the dequantized matmul; everything else dequantizes, then calls the float kernel.

Shape suffixes: E experts, O output features, I input features, G groups per row.
"""

from __future__ import annotations

import functools
import json
import math
import os
import shutil
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minimoe.errors import MinimoeError
from minimoe.files import as_umask_allows, fresh_temp_dir, fsync_dir, fsync_tree, read_json_object
from minimoe.model.expert_kernels import loop_experts
from minimoe.model.experts import GroupedExperts

BITS = (8, 4)


def check_quant_args(bits: int, group_size: int) -> None:
    """Raise MinimoeError for an unsupported bit width or group size."""
    if bits not in BITS:
        raise MinimoeError(f"bits must be 8 or 4, got {bits}")
    if bits == 4 and (group_size < 2 or group_size % 2):
        raise MinimoeError(f"group_size must be a positive even number, got {group_size}")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(..., n) int values in [-8, 7], n even -> (..., n/2) uint8, element 2i in the low nibble."""
    u = (q.to(torch.int16) + 8).to(torch.uint8)  # [0, 15]
    return u[..., 0::2] | (u[..., 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(..., n/2) uint8 -> (..., n) int8 in [-8, 7]; the inverse of pack_int4."""
    lo = (packed & 0xF).to(torch.int8) - 8
    hi = (packed >> 4).to(torch.int8) - 8
    return torch.stack((lo, hi), dim=-1).flatten(-2)


def quantize_tensor(w: torch.Tensor, bits: int, group_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize the rows of `w` (last dim = inputs).

    Args:
        w: (..., O, I) float weight.
        bits: 8 (per-row scale) or 4 (per-group scale).
        group_size: inputs sharing one scale (int4 only).
    Returns:
        int8: q (..., O, I) int8 and scale (..., O, 1) fp32;
        int4: q (..., O, Ipad/2) uint8 (packed) and scale (..., O, G) fp16, Ipad = G * group_size.
    """
    check_quant_args(bits, group_size)
    w = w.detach().float()
    if bits == 8:
        scale = (w.abs().amax(dim=-1, keepdim=True) / 127).clamp(min=1e-12)  # (..., O, 1)
        return (w / scale).round().clamp(-127, 127).to(torch.int8), scale
    n_in = w.shape[-1]
    G = math.ceil(n_in / group_size)
    w = F.pad(w, (0, G * group_size - n_in))  # zero columns quantize to 0 exactly
    w_g = w.unflatten(-1, (G, group_size))  # (..., O, G, gs)
    # fp16 keeps ~3 significant digits; clamp into its normal range so no scale rounds to 0 or inf
    scale = (w_g.abs().amax(dim=-1, keepdim=True) / 7).clamp(min=6.2e-5, max=6e4).half().float()
    q = (w_g / scale).round().clamp(-8, 7).flatten(-2)  # (..., O, Ipad)
    return pack_int4(q), scale.squeeze(-1).half()


def dequantize_tensor(
    q: torch.Tensor, scale: torch.Tensor, bits: int, in_features: int, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Inverse of quantize_tensor: (..., O, I) weights in `dtype`."""
    if bits == 8:
        return (q.float() * scale).to(dtype)
    G = scale.shape[-1]
    vals = unpack_int4(q).float().unflatten(-1, (G, -1))  # (..., O, G, gs)
    return (vals * scale.float().unsqueeze(-1)).flatten(-2)[..., :in_features].to(dtype)


@torch.compiler.disable
@functools.cache
def int8_kernel_works(device_type: str, dtype: torch.dtype) -> bool:
    """Whether torch._weight_int8pack_mm runs here and matches the dequantized matmul (probed once)."""
    if device_type != "cpu" or dtype != torch.float32 or not hasattr(torch, "_weight_int8pack_mm"):
        return False
    try:
        gen = torch.Generator().manual_seed(0)
        w = torch.randn(24, 40, generator=gen)
        q, scale = quantize_tensor(w, 8)
        x = torch.randn(3, 40, generator=gen)
        got = torch._weight_int8pack_mm(x, q, scale.squeeze(-1))
        want = x @ dequantize_tensor(q, scale, 8, 40).T
        return torch.allclose(got, want, rtol=1e-4, atol=1e-4)
    except (RuntimeError, NotImplementedError, TypeError):
        return False


class QuantTensor(nn.Module):
    """A quantized (..., O, I) weight: buffers `qweight` and `scale`; `matmul(x)` computes x @ W^T."""

    def __init__(self, q: torch.Tensor, scale: torch.Tensor, bits: int, group_size: int, in_features: int):
        super().__init__()
        self.bits, self.group_size, self.in_features = bits, group_size, in_features
        self.out_features = q.shape[-2]
        self.register_buffer("qweight", q)
        self.register_buffer("scale", scale)

    @classmethod
    def from_float(cls, w: torch.Tensor, bits: int, group_size: int) -> QuantTensor:
        q, scale = quantize_tensor(w, bits, group_size)
        return cls(q, scale, bits, group_size, w.shape[-1])

    def dequantize(self, index: int | None = None, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The float weight (O, I) of stacked slice `index` (experts), or the whole tensor."""
        q, s = (self.qweight, self.scale) if index is None else (self.qweight[index], self.scale[index])
        return dequantize_tensor(q, s, self.bits, self.in_features, dtype)

    def matmul(self, x: torch.Tensor, index: int | None = None) -> torch.Tensor:
        """x (..., I) -> (..., O) = x @ W[index]^T."""
        if self.bits == 8 and int8_kernel_works(x.device.type, x.dtype):
            q = self.qweight if index is None else self.qweight[index]
            s = self.scale if index is None else self.scale[index]
            y = torch._weight_int8pack_mm(x.reshape(-1, x.shape[-1]), q, s.squeeze(-1))  # (N, O)
            return y.view(*x.shape[:-1], -1)
        return F.linear(x, self.dequantize(index, x.dtype))

    def __getitem__(self, index: int):
        """Slice `index` of stacked weights as a callable x -> x @ W[index]^T (what `loop_experts` calls)."""
        return functools.partial(self.matmul, index=index)

    def extra_repr(self) -> str:
        shape = (*self.qweight.shape[:-1], self.in_features)
        return f"shape={shape}, bits={self.bits}" + (
            f", group_size={self.group_size}" if self.bits == 4 else ""
        )


class QuantLinear(QuantTensor):
    """Drop-in for a bias-free nn.Linear; `.weight` gives the dequantized weight (MLA's absorbed path
    reads kv_b_proj.weight)."""

    @property
    def weight(self) -> torch.Tensor:
        return self.dequantize()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.matmul(x)


class QuantExperts(nn.Module):
    """Drop-in for GroupedExperts with quantized stacked weights: the same `experts(x_ND, counts_E, w_N)`
    call, run by `loop_experts`, so only experts that received tokens are dequantized."""

    def __init__(self, experts: GroupedExperts, bits: int, group_size: int):
        super().__init__()
        self.n_experts, self.hidden, self.inter, self.act = (
            experts.n_experts, experts.hidden, experts.inter, experts.act,
        )  # fmt: skip
        gate = experts.gate_proj
        self.gate_proj = QuantTensor.from_float(gate, bits, group_size) if gate is not None else None
        self.up_proj = QuantTensor.from_float(experts.up_proj, bits, group_size)  # (E, I, D)
        self.down_proj = QuantTensor.from_float(experts.down_proj, bits, group_size)  # (E, D, I)

    def forward(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, scale_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Same contract as GroupedExperts.forward: (N, D) rows sorted by expert -> (N, D)."""
        return loop_experts(x_ND, counts_E, self.gate_proj, self.up_proj, self.down_proj, scale_N)


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@torch.no_grad()
def quantize_model(model: nn.Module, bits: int, group_size: int = 64) -> nn.Module:
    """Quantize a Transformer's Linear and routed-expert weights in place.

    Args:
        model: a minimoe Transformer (any dtype; eval mode recommended).
        bits: 8 or 4.
        group_size: inputs per scale for int4.
    Returns:
        the same model, with `model.quantization = {"bits": ..., "group_size": ...}`.
    """
    check_quant_args(bits, group_size)
    tied = getattr(model, "embed_tokens", None) is not None and getattr(model, "lm_head", None) is not None
    tied = tied and model.lm_head.weight is model.embed_tokens.weight
    for name, mod in list(model.named_modules()):
        if isinstance(mod, nn.Linear):
            if mod.bias is not None or (tied and name == "lm_head"):
                continue  # the tied head is the embedding, which stays in floating point
            _replace(model, name, QuantLinear.from_float(mod.weight, bits, group_size))
        elif isinstance(mod, GroupedExperts):
            _replace(model, name, QuantExperts(mod, bits, group_size))
    model.quantization = {"bits": bits, "group_size": group_size}
    return model


def weight_bytes(model: nn.Module) -> int:
    """Bytes of every distinct tensor in the state dict (parameters and saved buffers)."""
    seen, total = set(), 0
    for t in model.state_dict().values():
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def perplexity(
    model, ids: torch.Tensor, seq_len: int, max_windows: int | None = None, batch_size: int = 8
) -> float:
    """Perplexity of held-out tokens: non-overlapping windows of seq_len + 1 tokens, each scoring its
    last seq_len tokens (the first token of a window is context only).

    Args:
        model: a Transformer in eval mode.
        ids: (N,) int token ids, N >= 2.
        seq_len: tokens scored per window (<= max_position_embeddings).
        max_windows: evaluate only the first windows (None = all).
        batch_size: windows per forward.
    Returns:
        exp(mean next-token cross-entropy).
    """
    seq_len = min(seq_len, model.cfg.max_position_embeddings, ids.numel() - 1)
    if seq_len < 1:
        raise MinimoeError("the evaluation text is too short (needs at least 2 tokens)")
    n = (ids.numel() - 1) // seq_len
    if max_windows is not None:
        n = min(n, max_windows)
    starts = torch.arange(n) * seq_len
    windows = ids[starts[:, None] + torch.arange(seq_len + 1)]  # (n, seq_len + 1)
    device = model.embed_tokens.weight.device
    total, count = 0.0, 0
    for b in range(0, n, batch_size):
        w = windows[b : b + batch_size].to(device)
        logits = model(w[:, :-1]).logits.float()  # (b, seq_len, V)
        total += F.cross_entropy(logits.flatten(0, 1), w[:, 1:].flatten(), reduction="sum").item()
        count += w[:, 1:].numel()
    return math.exp(total / count)


def check_quantized_out(out: str | Path) -> None:
    """Refuse an `out` that exists and is not an empty directory: `save_quantized` writes a new checkpoint
    and replaces nothing. The CLI asks before loading the model, so the refusal costs no work."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise MinimoeError(f"{out} already exists and is not an empty directory; choose another --out")


def save_quantized(model: nn.Module, source_ckpt: str | Path, out: str | Path) -> Path:
    """Write a quantized model as a checkpoint directory that `load_run` reads back.

    The directory holds model.safetensors (integer weights and scales), the source checkpoint's
    config.yaml and tokenizer/, and its meta.json plus `quantization` and `quantized_from`. It is
    written to a temporary sibling, fsynced and renamed, so a failure or a power loss leaves nothing
    half-written.

    Args:
        model: a model returned by quantize_model.
        source_ckpt: the checkpoint directory it was loaded from.
        out: the new directory (must not exist, or be empty).
    Returns:
        the written directory.
    """
    from safetensors.torch import save_model

    src, out = Path(source_ckpt), Path(out)
    if not getattr(model, "quantization", None):
        raise MinimoeError("the model is not quantized; call quantize_model first")
    check_quantized_out(out)
    tmp = fresh_temp_dir(out, "quantize")
    try:
        save_model(model, str(tmp / "model.safetensors"))
        as_umask_allows(tmp / "model.safetensors")
        shutil.copy2(src / "config.yaml", tmp / "config.yaml")
        shutil.copytree(src / "tokenizer", tmp / "tokenizer")
        meta = read_json_object(src / "meta.json")
        meta.pop("path", None)
        meta.update(quantization=dict(model.quantization), quantized_from=str(src.resolve()))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
        fsync_tree(tmp)  # on the disk before the rename: load_run trusts a folder with meta.json
        if out.exists():
            out.rmdir()
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(out.parent)
    return out


def heldout_ids(tokenizer, spec: str | Path, max_tokens: int) -> torch.Tensor:
    """The first `max_tokens` token ids of a text source (any `open_source` spec), documents
    separated by EOS. Returns (N,) int64."""
    from minimoe.data import open_source

    chunks, n = [], 0
    for doc in open_source(str(spec)).documents():
        ids = tokenizer.encode(doc) + [tokenizer.eos_id]
        chunks.append(torch.tensor(ids, dtype=torch.long))
        n += len(ids)
        if n >= max_tokens:
            break
    if n < 2:
        raise MinimoeError(f"{spec} holds too little text to measure perplexity")
    return torch.cat(chunks)[:max_tokens]
