"""Feed-forward blocks: the dense MLP (dense layers, shared experts) and the stacked routed experts.

The MoE layer makes one call, `experts(x_ND, counts_E, w_N)`, on rows already sorted by expert.
`GroupedExperts` answers it with one of two kernels, picked per call by `choose_kernel`:
`torch._grouped_mm` over expert offsets, or a loop over contiguous slices (also the decode kernel:
a few rows without gradient); torch.compile gets the loop wrapped as custom operators
(`selected_experts`, `trained_experts`), so the layer compiles as one graph. Quantized experts
(infer/quantize.py) and expert parallelism (dist/ep.py) are other modules with the same call, swapped
in for `GroupedExperts`.

Shape suffixes: N (token, expert) rows sorted by expert, D hidden, I expert intermediate, E experts.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn

from minimoe.errors import ConfigError


def _activate(gate: torch.Tensor | None, up: torch.Tensor) -> torch.Tensor:
    """SwiGLU when there is a gate projection, GELU otherwise."""
    return F.gelu(up) if gate is None else F.silu(gate) * up


def _scaled(h_NI: torch.Tensor, scale_N: torch.Tensor | None) -> torch.Tensor:
    # down_proj is linear, so scaling its input row equals scaling its output row; on I columns
    # instead of D that is cheaper, and a broadcast multiply over a wide (N, D) tensor was the
    # single largest non-matmul cost of the layer on CPU (profiled at D=256, I=64).
    return h_NI if scale_N is None else h_NI * scale_N.to(h_NI.dtype).unsqueeze(-1)


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


# ---------------------------------------------------------------------------------------- kernels


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
# GEMM runs well below peak and x's gradient needs one fewer (N, D) add, while for wide experts copying
# the (E, 2I, D) weights every call costs more than it saves (the A/B timing is in BENCHMARKS.md).
FUSE_GATE_UP_BELOW = 128


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


@torch.library.custom_op("minimoe::selected_experts", mutates_args=())
def selected_experts(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    gate_EID: torch.Tensor | None,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
    scale_N: torch.Tensor | None,
) -> torch.Tensor:
    """`loop_experts` as one opaque operator for torch.compile (the compiled decode step,
    minimoe.infer.static): inside it the experts with rows run as matrix-vector products on views of
    their weights (no copy; experts without rows are not read), while the graph around it keeps fixed
    shapes, since the output is (N, D) whatever the routing."""
    return loop_experts(x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N)


@selected_experts.register_fake
def _(x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N):
    return x_ND.new_empty(x_ND.shape[0], down_EDI.shape[1])


@torch.library.custom_op("minimoe::trained_experts", mutates_args=())
def trained_experts(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    gate_EID: torch.Tensor | None,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
    scale_N: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The training experts as one opaque operator for torch.compile (`train.compile`), which cannot
    trace grouped_mm in fp32 (its fake-tensor rule is bf16-only in torch 2.13) and would break the
    graph at the loop's host sync in every MoE layer. One matmul per expert slice, as `loop_experts`.

    Returns:
        y_ND: (N, D) outputs times scale_N, as the other kernels.
        pre_NH: the activation's inputs, saved for the backward: gate and up (N, 2I) for SwiGLU,
            up (N, I) for GELU.
    """
    with torch.autocast(x_ND.device.type, enabled=False):
        return _trained_forward(x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N)


def _trained_forward(x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N):
    ys, pres, start = [], [], 0
    for e, n in enumerate(counts_E.tolist()):
        x_nD = x_ND[start : start + n]
        up_nI = F.linear(x_nD, _w(up_EID, e, x_ND))
        gate_nI = F.linear(x_nD, _w(gate_EID, e, x_ND)) if gate_EID is not None else None
        pres.append(up_nI if gate_nI is None else torch.cat([gate_nI, up_nI], dim=-1))
        scale_n = scale_N[start : start + n] if scale_N is not None else None
        ys.append(F.linear(_scaled(_activate(gate_nI, up_nI), scale_n), _w(down_EDI, e, x_ND)))
        start += n
    return torch.cat(ys), torch.cat(pres)


@trained_experts.register_fake
def _(x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N):
    width = up_EID.shape[1] * (1 if gate_EID is None else 2)
    return x_ND.new_empty(x_ND.shape[0], down_EDI.shape[1]), x_ND.new_empty(x_ND.shape[0], width)


@torch.library.custom_op("minimoe::trained_experts_backward", mutates_args=())
def trained_experts_backward(
    grad_ND: torch.Tensor,
    x_ND: torch.Tensor,
    pre_NH: torch.Tensor,
    counts_E: torch.Tensor,
    gate_EID: torch.Tensor | None,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
    scale_N: torch.Tensor | None,
    weights: bool,
) -> list[torch.Tensor]:
    """Gradients of `trained_experts` for x, the weights present and scale_N (in that order), by the
    chain rule per expert slice; tested against autograd through `loop_experts`. Without `weights`
    (frozen experts, e.g. LoRA elsewhere) the weight gradients are left zero and not computed."""
    with torch.autocast(x_ND.device.type, enabled=False):
        return _trained_backward(
            grad_ND, x_ND, pre_NH, counts_E, gate_EID, up_EID, down_EDI, scale_N, weights
        )


def _trained_backward(grad_ND, x_ND, pre_NH, counts_E, gate_EID, up_EID, down_EDI, scale_N, weights):
    I = up_EID.shape[1]
    if gate_EID is not None:
        gate_NI, up_NI = pre_NH[:, :I], pre_NH[:, I:]
        act_NI = F.silu(gate_NI)
    else:
        gate_NI, up_NI = None, pre_NH
        act_NI = F.gelu(up_NI)
    h_NI = act_NI * up_NI if gate_NI is not None else act_NI  # the activation's output, before scale
    g_x = torch.empty_like(x_ND)
    g_gate = torch.zeros_like(gate_EID) if gate_EID is not None else None
    g_up, g_down = torch.zeros_like(up_EID), torch.zeros_like(down_EDI)
    g_scale = torch.empty_like(scale_N) if scale_N is not None else None
    start = 0
    for e, n in enumerate(counts_E.tolist()):
        if n == 0:
            continue
        rows = slice(start, start + n)
        start += n
        dy_nD, x_nD, h_nI = grad_ND[rows], x_ND[rows], h_NI[rows]
        s_n1 = scale_N[rows].to(h_nI.dtype).unsqueeze(-1) if scale_N is not None else None
        hs_nI = h_nI if s_n1 is None else h_nI * s_n1
        if weights:
            g_down[e] = dy_nD.t() @ hs_nI
        dhs_nI = dy_nD @ _w(down_EDI, e, x_ND)
        if s_n1 is not None:
            g_scale[rows] = (dhs_nI * h_nI).sum(-1)
            dhs_nI = dhs_nI * s_n1
        if gate_EID is not None:
            d_up_nI = dhs_nI * act_NI[rows]
            d_gate_nI = torch.ops.aten.silu_backward(dhs_nI * up_NI[rows], gate_NI[rows])
            if weights:
                g_gate[e] = d_gate_nI.t() @ x_nD
            g_x[rows] = d_gate_nI @ _w(gate_EID, e, x_ND) + d_up_nI @ _w(up_EID, e, x_ND)
        else:
            d_up_nI = torch.ops.aten.gelu_backward(dhs_nI, up_NI[rows])
            g_x[rows] = d_up_nI @ _w(up_EID, e, x_ND)
        if weights:
            g_up[e] = d_up_nI.t() @ x_nD
    return [t for t in (g_x, g_gate, g_up, g_down, g_scale) if t is not None]


@trained_experts_backward.register_fake
def _(grad_ND, x_ND, pre_NH, counts_E, gate_EID, up_EID, down_EDI, scale_N, weights):
    return [torch.empty_like(t) for t in (x_ND, gate_EID, up_EID, down_EDI, scale_N) if t is not None]


def _setup_trained(ctx, inputs, output):
    x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N = inputs
    ctx.has_gate, ctx.has_scale = gate_EID is not None, scale_N is not None
    ctx.save_for_backward(x_ND, output[1], counts_E, gate_EID, up_EID, down_EDI, scale_N)


def _backward_trained(ctx, grad_ND, _grad_pre):
    weights = any(ctx.needs_input_grad[2:5])
    grads = iter(trained_experts_backward(grad_ND.contiguous(), *ctx.saved_tensors, weights))
    g_x = next(grads)
    g_gate = next(grads) if ctx.has_gate else None
    g_up, g_down = next(grads), next(grads)
    g_scale = next(grads) if ctx.has_scale else None
    if not weights:
        g_gate = g_up = g_down = None
    return g_x, None, g_gate, g_up, g_down, g_scale


trained_experts.register_autograd(_backward_trained, setup_context=_setup_trained)


def _w(w_EAB: torch.Tensor, e: int, x: torch.Tensor) -> torch.Tensor:
    # expert e's weight in the rows' dtype (bf16 rows may meet fp32 weights and gate scales)
    return w_EAB[e].to(x.dtype)


def compiled_training_experts(x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N=None):
    """The kernel `choose_kernel` gives torch.compile when it traces training: `trained_experts`.
    Under autocast the rows go in at the autocast dtype, so the experts compute in it as eager
    autocast would (the operator itself runs with autocast off, as its fake implementation assumes)."""
    device = x_ND.device.type
    if torch.is_autocast_enabled(device):
        x_ND = x_ND.to(torch.get_autocast_dtype(device))
    return trained_experts(x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N)[0]


def _per_expert(w):
    """Something indexable by expert. A float weight that autograd records is unbound once: indexing
    w[e] per expert would make backward allocate a full (E, I, D) zero gradient per expert. Otherwise
    (decoding, quantized weights) w[e] is taken for the experts that have rows only."""
    if isinstance(w, torch.Tensor) and torch.is_grad_enabled() and w.requires_grad:
        return w.unbind(0)
    return w


def _matmul(x: torch.Tensor, w) -> torch.Tensor:
    return F.linear(x, w) if isinstance(w, torch.Tensor) else w(x)


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
        # hooks would otherwise count the probe's tensors and fail on recomputation (probe is cached)
        identity = (lambda t: t, lambda t: t)
        with (
            torch.inference_mode(False),
            torch.enable_grad(),
            torch.autograd.graph.saved_tensors_hooks(*identity),
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
        tol = 1e-4 if dtype == torch.float32 else 5e-2
        return all(torch.allclose(a.float(), b.float(), rtol=tol, atol=tol) for a, b in zip(*results))
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
    """The kernel that runs the experts on these rows: `grouped_mm_experts` or `loop_experts`; under
    torch.compile, grouped_mm where it traces (bf16), else the loop as one operator the compiler does
    not look into: `selected_experts` for inference, `trained_experts` (with its backward) for training,
    so that an MoE layer does not break the graph.

    Decoding (no gradient, on CPU, at most one row per expert) takes the loop: a handful of
    matrix-vector products whose cost is reading the weights, where grouped_mm would add offsets and,
    for thin experts, a copy of every expert's gate and up weights. No rows at all take the loop too
    (grouped_mm's backward rejects an empty input). Otherwise `resolve_impl` decides.
    """
    if torch.compiler.is_compiling():
        if not torch.is_grad_enabled():
            return selected_experts
        if resolve_impl(impl, x_ND, hidden, inter) == "grouped_mm":
            return grouped_mm_experts  # traceable where its fake-tensor rule allows (bf16)
        return compiled_training_experts
    N = x_ND.shape[0]
    if N == 0 or (x_ND.device.type == "cpu" and not torch.is_grad_enabled() and N <= n_experts):
        return loop_experts
    return grouped_mm_experts if resolve_impl(impl, x_ND, hidden, inter) == "grouped_mm" else loop_experts


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
        kernel = choose_kernel(self.impl, x_ND, self.n_experts, self.hidden, self.inter)
        return kernel(x_ND.contiguous(), counts_E, self.gate_proj, self.up_proj, self.down_proj, scale_N)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, hidden={self.hidden}, inter={self.inter}, act={self.act}"
