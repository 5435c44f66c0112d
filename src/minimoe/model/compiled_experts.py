"""The experts as torch.compile sees them: operators that keep an MoE layer in one graph.

`selected_experts` (decoding) and `trained_experts` (training, with its own backward) run the loop of
model/expert_kernels.py inside custom operators the compiler does not look into; `gathered_experts`
is the decode kernel the compiler does look into, for the few rows of a decode step. `choose_kernel`
(model/experts.py) hands one of them to the compiler.

Shape suffixes: N (token, expert) rows sorted by expert, D hidden, I expert intermediate, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minimoe.model.expert_kernels import _activate, _scaled, loop_experts


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


# A compiled step without gradients takes `gathered_experts` for at most this many rows per expert on
# average and this many rows in all, above that `selected_experts`: each gathered row reads its
# expert's weights again, while the loop reads an expert once for all its rows but pays a Python call
# per expert. Compiled on CPU, one thread, E=8, D=256, I=512: 82 against 167 us at 2 rows, 336 against
# 928 at 16, 1.8 against 2.8 ms at 64, 2.7 against 2.8 ms at 128; wider experts gain more from the
# loop's GEMMs as rows grow. The cap in all keeps many experts (E=256) from reading thousands of
# experts' weights where the loop would read each selected one once.
GATHER_ROWS_PER_EXPERT = 8
GATHER_MAX_ROWS = 64


def gathered_experts(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    gate_EID: torch.Tensor | None,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
    scale_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """`gathered_pairs` for rows sorted by expert: each row's expert from the counts. Same arguments
    and result as `loop_experts`; no gradient."""
    # row n belongs to the first expert whose cumulative count exceeds n
    N = x_ND.shape[0]
    e_N = torch.searchsorted(torch.cumsum(counts_E, 0), torch.arange(N, device=x_ND.device), right=True)
    return gathered_pairs(x_ND, e_N, gate_EID, up_EID, down_EDI, scale_N)


def gathered_pairs(
    x_ND: torch.Tensor,
    e_N: torch.Tensor,
    gate_EID: torch.Tensor | None,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
    scale_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """The experts of a compiled decode step, written for the compiler: row n through expert e_N[n], each
    projection a product-and-sum over that expert's weights, `(w[e_N] * x).sum(-1)`, in any row order
    (no sort). Inductor fuses the weight gather into the reduction, so no (N, I, D) copy is made, no
    Python runs per expert and nothing waits on the host (a CUDA graph can hold it); run eagerly it
    does make the copy (the tests use it so, against `loop_experts`). Under autocast the rows and the
    gathered weights are cast to the autocast dtype, as autocast's matmuls would cast them.

    Args:
        x_ND: (N, D) rows; e_N: (N,) the expert of each row; the weights as `loop_experts` takes them;
        scale_N: optional (N,) factor per row.
    Returns:
        (N, D) outputs times scale_N; no gradient.
    """
    device = x_ND.device.type
    dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x_ND.dtype
    x_N1D = x_ND.to(dtype)[:, None, :]
    gate_NI = (gate_EID[e_N].to(dtype) * x_N1D).sum(-1) if gate_EID is not None else None
    h_NI = _scaled(_activate(gate_NI, (up_EID[e_N].to(dtype) * x_N1D).sum(-1)), scale_N)
    return (down_EDI[e_N].to(dtype) * h_NI[:, None, :]).sum(-1)
