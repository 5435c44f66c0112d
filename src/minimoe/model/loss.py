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


def _chunks(h_ND, w_VD, target_N, valid_N, grad_h_ND, grad_w_VD, mm_dtype=None) -> torch.Tensor:
    """Summed loss over the valid rows; fills grad_h_ND / grad_w_VD (un-normalised) when given.
    With `mm_dtype` (autocast's bf16/fp16) the three matmuls run in it, the softmax in fp32."""
    N, V = h_ND.shape[0], w_VD.shape[0]
    low_w_VD = w_VD if mm_dtype is None else w_VD.to(mm_dtype)
    rows = max(1, CHUNK_ELEMENTS // V)
    safe_N = target_N.masked_fill(~valid_N, 0)  # ignored rows read class 0, then count for nothing
    total = h_ND.new_zeros((), dtype=torch.promote_types(h_ND.dtype, torch.float32))
    for s in range(0, N, rows):
        h_nD, t_n1, v_n = h_ND[s : s + rows], safe_N[s : s + rows, None], valid_N[s : s + rows]
        low_h_nD = h_nD if mm_dtype is None else h_nD.to(mm_dtype)
        logits_nV = (low_h_nD @ low_w_VD.T).to(total.dtype)  # (n, V)
        lse_n = torch.logsumexp(logits_nV, dim=-1)
        total += ((lse_n - logits_nV.gather(1, t_n1).squeeze(1)) * v_n).sum()
        if grad_h_ND is None and grad_w_VD is None:
            continue
        vf_n1 = v_n.to(logits_nV.dtype)[:, None]
        p_nV = logits_nV.sub_(lse_n[:, None]).exp_()  # softmax, in place
        p_nV.scatter_add_(1, t_n1, -vf_n1)  # minus the one-hot target
        p_nV.mul_(vf_n1)  # ignored rows get no gradient
        if mm_dtype is None:
            if grad_h_ND is not None:
                torch.mm(p_nV, w_VD, out=grad_h_ND[s : s + rows])
            if grad_w_VD is not None:
                grad_w_VD.addmm_(p_nV.T, h_nD)
            continue
        p_nV = p_nV.to(mm_dtype)
        if grad_h_ND is not None:
            grad_h_ND[s : s + rows] = p_nV @ low_w_VD
        if grad_w_VD is not None:
            grad_w_VD += p_nV.T @ low_h_nD
    return total


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_ND, w_VD, target_N, ignore_index: int, mm_dtype, none_is_zero: bool = False):
        valid_N = target_N != ignore_index
        n_valid = valid_N.sum().clamp(min=1) if none_is_zero else valid_N.sum()
        grad_h = torch.empty_like(h_ND) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(w_VD) if ctx.needs_input_grad[1] else None
        total = _chunks(h_ND, w_VD, target_N, valid_N, grad_h, grad_w, mm_dtype)
        ctx.save_for_backward(grad_h, grad_w, n_valid)
        return total / n_valid  # mean over valid targets; NaN when none (as F.cross_entropy) or 0

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, n_valid = ctx.saved_tensors
        scale = grad_loss / n_valid
        return (
            grad_h * scale.to(grad_h.dtype) if grad_h is not None else None,
            grad_w * scale.to(grad_w.dtype) if grad_w is not None else None,
            None,
            None,
            None,
            None,
        )


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int = -100,
    none_is_zero: bool = False,
) -> torch.Tensor:
    """Mean next-token cross-entropy of logits `h @ weight.T` without materialising them.

    Args:
        h: (..., D) final hidden states (after the final norm).
        weight: (V, D) LM head weight.
        targets: (...) class ids; `ignore_index` marks positions that do not count.
        none_is_zero: with no position that counts, 0 (and no gradient) rather than F.cross_entropy's NaN.
    Returns:
        scalar loss in h's dtype promoted to at least fp32; differentiable in h and weight.

    Under autocast the matmuls run in autocast's dtype, as a plain `lm_head` Linear's would, and the
    softmax and the loss in fp32, as autocast runs `cross_entropy`; a bf16 or fp16 model without autocast
    multiplies in its own dtype the same way.
    """
    h_ND, target_N = h.reshape(-1, h.shape[-1]), targets.reshape(-1)
    device = h.device.type
    mm_dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
    if mm_dtype is None and h.dtype in (torch.bfloat16, torch.float16):
        mm_dtype = h.dtype  # the softmax still runs in fp32; the gradients come back in h's dtype
    with torch.autocast(device, enabled=False):  # the chunks cast for themselves
        if torch.is_grad_enabled() and (h.requires_grad or weight.requires_grad):
            return _LinearCrossEntropy.apply(h_ND, weight, target_N, ignore_index, mm_dtype, none_is_zero)
        valid_N = target_N != ignore_index
        count = valid_N.sum().clamp(min=1) if none_is_zero else valid_N.sum()
        return _chunks(h_ND, weight, target_N, valid_N, None, None, mm_dtype) / count
