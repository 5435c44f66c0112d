"""The MoE layer (DeepSeekMoE / DeepSeek-V3): route -> dispatch -> experts -> combine (+ shared experts).

Dispatch follows torchtitan: flatten the (token, slot) pairs, sort them by expert (stable, so each
expert sees its tokens in token order), gather the tokens, run every expert once on its contiguous
slice (grouped GEMM or a loop over slices), scale by the gate weights and scatter-add back. No dense
all-experts computation, no per-token loop.

Shape suffixes:
    B batch, S sequence length, T tokens (B * S), D hidden size,
    E routed experts, K experts per token, N (token, slot) pairs handed to the experts (T * K, fewer
    when a capacity drops some).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minimoe.config import ModelConfig
from minimoe.model.experts import MLP, GroupedExperts, _activate
from minimoe.model.router import Router


@dataclass
class MoEStats:
    """Per-layer routing statistics of one forward."""

    aux_loss: torch.Tensor  # scalar, token-level + sequence-wise, already weighted; 0 when off
    z_loss: torch.Tensor  # scalar, already weighted; 0 when off
    load: torch.Tensor  # (E,) float token-slot counts as routed (before capacity), detached
    dropped: torch.Tensor  # int64 scalar: (token, slot) pairs dropped by the capacity


def max_vio(load: torch.Tensor) -> torch.Tensor:
    """MaxVio = max_i load_i / mean load - 1 (0 when perfectly balanced). load: (E,) -> scalar."""
    load = load.float()
    return load.max() / load.mean() - 1.0


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
    starts_E = torch.cumsum(counts_E, dim=0) - counts_E
    rank_N = torch.arange(expert_sorted_N.numel(), device=expert_sorted_N.device) - starts_E[expert_sorted_N]
    return rank_N < capacity


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
        self.experts = GroupedExperts(
            cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size, cfg.expert_act, cfg.moe_impl
        )
        self.experts.reset_parameters(cfg.init_std)
        self.shared_experts = (
            MLP(cfg.hidden_size, cfg.moe_intermediate_size * cfg.n_shared_experts, cfg.expert_act)
            if cfg.n_shared_experts > 0
            else None
        )
        # Expert parallelism hands the layer a dispatcher from outside (minimoe.dist.ep.shard_experts):
        # a callable (experts, x_ND, counts_E, w_N) -> y_ND that runs the experts held by other ranks.
        # None: every routed expert is local.
        self.dispatcher = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, MoEStats]:
        """Args:
            x: (B, S, D) hidden states.
        Returns:
            y: (B, S, D) routed (+ shared) expert output.
            stats: MoEStats of this forward.
        """
        B, S, D = x.shape
        r = self.gate(x)
        x_TD = x.reshape(B * S, D)  # (T, D)
        K = self.top_k
        if self._few_tokens(x_TD):
            return self._decode(x_TD, r).view(B, S, D), self._stats(r, x_TD.new_zeros((), dtype=torch.long))

        # dispatch: pairs in token-major order, stably sorted by expert
        expert_N = r.topk_idx.reshape(-1)  # (T*K,)
        expert_sorted_N, order_N = torch.sort(expert_N, stable=True)  # grouped by expert, token order inside
        counts_E = torch.bincount(expert_N, minlength=self.n_experts)
        dropped = counts_E.new_zeros(())
        if self.capacity_factor is not None:
            capacity = expert_capacity(self.capacity_factor, B * S, K, self.n_experts)
            keep_N = capacity_keep(expert_sorted_N, counts_E, capacity)
            dropped = (~keep_N).sum()
            # boolean indexing needs the kept count on the host: one sync, only on the capacity path
            order_N = order_N[keep_N]
            counts_E = counts_E.clamp(max=capacity)
        token_N = order_N // K  # token of each pair
        x_ND = x_TD.index_select(0, token_N)  # index_select's backward is one index_add_

        w_N = r.topk_weight.reshape(-1).index_select(0, order_N)  # gate weight of each pair
        if self.dispatcher is None:
            y_ND = self.experts(x_ND, counts_E, scale_N=w_N)  # already multiplied by the gate weights
        else:
            y_ND = self.dispatcher(self.experts, x_ND, counts_E, w_N)

        # combine: scatter-add into the tokens, on top of the shared experts' output; accumulate in at
        # least fp32 (as HF does) so K bf16 contributions do not round at every add
        acc = torch.promote_types(x.dtype, torch.float32)
        if self.shared_experts is not None:
            out_TD = self.shared_experts(x_TD).to(acc)
        else:
            out_TD = torch.zeros(B * S, D, dtype=acc, device=x.device)
        out_TD = out_TD.index_add_(0, token_N, y_ND.to(acc)).to(x.dtype)
        return out_TD.view(B, S, D), self._stats(r, dropped)

    @staticmethod
    def _stats(r, dropped: torch.Tensor) -> MoEStats:
        return MoEStats(aux_loss=r.aux_loss, z_loss=r.z_loss, load=r.counts.detach(), dropped=dropped)

    def _few_tokens(self, x_TD: torch.Tensor) -> bool:
        """Decoding on CPU: no gradient, plain (not quantized) local experts, no capacity, at most E
        (token, slot) pairs."""
        return (
            isinstance(self.experts, GroupedExperts) and x_TD.device.type == "cpu" and not torch.is_grad_enabled()
            and self.dispatcher is None
            and self.capacity_factor is None and x_TD.shape[0] * self.top_k <= self.n_experts
        )  # fmt: skip

    def _decode(self, x_TD: torch.Tensor, r) -> torch.Tensor:
        """The routed + shared output of a few tokens, expert by expert, with no sort or gather.

        A decoded token runs K experts: a handful of matrix-vector products whose cost is reading the
        weights, so the ~30 bookkeeping kernels of the sorted dispatch (sort, bincount, index_select,
        offsets, index_add) cost more than the experts themselves. Same result as `forward`'s path.
        """
        acc = torch.promote_types(x_TD.dtype, torch.float32)
        out_TD = (
            self.shared_experts(x_TD).to(acc)
            if self.shared_experts is not None
            else torch.zeros_like(x_TD, dtype=acc)
        )
        ex = self.experts
        w_TK = r.topk_weight
        for t, experts in enumerate(r.topk_idx.tolist()):  # one host sync for every pair (CPU only)
            x_1D = x_TD[t : t + 1]
            for j, e in enumerate(experts):
                gate = F.linear(x_1D, ex.gate_proj[e]) if ex.gate_proj is not None else None
                h = _activate(gate, F.linear(x_1D, ex.up_proj[e])) * w_TK[t, j].to(x_TD.dtype)
                out_TD[t] += F.linear(h, ex.down_proj[e])[0].to(acc)
        return out_TD.to(x_TD.dtype)
