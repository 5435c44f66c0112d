"""Dropless dispatch and combine: where each (token, expert) pair's row goes, the gather of the tokens
into those rows, and the sum of each token's K expert outputs, with backward passes that are gathers.

Every token has exactly K rows when no capacity drops pairs, so both directions can gather: the rows
from the tokens (`token_P`) and each token's K rows (`slot_TK`). Autograd alone would give
`index_select` a scatter-add backward, which on CPU expands its index to the rows' full width; for
the `tiny` MoE layer (forward + backward, CPU bf16) the scatter-adds and the padding copies they
replace cost about a fifth of the layer's time. Each expert's rows may be padded to a multiple of
`multiple` rows (`experts.pad_multiple`: CPU bf16, whose GEMM kernels are built per shape); a pad
row holds token 0 with gate weight 0, so it adds nothing and its gradients vanish.

Shape suffixes: T tokens, K experts per token, N = T * K pairs, P rows (N plus the padding), D hidden,
E routed experts.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from minimoe.model.experts import rank_in_expert


class ExpertRows(NamedTuple):
    token_P: torch.Tensor  # (P,) token of each row (pad rows: token 0)
    slot_TK: torch.Tensor  # (T, K) row of each (token, k) pair
    counts_E: torch.Tensor  # (E,) rows per expert, padding included; rows are sorted by expert


def expert_rows(topk_idx_TK: torch.Tensor, counts_E: torch.Tensor, multiple: int = 1) -> ExpertRows:
    """Rows for the experts: the pairs stably sorted by expert (token order inside an expert), each
    expert's slice padded to a multiple of `multiple` rows.

    Args:
        topk_idx_TK: (T, K) expert of each pair.
        counts_E: (E,) pairs per expert.
        multiple: pad each expert's rows to a multiple of this (1: no padding, no host sync).
    Returns:
        ExpertRows.
    """
    T, K = topk_idx_TK.shape
    expert_sorted_N, order_N = torch.sort(topk_idx_TK.reshape(-1), stable=True)
    if multiple == 1:
        # P = N: the sorted position of each pair is the inverse of the sort's permutation
        slot_N = torch.empty_like(order_N).index_copy_(
            0, order_N, torch.arange(order_N.numel(), device=order_N.device)
        )
        return ExpertRows(order_N // K, slot_N.view(T, K), counts_E)
    counts_E = counts_E.to(torch.long)
    padded_E = (counts_E + multiple - 1) // multiple * multiple
    start_E = torch.cumsum(padded_E, 0) - padded_E
    # the padded row of each sorted pair
    dest_N = start_E[expert_sorted_N] + rank_in_expert(expert_sorted_N, counts_E)
    P = int(padded_E.sum())  # a host sync: padding runs on the CPU only, where it waits for nothing
    token_P = torch.zeros(P, dtype=torch.long, device=order_N.device).index_copy_(0, dest_N, order_N // K)
    slot_N = torch.empty_like(dest_N).index_copy_(0, order_N, dest_N)
    return ExpertRows(token_P, slot_N.view(T, K), padded_E)


def row_weights(weight_TK: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """(P,) gate weight of each row from (T, K) weights; 0 on pad rows. Differentiable in weight_TK."""
    P = rows.token_P.shape[0]
    return weight_TK.new_zeros(P).index_copy(0, rows.slot_TK.reshape(-1), weight_TK.reshape(-1))


def dispatch(x_TD: torch.Tensor, rows: ExpertRows) -> torch.Tensor:
    """(T, D) tokens -> (P, D) expert rows; backward sums each token's K row gradients."""
    return _Dispatch.apply(x_TD, rows.token_P, rows.slot_TK)


def combine(y_PD: torch.Tensor, rows: ExpertRows, dtype: torch.dtype) -> torch.Tensor:
    """(P, D) expert outputs (already times their gate weights) -> (T, D): each token's K rows summed
    in `dtype`; backward hands every row its token's gradient."""
    return _Combine.apply(y_PD, rows.token_P, rows.slot_TK, dtype)


def _sum_rows(src_PD: torch.Tensor, slot_TK: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """out[t] = sum_k src[slot[t, k]], accumulated in `dtype`: K gathers of T rows (a gather of all T*K
    rows and a sum over the middle dimension is slower on CPU)."""
    out = src_PD.index_select(0, slot_TK[:, 0]).to(dtype)
    for k in range(1, slot_TK.shape[1]):
        out.add_(src_PD.index_select(0, slot_TK[:, k]))
    return out


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_P, slot_TK):
        ctx.save_for_backward(slot_TK)
        return x_TD.index_select(0, token_P)

    @staticmethod
    def backward(ctx, grad_PD):
        (slot_TK,) = ctx.saved_tensors
        # pad rows are left out: their gradient is zero (gate weight 0)
        return _sum_rows(grad_PD, slot_TK, grad_PD.dtype), None, None


class _Combine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_PD, token_P, slot_TK, dtype):
        ctx.save_for_backward(token_P)
        ctx.row_dtype = y_PD.dtype
        return _sum_rows(y_PD, slot_TK, dtype)

    @staticmethod
    def backward(ctx, grad_TD):
        (token_P,) = ctx.saved_tensors
        # cast before the gather: the P rows are more than the T tokens. Pad rows get token 0's
        # gradient, which their gate weight of 0 stops before it reaches a weight or a token.
        return grad_TD.to(ctx.row_dtype).index_select(0, token_P), None, None, None
