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


def moe_reference(moe, x: torch.Tensor, capacity: int | None = None) -> torch.Tensor:
    """MoE forward one token at a time, with per-expert (unstacked) weights: dropless, or with each expert
    taking its first `capacity` tokens in token order (first come, first served) and dropping the rest.

    Args:
        moe: a minimoe.model.moe.MoE (uses its gate, experts and shared_experts weights).
        x: (B, S, D).
        capacity: pairs each expert keeps (None: every pair).
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
    rows, taken = [], [0] * len(ups)
    for x_t in x.reshape(B * S, D):
        logits = gate.weight.to(dt) @ x_t.to(dt)
        scores = logits.softmax(-1) if gate.cfg.scoring_func == "softmax" else logits.sigmoid()
        choice = scores if bias is None else scores + bias
        chosen = brute_force_group_topk(
            choice.tolist(),
            gate.cfg.num_experts_per_tok,
            gate.cfg.n_group,
            gate.cfg.topk_group,
            gate.cfg.effective_topk_method,
        )
        weights = [scores[e] for e in chosen]
        if gate.cfg.norm_topk_prob and gate.cfg.num_experts_per_tok > 1:
            total = sum(weights)
            weights = [w / total for w in weights]
        y_t = torch.zeros_like(x_t)
        for e, w in zip(chosen, weights):
            taken[e] += 1
            if capacity is not None and taken[e] > capacity:
                continue  # dropped: the expert is full
            h = F.gelu(ups[e] @ x_t) if gates is None else F.silu(gates[e] @ x_t) * (ups[e] @ x_t)
            y_t = y_t + (w * gate.cfg.routed_scaling_factor).to(x.dtype) * (downs[e] @ h)
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


# ---- published checkpoint references ----


def _rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def _swiglu(x: torch.Tensor, t: dict, pre: str) -> torch.Tensor:
    gate, up, down = (t[f"{pre}{n}_proj.weight"] for n in ("gate", "up", "down"))
    return F.linear(F.silu(F.linear(x, gate)) * F.linear(x, up), down)


def deepseek_moe_forward(t: dict[str, torch.Tensor], c: dict, ids: torch.Tensor) -> torch.Tensor:
    """DeepSeekMoE 16B (`model_type: deepseek`, DeepSeek's remote modeling code) straight from its
    published tensor names and config.json keys, in float64, routing one token at a time.

    As the published model describes it: Llama attention (q/k/v/o_proj, `num_key_value_heads` heads of
    keys and values, half-split RoPE over the whole head, scale head_dim^-0.5, causal); layer i is MoE
    when i >= first_k_dense_replace and i % moe_layer_freq == 0, else a SwiGLU MLP of intermediate_size.
    The MoE gate `mlp.gate.weight` scores all experts with a softmax, keeps the num_experts_per_tok
    best, renormalises their weights only when norm_topk_prob and k > 1, and adds `mlp.shared_experts`
    (one SwiGLU of width n_shared_experts * moe_intermediate_size) for every token. Pre-norm RMSNorm
    blocks, a final `model.norm`, an untied `lm_head`.

    Args:
        t: tensor name -> tensor, as in the checkpoint.
        c: the parsed config.json.
        ids: (B, T) token ids.
    Returns:
        (B, T, vocab_size) float64 logits.
    """
    t = {k: v.double() for k, v in t.items()}
    H, Hkv, D = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    d, eps, k = D // H, c["rms_norm_eps"], c["num_experts_per_tok"]
    B, T = ids.shape
    inv_freq = 1.0 / c["rope_theta"] ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angle = torch.arange(T, dtype=torch.float64)[:, None] * inv_freq  # (T, d/2)
    angle = torch.cat([angle, angle], dim=-1)[:, None, :]  # (T, 1, d): pairs (i, i + d/2)

    def rope(x):  # (B, T, heads, d)
        x1, x2 = x[..., : d // 2], x[..., d // 2 :]
        return x * angle.cos() + torch.cat([-x2, x1], dim=-1) * angle.sin()

    h = t["model.embed_tokens.weight"][ids]  # (B, T, D)
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        x = _rms_norm(h, t[p + "input_layernorm.weight"], eps)
        q = F.linear(x, t[p + "self_attn.q_proj.weight"]).view(B, T, H, d)
        key = F.linear(x, t[p + "self_attn.k_proj.weight"]).view(B, T, Hkv, d)
        v = F.linear(x, t[p + "self_attn.v_proj.weight"]).view(B, T, Hkv, d)
        key, v = key.repeat_interleave(H // Hkv, dim=2), v.repeat_interleave(H // Hkv, dim=2)
        a = explicit_attention(rope(q), rope(key), v, d**-0.5).reshape(B, T, D)
        h = h + F.linear(a, t[p + "self_attn.o_proj.weight"])
        x = _rms_norm(h, t[p + "post_attention_layernorm.weight"], eps)
        if i >= c["first_k_dense_replace"] and i % c["moe_layer_freq"] == 0:
            rows = []
            for x_t in x.reshape(B * T, D):
                scores = F.linear(x_t, t[p + "mlp.gate.weight"]).softmax(dim=-1)
                weights, experts = scores.topk(k)
                if c["norm_topk_prob"] and k > 1:
                    weights = weights / weights.sum()
                y_t = sum(
                    w * _swiglu(x_t, t, f"{p}mlp.experts.{e}.") for w, e in zip(weights, experts.tolist())
                )
                rows.append(y_t + _swiglu(x_t, t, p + "mlp.shared_experts."))
            y = torch.stack(rows).view(B, T, D)
        else:
            y = _swiglu(x, t, p + "mlp.")
        h = h + y
    return F.linear(_rms_norm(h, t["model.norm.weight"], eps), t["lm_head.weight"])


# ---- multi-token prediction ----


def mtp_reference(model, input_ids: torch.Tensor, hidden: torch.Tensor) -> list[torch.Tensor]:
    """MTP logits of every depth, written out from the DeepSeek-V3 layout: depth k at position i is
    head(norm(Block(eh_proj(cat[enorm(emb(t_{i+k})), hnorm(h_i)])))), where h is the previous depth's
    block output (for depth 1 the main model's last hidden state after its final norm, as DeepSeek-V3's
    released modeling code feeds it) and eh_proj's first D input columns take the embedding (as the
    released checkpoints store it).

    Args:
        model: a Transformer with MTP modules.
        input_ids: (B, T) tokens.
        hidden: (B, T, D) main-model hidden states before the final norm (ModelOutput.hidden).
    Returns:
        one (B, T - k, V) logits tensor per depth k = 1, 2, ...
    """
    T, D = input_ids.shape[1], hidden.shape[-1]
    eps = model.cfg.rms_norm_eps
    h, out = _rms_norm(hidden, model.norm.weight, eps), []
    for k, m in enumerate(model.mtp, start=1):
        emb = model.embed_tokens(input_ids[:, k:])  # (B, T-k, D)
        w = m.eh_proj.weight  # (D, 2D)
        x = (
            _rms_norm(emb, m.enorm.weight, eps) @ w[:, :D].T
            + _rms_norm(h[:, : T - k], m.hnorm.weight, eps) @ w[:, D:].T
        )
        h, _ = m.block(x, model.rope_cos[: T - k], model.rope_sin[: T - k])
        out.append(model.lm_head(_rms_norm(h, m.norm.weight, eps)))
    return out


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
