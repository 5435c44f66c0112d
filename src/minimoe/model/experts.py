"""Feed-forward blocks: the dense MLP (dense layers, shared experts) and the stacked routed experts.

The MoE layer makes one call, `experts(x_ND, counts_E, w_N)`, on rows already sorted by expert (in the
compiled decode step, `experts.pairs(x_TD, idx_TK, w_TK)` on the unsorted pairs instead).
`GroupedExperts` answers it with a kernel picked per call by `choose_kernel`: from
model/expert_kernels.py (`torch._grouped_mm` over expert offsets, or a loop over contiguous slices,
also the eager decode kernel), or under torch.compile from model/compiled_experts.py, so the layer
compiles as one graph. Quantized experts (infer/quantize.py) and expert parallelism (dist/ep.py) are
other modules with the same call, swapped in for `GroupedExperts`.

Shape suffixes: N (token, expert) rows sorted by expert, D hidden, I expert intermediate, E experts.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from minimoe.errors import ConfigError
from minimoe.model.compiled_experts import (
    GATHER_MAX_ROWS,
    GATHER_ROWS_PER_EXPERT,
    compiled_training_experts,
    gathered_experts,
    gathered_pairs,
    selected_experts,
)
from minimoe.model.expert_kernels import _activate, grouped_mm_experts, loop_experts


class MLP(nn.Module):
    """Dense FFN with HF names: SwiGLU `down(silu(gate(x)) * up(x))`, or GELU `down(gelu(up(x)))`
    (no `gate_proj`). Used for dense layers and for the shared experts."""

    def __init__(self, hidden: int, inter: int, act: str = "swiglu"):
        super().__init__()
        if act not in ("swiglu", "gelu"):
            raise ValueError(f"act must be 'swiglu' or 'gelu', got {act!r}")
        self.act = act
        self.gate_proj = nn.Linear(hidden, inter, bias=False) if act == "swiglu" else None
        self.up_proj = nn.Linear(hidden, inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (..., D) -> (..., D)."""
        gate = self.gate_proj(x) if self.gate_proj is not None else None
        return self.down_proj(_activate(gate, self.up_proj(x)))


def _aligned(n: int, dtype: torch.dtype) -> bool:
    return n * torch.empty((), dtype=dtype).element_size() % 16 == 0


# Under torch.compile the probe runs at trace time and its answer is a constant of the graph (a
# disabled function would break the graph at every MoE layer). The marker sits on a plain function:
# on the functools.cache wrapper itself dynamo would ignore it and trace the probe.
@torch.compiler.assume_constant_result
def grouped_mm_works(device_type: str, dtype: torch.dtype, d_aligned: bool, i_aligned: bool) -> bool:
    """`_probe_grouped_mm`, cached per key (`grouped_mm_works.cache_clear()` probes afresh)."""
    return _probe_grouped_mm(device_type, dtype, d_aligned, i_aligned)


@functools.cache
def _probe_grouped_mm(device_type: str, dtype: torch.dtype, d_aligned: bool, i_aligned: bool) -> bool:
    """Whether `torch._grouped_mm` gives the loop's outputs and gradients on this backend.

    Probed once per key on a tiny case whose dims have the same 16-byte alignment as the real ones
    (grouped_mm needs 16-byte-aligned strides; fp64 is not supported at all). Cached, not global state:
    the answer depends only on the key.

    Args:
        device_type: "cpu", "cuda", ...
        dtype: compute dtype.
        d_aligned, i_aligned: whether hidden / intermediate rows are a multiple of 16 bytes.
    Returns:
        True when forward and backward run and match the loop.
    """
    if not hasattr(torch, "_grouped_mm") or device_type == "meta":
        return False
    d = 16 if d_aligned else 17
    i = 16 if i_aligned else 17
    counts = [3, 0, 5, 2]  # includes an empty expert, which real batches have
    try:
        # identity saved-tensor hooks shield the probe from an enclosing activation checkpoint, whose
        # hooks would otherwise count the probe's tensors and fail on recomputation (probe is cached);
        # no autocast, which would run the loop's F.linear in another dtype than grouped_mm (a first
        # call under autocast would otherwise cache "does not work" for `dtype` everywhere)
        identity = (lambda t: t, lambda t: t)
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(*identity),
            torch.autocast(device_type, enabled=False),
        ):
            gen = torch.Generator().manual_seed(0)
            tensors = [
                torch.randn(sum(counts), d, generator=gen),
                torch.randn(4, i, d, generator=gen),
                torch.randn(4, i, d, generator=gen),
                torch.randn(4, d, i, generator=gen),
            ]
            tensors = [t.to(device=device_type, dtype=dtype) for t in tensors]
            counts_E = torch.tensor(counts, device=device_type)
            results = []
            for kernel in (grouped_mm_experts, loop_experts):
                leaves = [t.detach().requires_grad_() for t in tensors]
                y = kernel(leaves[0], counts_E, *leaves[1:])
                y.backward(torch.ones_like(y))
                results.append([y.detach()] + [t.grad for t in leaves])
        if dtype in (torch.float32, torch.float64):
            return all(torch.allclose(a, b, rtol=1e-4, atol=1e-4) for a, b in zip(*results))
        # bf16/fp16: the two kernels round differently, so single elements of the sum differ by a few
        # units of the last place (on CPU, bf16 grouped_mm and the loop are equally far from fp64: 0.5%
        # relative error each at the `tiny` shapes); compare whole tensors instead
        return all((a.float() - b.float()).norm() <= 2e-2 * b.float().norm() for a, b in zip(*results))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):
        return False


grouped_mm_works.cache_clear = _probe_grouped_mm.cache_clear


def resolve_impl(impl: str, x: torch.Tensor, hidden: int, inter: int) -> str:
    """Pick the expert kernel for `x`'s device and dtype.

    "auto" takes grouped_mm wherever the probe says it works. Measured on CPU (torch 2.13, fp32, whole
    MoE layer fwd+bwd, interleaved A/B, best of 18): within 3% of the loop when every expert gets
    hundreds of rows (D=256-512, E=8-32, T=2048-4096), 8% faster at E=16/I=512, and 1.35-1.9x faster
    when the loop's per-expert Python overhead dominates (E=64 with T=512 or T=64). On GPU it also
    avoids the loop's host sync. "grouped_mm" on a backend where it does not work raises ConfigError
    instead of a stride error deep in torch.

    Args:
        impl: "auto", "grouped_mm" or "loop".
        x: the (N, D) input, for its device and dtype.
        hidden, inter: D and I.
    Returns:
        "grouped_mm" or "loop".
    """
    if impl == "loop":
        return impl
    compiling = torch.compiler.is_compiling()
    # torch 2.13's fake-tensor rule for _grouped_mm accepts bf16 only: other dtypes cannot be traced
    works = (not compiling or x.dtype == torch.bfloat16) and grouped_mm_works(
        x.device.type, x.dtype, _aligned(hidden, x.dtype), _aligned(inter, x.dtype)
    )
    if impl == "grouped_mm" and not works:
        where = f"{x.dtype} on {x.device.type}" + (" under torch.compile" if compiling else "")
        raise ConfigError(
            f"moe_impl 'grouped_mm' does not work for {where} with hidden_size {hidden} and "
            f"moe_intermediate_size {inter} (it needs 16-byte-aligned rows); use auto or loop"
        )
    return "grouped_mm" if works else "loop"


def choose_kernel(impl: str, x_ND: torch.Tensor, n_experts: int, hidden: int, inter: int):
    """The kernel that runs the experts on these rows: `grouped_mm_experts` or `loop_experts`. Under
    torch.compile without gradients: `gathered_experts` where `_gathered_fits` (few rows, or CUDA),
    which the compiler fuses, else the loop as one operator it does not look into (`selected_experts`); with
    gradients, grouped_mm where it traces (bf16), else `compiled_training_experts` (`trained_experts`: the
    loop with its backward, one operator). Either way an MoE layer does not break the graph.

    Decoding (no gradient, on CPU, at most one row per expert) takes the loop: a handful of
    matrix-vector products whose cost is reading the weights, where grouped_mm would add offsets and,
    for thin experts, a copy of every expert's gate and up weights. No rows at all take the loop too
    (grouped_mm's backward rejects an empty input). Otherwise `resolve_impl` decides.
    """
    if torch.compiler.is_compiling():
        if not torch.is_grad_enabled():
            return gathered_experts if _gathered_fits(x_ND, x_ND.shape[0], n_experts) else selected_experts
        if resolve_impl(impl, x_ND, hidden, inter) == "grouped_mm":
            return grouped_mm_experts  # traceable where its fake-tensor rule allows (bf16)
        return compiled_training_experts
    N = x_ND.shape[0]
    if N == 0 or (x_ND.device.type == "cpu" and not torch.is_grad_enabled() and N <= n_experts):
        return loop_experts
    return grouped_mm_experts if resolve_impl(impl, x_ND, hidden, inter) == "grouped_mm" else loop_experts


def _gathered_fits(x: torch.Tensor, N: int, n_experts: int) -> bool:
    """Whether a compiled step without gradients takes `gathered_experts` for N rows on x's device. On
    CUDA always: the step is replayed as a CUDA graph, which cannot wait for the loop's split sizes on
    the host. On the CPU for few rows (see GATHER_ROWS_PER_EXPERT) and without autocast (the thresholds
    were measured in fp32; under CPU autocast the loop's oneDNN bf16 matmuls are kept)."""
    if x.device.type == "cuda":
        return True
    few = N <= min(GATHER_MAX_ROWS, GATHER_ROWS_PER_EXPERT * n_experts)
    return few and not torch.is_autocast_enabled(x.device.type)


# oneDNN, which runs bf16/fp16 matmuls on CPU, JIT-builds a kernel for every GEMM shape it has not seen,
# and the experts' row counts change every step: building cost as much as running (the `tiny` MoE layer,
# forward + backward under bf16 autocast, 1 thread: 50 ms with new counts every call, 28 ms with repeated
# ones; fp32 51 ms either way). The MoE layer pads every expert's rows to a multiple of this
# (model/dispatch.py), so the shapes repeat after a few steps, for at most this many wasted rows per expert.
CPU_LOW_PRECISION_ROWS = 64


def pad_multiple(x: torch.Tensor, n_rows: int, n_experts: int) -> int:
    """The multiple the MoE layer pads each expert's rows to: CPU_LOW_PRECISION_ROWS for bf16/fp16 rows on
    the CPU with more rows than experts (decoding, one row per expert at most, has one shape anyway),
    outside torch.compile; else 1 (no padding)."""
    low = x.dtype in (torch.bfloat16, torch.float16)
    pads = low and x.device.type == "cpu" and n_rows > n_experts and not torch.compiler.is_compiling()
    return CPU_LOW_PRECISION_ROWS if pads else 1


def rank_in_expert(expert_sorted_N: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
    """(N,) position of each row within its expert's slice (0, 1, ... per expert), for rows sorted by
    expert: `expert_sorted_N` (N,) each row's expert, `counts_E` (E,) rows per expert."""
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    return torch.arange(expert_sorted_N.numel(), device=expert_sorted_N.device) - starts_E[expert_sorted_N]


class GroupedExperts(nn.Module):
    """E routed experts stored stacked in HF/torchtitan layout: `gate_proj` (E, I, D) (SwiGLU only),
    `up_proj` (E, I, D), `down_proj` (E, D, I); `unbind(0)` gives HF's per-expert weights.

    The MoE layer calls `experts(x_ND, counts_E, w_N)` on rows sorted by expert; this module picks the
    kernel (`choose_kernel`). Other implementations of the same call plug in by replacing the module:
    quantized weights (minimoe.infer.quantize.QuantExperts) and expert parallelism
    (minimoe.dist.ep.ExpertParallel).
    """

    def __init__(
        self,
        n_experts: int,
        hidden: int,
        inter: int,
        act: str = "swiglu",
        impl: str = "auto",
        initializer_range: float = 0.02,
    ):
        super().__init__()
        if act not in ("swiglu", "gelu"):
            raise ValueError(f"act must be 'swiglu' or 'gelu', got {act!r}")
        self.n_experts, self.hidden, self.inter, self.act, self.impl = n_experts, hidden, inter, act, impl
        self.gate_proj = nn.Parameter(torch.empty(n_experts, inter, hidden)) if act == "swiglu" else None
        self.up_proj = nn.Parameter(torch.empty(n_experts, inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(n_experts, hidden, inter))
        self.reset_parameters(initializer_range)

    def reset_parameters(self, std: float = 0.02) -> None:
        for p in self.parameters():
            nn.init.normal_(p, std=std)

    def forward(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, scale_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run each expert on its contiguous slice.

        Args:
            x_ND: (N, D) tokens sorted by expert.
            counts_E: (E,) int tokens per expert, summing to N.
            scale_N: optional (N,) factor per row, e.g. the gate weights; y_n = scale_n * expert(x_n).
        Returns:
            (N, D) outputs, same order.
        """
        gate, up, down = self.gate_proj, self.up_proj, self.down_proj
        device = x_ND.device.type
        if torch.is_autocast_enabled(device):
            # autocast casts every Linear's inputs but not torch._grouped_mm's: cast them here, so the
            # experts' GEMMs run in the autocast dtype like the rest of the model (the loop's F.linear
            # would cast anyway). Gradients reach the fp32 weights through the casts.
            dt = torch.get_autocast_dtype(device)
            x_ND, up, down = x_ND.to(dt), up.to(dt), down.to(dt)
            gate = gate.to(dt) if gate is not None else None
        kernel = choose_kernel(self.impl, x_ND, self.n_experts, self.hidden, self.inter)
        return kernel(x_ND.contiguous(), counts_E, gate, up, down, scale_N)

    def takes_pairs(self, x_TD: torch.Tensor, k: int) -> bool:
        """Whether the MoE layer should hand these T tokens to `pairs` instead of sorting their T * k
        pairs by expert: under torch.compile without gradients where the pairs are few enough for
        `gathered_experts` (the compiled decode step), which reads each pair's expert weights
        itself and so needs no sort."""
        compiling = torch.compiler.is_compiling() and not torch.is_grad_enabled()
        return compiling and _gathered_fits(x_TD, x_TD.shape[0] * k, self.n_experts)

    def pairs(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, scale_TK: torch.Tensor) -> torch.Tensor:
        """Every token through each of its K experts, in pair order: x_TD (T, D) tokens, idx_TK (T, K)
        their experts, scale_TK (T, K) the gate weights -> (T, K, D) outputs times the gate weights
        (`gathered_pairs`; no gradient, no sort). The experts' part of what `forward` computes on the
        sorted pairs, for the compiled decode step (`takes_pairs`)."""
        T, K = idx_TK.shape
        x_ND = x_TD[:, None, :].expand(T, K, x_TD.shape[1]).reshape(T * K, -1)
        g, u, d = self.gate_proj, self.up_proj, self.down_proj
        return gathered_pairs(x_ND, idx_TK.reshape(-1), g, u, d, scale_TK.reshape(-1)).view(T, K, -1)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, hidden={self.hidden}, inter={self.inter}, act={self.act}"
