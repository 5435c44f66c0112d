"""Slow, obviously correct reference implementations that the fast paths are tested against."""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

# ---- MoE references ----


def brute_force_group_topk(
    choice: list[float], k: int, n_group: int, topk_group: int, topk_method: str
) -> list[int]:
    """Group-limited top-k for one token by enumeration: score each group (sum of its top-2 for noaux_tc,
    max for group_limited_greedy), try every set of `topk_group` groups, keep the set with the largest
    total, then take the k best experts inside it (greedy: the k best of all). Returns expert ids, best
    first."""
    E = len(choice)
    if topk_method == "greedy":
        n_group = topk_group = 1
    per = E // n_group
    groups = [choice[g * per : (g + 1) * per] for g in range(n_group)]
    if topk_method == "noaux_tc" and n_group > 1:
        group_score = [sum(sorted(g, reverse=True)[:2]) for g in groups]
    else:
        group_score = [max(g) for g in groups]
    best = max(
        itertools.combinations(range(n_group), topk_group), key=lambda c: sum(group_score[g] for g in c)
    )
    allowed = [e for g in best for e in range(g * per, (g + 1) * per)]
    return sorted(allowed, key=lambda e: -choice[e])[:k]


def moe_reference(moe, x: torch.Tensor) -> torch.Tensor:
    """Dropless MoE forward one token at a time, with per-expert (unstacked) weights.

    Args:
        moe: a minimoe.model.moe.MoE (uses its gate, experts and shared_experts weights).
        x: (B, S, D).
    Returns:
        (B, S, D), differentiable with respect to x and every weight.
    """
    gate = moe.gate
    dt = torch.promote_types(x.dtype, torch.float32)
    ups = moe.experts.up_proj.unbind(0)  # HF per-expert weights
    downs = moe.experts.down_proj.unbind(0)
    gates = moe.experts.gate_proj.unbind(0) if moe.experts.gate_proj is not None else None
    bias = gate.e_score_correction_bias
    B, S, D = x.shape
    rows = []
    for x_t in x.reshape(B * S, D):
        logits = gate.weight.to(dt) @ x_t.to(dt)
        scores = logits.softmax(-1) if gate.scoring_func == "softmax" else logits.sigmoid()
        choice = scores if bias is None else scores + bias
        chosen = brute_force_group_topk(
            choice.tolist(), gate.top_k, gate.n_group, gate.topk_group, gate.topk_method
        )
        weights = [scores[e] for e in chosen]
        if gate.norm_topk_prob and gate.top_k > 1:
            total = sum(weights)
            weights = [w / total for w in weights]
        y_t = torch.zeros_like(x_t)
        for e, w in zip(chosen, weights):
            h = F.gelu(ups[e] @ x_t) if gates is None else F.silu(gates[e] @ x_t) * (ups[e] @ x_t)
            y_t = y_t + (w * gate.routed_scaling_factor).to(x.dtype) * (downs[e] @ h)
        if moe.shared_experts is not None:
            y_t = y_t + moe.shared_experts(x_t)
        rows.append(y_t)
    return torch.stack(rows).view(B, S, D)


# ---- attention references ----


def explicit_attention(q, k, v, scale: float):
    """Causal attention with an explicit mask and softmax; q, k: (B, T, H, d), v: (B, T, H, dv)."""
    scores = torch.einsum("bthd,bshd->bhts", q, k) * scale  # (B, H, T, S)
    T, S = scores.shape[-2:]
    mask = torch.ones(T, S, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.einsum("bhts,bshd->bthd", scores.softmax(-1), v)  # (B, T, H, dv)


# ---- generation references ----


@torch.no_grad()
def greedy_no_cache(model, prompt: list[int], max_new_tokens: int, stop_ids=()) -> list[int]:
    """Greedy decoding by re-running the full forward over the whole sequence at every step."""
    seq = list(prompt)
    out = []
    for _ in range(max_new_tokens):
        logits = model(torch.tensor([seq])).logits[0, -1]
        tok = int(logits.argmax())
        if tok in stop_ids:
            break
        out.append(tok)
        seq.append(tok)
    return out


@torch.no_grad()
def sequence_logprob(model, prompt: list[int], tokens: list[int]) -> float:
    """Summed log-probability of `tokens` following `prompt`, from one full forward."""
    seq = torch.tensor([list(prompt) + list(tokens)])
    logp = model(seq).logits[0].double().log_softmax(-1)  # (T, V)
    pos = torch.arange(len(prompt) - 1, len(prompt) - 1 + len(tokens))
    return float(logp[pos, torch.tensor(tokens)].sum())
