"""The MoE layer (DeepSeekMoE / DeepSeek-V3): route -> dispatch -> experts -> combine (+ shared experts).

Dispatch follows torchtitan: flatten the (token, slot) pairs, sort them by expert (stable, so each
expert sees its tokens in token order), gather the tokens, run every expert once on its contiguous
slice (grouped GEMM or a loop over slices), scale by the gate weights and sum each token's outputs
(model/dispatch.py, whose backward passes are gathers too). With a capacity, the kept pairs are
gathered and scatter-added back. No dense all-experts computation, no per-token loop. The compiled
decode step (a few pairs, no gradient) skips the sort: each pair reads its own expert's weights
(`GroupedExperts.pairs`).

Shape suffixes:
    B batch, S sequence length, T tokens (B * S), D hidden size,
    E routed experts, K experts per token, N (token, slot) pairs handed to the experts (T * K, fewer
    when a capacity drops some).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from minimoe.config import ModelConfig
from minimoe.model.dispatch import combine, dispatch, expert_rows, row_weights
from minimoe.model.experts import MLP, GroupedExperts, pad_multiple, rank_in_expert
from minimoe.model.router import Router, expert_counts


@dataclass
class MoEStats:
    """Per-layer routing statistics of one forward."""

    aux_loss: torch.Tensor  # scalar, token-level + sequence-wise, already weighted; 0 when off
    z_loss: torch.Tensor  # scalar, already weighted; 0 when off
    load: torch.Tensor  # (E,) float token-slot counts as routed (before capacity), detached
    dropped: torch.Tensor  # int64 scalar: pairs the capacity dropped, of the tokens `load` counts
    router_z: torch.Tensor | None = None  # scalar, the unweighted z-loss (detached); 0 in eval


def max_vio(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i load_i / mean load - 1 (aux-loss-free paper): 0 when perfectly balanced.

    load: (..., E) token counts -> (...) MaxVio over the last dimension (e.g. (L, E) -> (L,)).
    """
    load = load.float()
    return load.amax(dim=-1) / load.mean(dim=-1).clamp_min(1e-9) - 1.0


def expert_capacity(capacity_factor: float, n_tokens: int, k: int, n_experts: int) -> int:
    """Slots per expert for one forward: ceil(capacity_factor * T * K / E)."""
    return math.ceil(capacity_factor * n_tokens * k / n_experts)


def capacity_keep(expert_sorted_N: torch.Tensor, counts_E: torch.Tensor, capacity: int) -> torch.Tensor:
    """Which sorted pairs fit: the first `capacity` of each expert in token order (first come, first
    served), so the sort must be stable.

    Args:
        expert_sorted_N: (N,) expert of each pair, sorted.
        counts_E: (E,) pairs per expert.
        capacity: slots per expert.
    Returns:
        (N,) bool mask of kept pairs.
    """
    return rank_in_expert(expert_sorted_N, counts_E) < capacity


class MoE(nn.Module):
    """Routed experts plus optional always-on shared experts.

    Submodules use HF names: `gate` (Router), `experts` (GroupedExperts), `shared_experts` (MLP with
    intermediate `moe_intermediate_size * n_shared_experts`, or None).
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_experts = cfg.n_routed_experts
        self.top_k = cfg.num_experts_per_tok
        self.capacity_factor = cfg.capacity_factor
        self.gate = Router(cfg)
        # `experts(x_ND, counts_E, w_N)`: GroupedExperts picks a kernel; quantization
        # (infer/quantize.py) and expert parallelism (dist/ep.py) replace the module with their own
        # implementation of the same call.
        self.experts = GroupedExperts(
            cfg.n_routed_experts,
            cfg.hidden_size,
            cfg.moe_intermediate_size,
            cfg.expert_act,
            cfg.moe_impl,
            cfg.initializer_range,
        )
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.expert_act)
            if cfg.n_shared_experts > 0
            else None
        )

    def forward(self, x: torch.Tensor, valid: torch.Tensor | None = None) -> tuple[torch.Tensor, MoEStats]:
        """Args:
            x: (B, S, D) hidden states.
            valid: optional (B, S) bool, the tokens the statistics count: the loads (which move the
                balancing bias) and the balance and z losses. Every token is computed either way.
        Returns:
            y: (B, S, D) routed (+ shared) expert output.
            stats: MoEStats of this forward.
        """
        B, S, D = x.shape
        r = self.gate(x, valid)  # the router reads x as it is (fp32 under autocast): routing stays fp32
        x_TD = x.reshape(B * S, D)  # (T, D)
        if torch.is_autocast_enabled(x.device.type):
            # the routed and shared experts multiply in the autocast dtype anyway: cast the T tokens once
            # here, so the gather moves half the bytes and the T*K gathered rows need no cast of their
            # own (the `tiny` MoE layer, forward + backward under CPU bf16: 1.06x)
            x_TD = x_TD.to(torch.get_autocast_dtype(x.device.type))
        acc = torch.promote_types(x.dtype, torch.float32)  # K bf16 outputs are summed in fp32, as in HF
        out_TD = self.shared_experts(x_TD).to(acc) if self.shared_experts is not None else None
        if self.capacity_factor is None or not self.training:
            # capacity is a training setting: in eval mode every pair gets its expert, so a row's output
            # does not depend on the other rows of its batch (and equals the dropless HF export's)
            y_TD, dropped = self._dropless(x_TD, r, acc), r.counts.new_zeros(())
        else:
            y_TD, dropped = self._with_capacity(x_TD, r, acc, valid)
        out_TD = y_TD if out_TD is None else out_TD + y_TD  # both in `acc`
        load = (
            r.counts.float()
            if valid is None
            else expert_counts(r.topk_idx, self.n_experts, valid=valid.reshape(-1))
        )
        stats = MoEStats(aux_loss=r.aux_loss, z_loss=r.z_loss, load=load, dropped=dropped, router_z=r.z)
        return out_TD.to(x.dtype).view(B, S, D), stats

    def _dropless(self, x_TD: torch.Tensor, r, acc: torch.dtype) -> torch.Tensor:
        """Every pair gets a row (model/dispatch.py): gather, experts, sum each token's K outputs."""
        # quantized or expert-parallel experts take the rows as they are
        grouped = isinstance(self.experts, GroupedExperts)
        if grouped and self.experts.takes_pairs(x_TD, self.top_k):
            # the compiled decode step: no sort, no gathers, each pair reads its expert's weights
            return self.experts.pairs(x_TD, r.topk_idx, r.topk_weight).to(acc).sum(1)
        multiple = pad_multiple(x_TD, x_TD.shape[0] * self.top_k, self.n_experts) if grouped else 1
        rows = expert_rows(r.topk_idx, r.counts, multiple)
        y_PD = self.experts(dispatch(x_TD, rows), rows.counts_E, row_weights(r.topk_weight, rows))
        return combine(y_PD, rows, acc)

    def _with_capacity(
        self, x_TD: torch.Tensor, r, acc: torch.dtype, valid: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `capacity` pairs of each expert in token order get a row, the rest are dropped:
        gather the kept pairs, run the experts, scatter-add their outputs into the tokens. Returns the
        output and the dropped pairs of the `valid` (B, S) tokens (all without it), as `load` counts."""
        T, K = r.topk_idx.shape
        expert_sorted_N, order_N = torch.sort(r.topk_idx.reshape(-1), stable=True)
        capacity = expert_capacity(self.capacity_factor, T, K, self.n_experts)
        keep_N = capacity_keep(expert_sorted_N, r.counts, capacity)
        drop_N = ~keep_N
        if valid is not None:  # padding takes slots too, but its dropped pairs are no statistic
            drop_N = drop_N & valid.reshape(-1).index_select(0, order_N // K)
        # boolean indexing needs the kept count on the host: one sync, only on the capacity path
        order_N = order_N[keep_N]
        token_N = order_N // K
        w_N = r.topk_weight.reshape(-1).index_select(0, order_N)
        y_ND = self.experts(x_TD.index_select(0, token_N), r.counts.clamp(max=capacity), w_N)
        y_TD = y_ND.new_zeros(T, x_TD.shape[1], dtype=acc).index_add_(0, token_N, y_ND.to(acc))
        return y_TD, drop_N.sum()
