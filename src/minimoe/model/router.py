"""Router: expert scores, group-limited top-k with the selection-only balancing bias, jitter, and the
balance losses (token-level and sequence-wise aux loss, z-loss) as small pure functions.

Shape suffixes: B batch, S sequence length, T tokens (B*S), D hidden, E routed experts,
K experts per token, G expert groups.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from minimoe.config import ModelConfig


def router_scores(logits_TE: torch.Tensor, scoring_func: str) -> torch.Tensor:
    """Affinities from router logits.

    Args:
        logits_TE: (T, E) router logits (fp32 or wider).
        scoring_func: "softmax" (DeepSeekMoE, Mixtral) or "sigmoid" (DeepSeek-V3).
    Returns:
        (T, E) scores, same dtype as the logits.
    """
    if scoring_func == "softmax":
        return logits_TE.softmax(dim=-1)
    if scoring_func == "sigmoid":
        return logits_TE.sigmoid()
    raise ValueError(f"unknown scoring_func {scoring_func!r}")


def group_limited_topk(
    choice_TE: torch.Tensor, k: int, n_group: int = 1, topk_group: int = 1, topk_method: str = "noaux_tc"
) -> torch.Tensor:
    """Top-k experts per token, restricted to the `topk_group` best of `n_group` expert groups.

    `topk_method` (HF names) scores a group: "noaux_tc" by the sum of its top-2 choices (DeepSeek-V3),
    "group_limited_greedy" by its best one (DeepSeek-V2); "greedy" limits no groups.

    Args:
        choice_TE: (T, E) selection scores (scores plus the balancing bias when it is on).
        k: experts per token.
        n_group: number of contiguous expert groups; 1 disables group limiting.
        topk_group: groups kept per token.
        topk_method: the group score rule (`ModelConfig.effective_topk_method`).
    Returns:
        (T, K) int64 expert indices, in descending order of choice score.
    """
    T, E = choice_TE.shape
    if n_group > 1 and topk_group < n_group and topk_method != "greedy":
        choice_TGe = choice_TE.view(T, n_group, E // n_group)  # (T, G, E/G)
        if topk_method == "noaux_tc":
            group_TG = choice_TGe.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_TG = choice_TGe.amax(dim=-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_TG.topk(topk_group, dim=-1).indices, True)
        keep_TE = keep_TG.repeat_interleave(E // n_group, dim=1)  # (T, E)
        # -inf keeps the selection inside the kept groups. A 0.0 mask (DeepSeek's remote code before its
        # 2025 fix, and transformers' DeepseekV3 before it followed; 5.23, tested here, masks with -inf)
        # lets a negatively biased score lose to a dropped group's expert.
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    return choice_TE.topk(k, dim=-1).indices


def route(
    scores_TE: torch.Tensor, bias_E: torch.Tensor | None, cfg: ModelConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose experts and their gate weights.

    The bias only steers selection (DeepSeek-V3 aux-loss-free balancing); the gate weights are the
    unbiased scores of the chosen experts, optionally renormalised over them, times the scaling factor.

    Args:
        scores_TE: (T, E) scores from `router_scores`.
        bias_E: (E,) selection bias, or None.
        cfg: the model config; read here: `num_experts_per_tok` (k), group-limited routing (`n_group`,
            `topk_group`, `effective_topk_method`, see `group_limited_topk`), `scoring_func` ("sigmoid"
            adds HF's 1e-20 to the renormalisation's denominator), `norm_topk_prob` (renormalise the k
            weights to sum to 1, only when k > 1: with k = 1 it would make every weight 1.0 and cut the
            router off from the LM loss; HF DeepSeek-V2 does the same) and `routed_scaling_factor`
            (multiplies the final weights; DeepSeek-V3: 2.5).
    Returns:
        topk_idx_TK: (T, K) int64 expert indices.
        topk_weight_TK: (T, K) gate weights, dtype of `scores_TE`.
    """
    k = cfg.num_experts_per_tok
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    topk_idx_TK = group_limited_topk(choice_TE, k, cfg.n_group, cfg.topk_group, cfg.effective_topk_method)
    topk_weight_TK = scores_TE.gather(1, topk_idx_TK)
    if cfg.norm_topk_prob and k > 1:
        # HF adds 1e-20 for sigmoid, whose top-k scores need not sum to anything in particular
        eps = 1e-20 if cfg.scoring_func == "sigmoid" else 0.0
        topk_weight_TK = topk_weight_TK / (topk_weight_TK.sum(dim=-1, keepdim=True) + eps)
    return topk_idx_TK, topk_weight_TK * cfg.routed_scaling_factor


def expert_counts(
    topk_idx: torch.Tensor,
    n_experts: int,
    dtype: torch.dtype = torch.float32,
    valid: torch.Tensor | None = None,
) -> torch.Tensor:
    """(..., K) expert indices -> (E,) token-slot counts per expert, in `dtype`; with `valid` (...) bool,
    of the valid tokens only. A scatter-add rather than bincount: the output is (E,) by construction,
    which torch.compile can trace as a fixed shape (bincount's size depends on the data)."""
    idx = topk_idx.reshape(-1)
    counts = torch.zeros(n_experts, dtype=dtype, device=idx.device)
    if valid is None:
        w = torch.ones_like(idx, dtype=dtype)
    else:
        w = valid[..., None].expand(topk_idx.shape).reshape(-1).to(dtype)
    return counts.scatter_add_(0, idx, w)


def _token_mean(x: torch.Tensor, valid: torch.Tensor | None, dim: int) -> torch.Tensor:
    """x (..., E) averaged over the tokens of `dim`; with `valid` (x's shape but E) bool, over the valid
    ones only."""
    if valid is None:
        return x.mean(dim=dim)
    return (x * valid[..., None]).sum(dim=dim) / valid.sum(dim=dim).clamp(min=1)[..., None].to(x.dtype)


def _normalised(scores: torch.Tensor) -> torch.Tensor:
    # V3 eq. 19: s_i / sum_j s_j (a no-op for softmax); the epsilon guards all-underflowed sigmoids
    return scores / (scores.sum(dim=-1, keepdim=True) + 1e-20)


def load_balance_loss(
    scores_TE: torch.Tensor, topk_idx_TK: torch.Tensor, alpha: float, valid_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Token-level (batch) balance loss, alpha * sum_i f_i * P_i.

    f_i = E / (K * T) * count_i (1.0 everywhere when balanced), P_i = mean over tokens of s_i / sum_j s_j.
    Only P carries gradient.

    Args:
        scores_TE: (T, E) unbiased scores.
        topk_idx_TK: (T, K) chosen experts.
        alpha: loss weight.
        valid_T: optional (T,) bool: the tokens that count (T is then their number).
    Returns:
        scalar loss in the scores' dtype.
    """
    T, E = scores_TE.shape
    K = topk_idx_TK.shape[1]
    n = T if valid_T is None else valid_T.sum().clamp(min=1).to(scores_TE.dtype)
    f_E = expert_counts(topk_idx_TK, E, scores_TE.dtype, valid_T) * (E / (K * n))
    P_E = _token_mean(_normalised(scores_TE), valid_T, 0)
    return alpha * (f_E * P_E).sum()


def seq_load_balance_loss(
    scores_BSE: torch.Tensor, topk_idx_BSK: torch.Tensor, alpha: float, valid_BS: torch.Tensor | None = None
) -> torch.Tensor:
    """Sequence-wise balance loss (DeepSeek-V3 eq. 17-20): the token-level loss per sequence, averaged
    over sequences.

    Args:
        scores_BSE: (B, S, E) unbiased scores.
        topk_idx_BSK: (B, S, K) chosen experts.
        alpha: loss weight.
        valid_BS: optional (B, S) bool: the tokens that count (each sequence's S is then its number).
    Returns:
        scalar loss in the scores' dtype.
    """
    B, S, E = scores_BSE.shape
    K = topk_idx_BSK.shape[-1]
    counts_BE = torch.zeros(B, E, dtype=scores_BSE.dtype, device=scores_BSE.device)
    if valid_BS is None:
        w, n = counts_BE.new_ones(B, S * K), S
    else:
        w = valid_BS[..., None].expand(B, S, K).reshape(B, S * K).to(counts_BE.dtype)
        n = valid_BS.sum(dim=1, keepdim=True).clamp(min=1).to(counts_BE.dtype)  # (B, 1)
    counts_BE.scatter_add_(1, topk_idx_BSK.reshape(B, S * K), w)
    f_BE = counts_BE * (E / (K * n))
    P_BE = _token_mean(_normalised(scores_BSE), valid_BS, 1)
    return alpha * (f_BE * P_BE).sum(dim=-1).mean()


def router_z(logits_TE: torch.Tensor, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """The unweighted ST-MoE router z: mean over tokens (the valid ones, with `valid_T` (T,) bool) of
    logsumexp(logits)^2. logits_TE: (T, E)."""
    z_T = torch.logsumexp(logits_TE, dim=-1).square()
    if valid_T is None:
        return z_T.mean()
    return (z_T * valid_T).sum() / valid_T.sum().clamp(min=1)


def router_z_loss(logits_TE: torch.Tensor, coef: float, valid_T: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss: coef * `router_z`."""
    return coef * router_z(logits_TE, valid_T)


def bias_update(load_E: torch.Tensor, speed: float, scoring_func: str) -> torch.Tensor:
    """Delta for the aux-loss-free balancing bias from one step's loads.

    Sigmoid: speed * sign(mean_load - load_i) (DeepSeek-V3). Softmax: the paper's appendix finds the sign
    rule works poorly there and uses a proportional rule; we use speed * (mean_load - load_i) / mean_load,
    normalised so the step size does not depend on the batch size. An expert that took every token moves
    by (E/K - 1) * speed, so this rule wants a smaller speed than the sign rule. Both rules are invariant
    to scaling all loads, so counts doubled by activation checkpointing re-running the forward do no harm.

    Args:
        load_E: (E,) token counts per expert.
        speed: update speed u.
        scoring_func: picks the rule.
    Returns:
        (E,) fp32 delta to add to the bias (zero when nothing was routed).
    """
    load_E = load_E.float()
    mean = load_E.mean()
    if scoring_func == "sigmoid":
        return speed * torch.sign(mean - load_E)
    return speed * (mean - load_E) / mean.clamp_min(1e-9)


class RouterOutput(NamedTuple):
    topk_idx: torch.Tensor  # (T, K) int64
    topk_weight: torch.Tensor  # (T, K) fp32 (fp64 for fp64 inputs)
    counts: torch.Tensor  # (E,) int64 token-slot counts, before any capacity dropping (exact at any T*K)
    aux_loss: torch.Tensor  # scalar: token-level + sequence-wise, already weighted; 0 when off
    z_loss: torch.Tensor  # scalar, already weighted; 0 when off
    z: torch.Tensor  # scalar, the unweighted z (detached) whatever z_loss_coef is, for the alert; 0 in eval


class Router(nn.Module):
    """DeepSeek-style gate: `weight` (E, D) (HF `mlp.gate.weight`) and the fp32 selection bias buffer
    `e_score_correction_bias` (E,) when `aux_free_bias`. The forward only reads the bias; the training
    loop moves it once per optimizer step (`update_bias`, called by minimoe.train.balance). Every routing
    setting is read from `cfg` (the model config) when it is used."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        E = cfg.n_routed_experts
        self.weight = nn.Parameter(torch.empty(E, cfg.hidden_size))
        nn.init.normal_(self.weight, std=cfg.initializer_range)
        # Only models that use the bias carry it, so checkpoints and parameter counts match HF
        # (DeepSeek-V3 stores it; DeepSeekMoE 16B has none).
        bias = torch.zeros(E, dtype=torch.float32) if cfg.aux_free_bias else None
        self.register_buffer("e_score_correction_bias", bias)

    def _apply(self, fn, recurse=True):
        # Keep the balancing bias fp32 under model.to(bfloat16): bias steps of 1e-3 vanish in bf16.
        # Only the device follows `fn`.
        old = self.e_score_correction_bias
        super()._apply(fn, recurse)
        new = self.e_score_correction_bias
        if old is not None and new.dtype != torch.float32:
            self.e_score_correction_bias = old.to(device=new.device, dtype=torch.float32)
        return self

    def forward(self, x_BSD: torch.Tensor, valid_BS: torch.Tensor | None = None) -> RouterOutput:
        """Route every token.

        Args:
            x_BSD: (B, S, D) hidden states.
            valid_BS: optional (B, S) bool: the tokens the balance and z losses count (every token is
                routed; `counts` counts them all, for the dispatch).
        Returns:
            RouterOutput with (T, K) indices and weights, T = B * S.
        """
        cfg = self.cfg
        B, S, D = x_BSD.shape
        if self.training and cfg.router_jitter > 0:
            # Switch-style multiplicative noise on the router input only
            jitter = cfg.router_jitter
            noise = torch.empty_like(x_BSD).uniform_(1.0 - jitter, 1.0 + jitter)
            x_BSD = x_BSD * noise
        # Router math in fp32 even for bf16 models (fp64 stays fp64 so float64 tests prove the math).
        # Autocast is off here: under train.precision=bf16 it would turn F.linear back to bf16, and a
        # 1e-3 bias step is below bf16's resolution near 0.5.
        with torch.autocast(x_BSD.device.type, enabled=False):
            dt = torch.promote_types(x_BSD.dtype, torch.float32)
            logits_TE = F.linear(x_BSD.reshape(B * S, D).to(dt), self.weight.to(dt))  # (T, E)
            scores_TE = router_scores(logits_TE, cfg.scoring_func)
            topk_idx_TK, topk_weight_TK = route(scores_TE, self.e_score_correction_bias, cfg)
            counts_E = expert_counts(topk_idx_TK, cfg.n_routed_experts, torch.long)

            zero = logits_TE.new_zeros(())
            aux = zero
            # the balance and z losses are training terms: without gradients (evaluation reports the
            # cross-entropy; decoding) they are zero rather than a dozen small kernels per layer
            train = torch.is_grad_enabled()
            valid_T = valid_BS.reshape(B * S) if valid_BS is not None else None
            if train and cfg.aux_loss_alpha > 0:
                aux = aux + load_balance_loss(scores_TE, topk_idx_TK, cfg.aux_loss_alpha, valid_T)
            if train and cfg.seq_aux_loss_alpha > 0:
                aux = aux + seq_load_balance_loss(
                    scores_TE.view(B, S, -1), topk_idx_TK.view(B, S, -1), cfg.seq_aux_loss_alpha, valid_BS
                )
            z, z_loss = zero, zero
            if train and cfg.z_loss_coef > 0:
                z = router_z(logits_TE, valid_T)
                z_loss = cfg.z_loss_coef * z
            elif train:  # watched for spikes even when it is no loss (a logsumexp over (T, E): cheap)
                z = router_z(logits_TE.detach(), valid_T)
            return RouterOutput(topk_idx_TK, topk_weight_TK, counts_E, aux, z_loss, z.detach())

    @torch.no_grad()
    def update_bias(self, load_E: torch.Tensor) -> None:
        """Aux-loss-free balancing step from one optimizer step's loads; no-op without `aux_free_bias`.

        Args:
            load_E: (E,) token counts of the step (summed over micro-batches, all-reduced across ranks).
        """
        if self.e_score_correction_bias is None:
            return
        load_E = load_E.to(self.e_score_correction_bias.device)
        self.e_score_correction_bias += bias_update(load_E, self.cfg.bias_update_speed, self.cfg.scoring_func)
