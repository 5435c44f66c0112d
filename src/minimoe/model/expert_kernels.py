"""The routed experts' kernels: one call, `kernel(x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N)`,
on rows already sorted by expert, answered by `torch._grouped_mm` over expert offsets
(`grouped_mm_experts`) or by one small MLP per contiguous slice (`loop_experts`). `GroupedExperts`
(model/experts.py) picks one per call; model/compiled_experts.py wraps them for torch.compile.

Shape suffixes: N (token, expert) rows sorted by expert, D hidden, I expert intermediate, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _activate(gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU when there is a gate projection, GELU otherwise."""
    return F.gelu(up) if gate is None else F.silu(gate) * up


def _scaled(h_NI: torch.Tensor, scale_N: torch.Tensor | None) -> torch.Tensor:
    # down_proj is linear, so scaling its input row equals scaling its output row; on I columns
    # instead of D that is cheaper, and a broadcast multiply over a wide (N, D) tensor was the
    # single largest non-matmul cost of the layer on CPU (profiled at D=256, I=64).
    return h_NI if scale_N is None else h_NI * scale_N.to(h_NI.dtype).unsqueeze(-1)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: `_grouped_mm`'s backward rejects
    stride-0 gradients such as the one `y.sum().backward()` produces."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous()


# Below this expert width, grouped_mm_experts concatenates gate and up into one GEMM per call: a narrow
# GEMM runs below peak, every expert's GEMM pays a fixed per-call cost on CPU, and x's gradient needs
# one fewer (N, D) add; at 256 and above copying the (E, 2I, D) weights every call costs about what it
# saves. The `tiny` MoE layer (I = 128, CPU bf16 autocast, forward + backward): fused 0.97x the separate
# GEMMs' time at 2 threads and at 1; I = 64: 0.95x; I = 256: 1.01x (BENCHMARKS.md).
FUSE_GATE_UP_BELOW = 256


def _gmm(x_NK: torch.Tensor, w_ENK: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    # Pass the weight transposed rather than storing it [E, K, N]: that is the layout whose backward
    # works in torch 2.13 on CPU (the [E, K, N] layout's backward fails there).
    return _ContiguousGrad.apply(torch._grouped_mm(x_NK, w_ENK.transpose(-2, -1), offs=offs_E))


def grouped_mm_experts(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    gate_EID: torch.Tensor | None,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
    scale_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """Experts as grouped GEMMs over expert offsets (gate+up fused for thin experts); no host sync.

    Args:
        x_ND: (N, D) rows sorted by expert, contiguous.
        counts_E: (E,) rows per expert, summing to N.
        gate_EID: (E, I, D) or None (GELU); up_EID: (E, I, D); down_EDI: (E, D, I).
        scale_N: optional (N,) factor per row (the gate weights), applied before down_proj.
    Returns:
        (N, D) expert outputs in the same row order, times scale_N.
    """
    offs_E = torch.cumsum(counts_E, dim=0).to(torch.int32)  # grouped_mm wants int32 end offsets
    if gate_EID is not None and gate_EID.shape[1] < FUSE_GATE_UP_BELOW:
        # fine-grained experts: one (E, 2I, D) GEMM instead of two thin (E, I, D) ones
        gate_NI, up_NI = _gmm(x_ND, torch.cat([gate_EID, up_EID], dim=1), offs_E).chunk(2, dim=-1)
    else:
        gate_NI = _gmm(x_ND, gate_EID, offs_E) if gate_EID is not None else None
        up_NI = _gmm(x_ND, up_EID, offs_E)
    return _gmm(_scaled(_activate(gate_NI, up_NI), scale_N), down_EDI, offs_E)


def loop_experts(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    gate_EID,
    up_EID,
    down_EDI,
    scale_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """Experts as one small MLP per contiguous slice. Same arguments and result as `grouped_mm_experts`,
    except that the weights may also be quantized (minimoe.infer.quantize.QuantTensor: `w[e]` is then a
    callable x -> x @ W_e^T).
    """
    # One host sync for all split sizes; a per-expert `.item()` would stall a GPU E times.
    sizes = counts_E.tolist()
    gates, ups, downs = (_per_expert(w) for w in (gate_EID, up_EID, down_EDI))
    ys, start = [], 0
    for e, n in enumerate(sizes):
        if n == 0:
            continue
        x_nD = x_ND[start : start + n]
        scale_n = scale_N[start : start + n] if scale_N is not None else None
        start += n
        gate_nI = _matmul(x_nD, gates[e]) if gates is not None else None
        h_nI = _scaled(_activate(gate_nI, _matmul(x_nD, ups[e])), scale_n)
        ys.append(_matmul(h_nI, downs[e]))
    return torch.cat(ys) if ys else x_ND * 0.0  # no rows at all: stay in the graph


def _per_expert(w):
    """Something indexable by expert. A float weight that autograd records is unbound once: indexing
    w[e] per expert would make backward allocate a full (E, I, D) zero gradient per expert. Otherwise
    (decoding, quantized weights) w[e] is taken for the experts that have rows only."""
    if isinstance(w, torch.Tensor) and torch.is_grad_enabled() and w.requires_grad:
        return w.unbind(0)
    return w


def _matmul(x: torch.Tensor, w) -> torch.Tensor:
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)
