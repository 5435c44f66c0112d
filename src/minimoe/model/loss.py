"""Cross-entropy of the LM head fused with the head's matmul, over chunks of tokens.

The plain path materialises (N, V) logits, their log-softmax, a zero-filled gradient and the
log-softmax gradient: four passes over N * V floats that miss the cache when the vocabulary is much
wider than the hidden size (the `tiny` preset: V = 4096, D = 192). Here each chunk of tokens computes
its logits, its loss and, when training, its gradient (softmax minus one-hot) while the chunk is
still in cache, then folds that gradient into dL/dh and dL/dW with two matmuls; nothing of size
N * V outlives a chunk. The backward only scales the stored gradients. Same result as
`F.cross_entropy(F.linear(h, w), targets)` up to float reassociation (tests/test_model.py).

Shape suffixes: N tokens, D hidden, V vocabulary.
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 1 << 21  # logits per chunk (8 MiB in fp32): rows per chunk = CHUNK_ELEMENTS // V


def _chunks(h_ND, w_VD, target_N, valid_N, grad_h_ND, grad_w_VD) -> torch.Tensor:
    """Summed loss over the valid rows; fills grad_h_ND / grad_w_VD (un-normalised) when given."""
    N, V = h_ND.shape[0], w_VD.shape[0]
    rows = max(1, CHUNK_ELEMENTS // V)
    safe_N = target_N.masked_fill(~valid_N, 0)  # ignored rows read class 0, then count for nothing
    total = h_ND.new_zeros((), dtype=torch.promote_types(h_ND.dtype, torch.float32))
    for s in range(0, N, rows):
        h_nD, t_n1, v_n = h_ND[s : s + rows], safe_N[s : s + rows, None], valid_N[s : s + rows]
        logits_nV = h_nD @ w_VD.T  # (n, V)
        lse_n = torch.logsumexp(logits_nV, dim=-1)
        total += ((lse_n - logits_nV.gather(1, t_n1).squeeze(1)) * v_n).sum()
        if grad_h_ND is None and grad_w_VD is None:
            continue
        vf_n1 = v_n.to(logits_nV.dtype)[:, None]
        p_nV = logits_nV.sub_(lse_n[:, None]).exp_()  # softmax, in place
        p_nV.scatter_add_(1, t_n1, -vf_n1)  # minus the one-hot target
        p_nV.mul_(vf_n1)  # ignored rows get no gradient
        if grad_h_ND is not None:
            torch.mm(p_nV, w_VD, out=grad_h_ND[s : s + rows])
        if grad_w_VD is not None:
            grad_w_VD.addmm_(p_nV.T, h_nD)
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, target_N, ignore_index: int):
        valid_N = target_N != ignore_index
        n_valid = valid_N.sum()
        grad_h = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_VD) if ctx.needs_input_grad[1] else None
        total = _chunks(h_ND, w_VD, target_N, valid_N, grad_h, grad_w)
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        return total / n_valid  # mean over valid targets; NaN when none, as F.cross_entropy

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid
        return (
            grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * scale.to(grad_w.dtype) if grad_w is not None else None,
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int = -100
) -> torch.Tensor:
    """Mean next-token cross-entropy of logits `h @ weight.T` without materialising them.

    Args:
        h: (..., D) final hidden states (after the final norm).
        weight: (V, D) LM head weight.
        targets: (...) class ids; `ignore_index` marks positions that do not count.
    Returns:
        scalar loss in h's dtype promoted to at least fp32; differentiable in h and weight.
    """
    h_ND, target_N = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
        return _LinearCrossEntropy.apply(h_ND, weight, target_N, ignore_index)
    valid_N = target_N != ignore_index
    return _chunks(h_ND, weight, target_N, valid_N, None, None) / valid_N.sum()
