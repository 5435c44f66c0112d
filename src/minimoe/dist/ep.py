"""Expert parallelism: routed experts sharded over a group of R ranks, tokens exchanged with
`all_to_all_single`.

Every rank routes its own tokens as usual (the MoE layer sorts the (token, slot) pairs by global expert).
The dispatcher then
  1. exchanges the per-expert counts (all_to_all, R * E_loc numbers) so each rank knows how many rows
     it will receive from every other rank for each of its experts,
  2. sends the rows (all_to_all with uneven splits; autograd-aware, its backward is the reverse
     exchange), regroups the received rows by local expert, runs the local experts once on contiguous
     slices, restores the received order, and
  3. sends the outputs back (all_to_all again) and scales them by the gate weights; the MoE layer
     sums them into its tokens as in one process.
Rank j of the group owns experts [j * E_loc, (j + 1) * E_loc). Loads and the balancing bias use the
global counts (the trainer all-reduces them), so every rank keeps the same bias.

Gradients: an expert's weight gradient on its owner sums the contributions of the tokens of every
rank in the group (they came through the all-to-all); `sync_expert_grads` adds the other replicas of
the same shard (the data-parallel ranks outside the group) and divides by the world size, which is
what DDP does for the dense weights, so the update equals the one-process update on the global batch.

Shape suffixes: N (token, slot) rows, D hidden, E global experts, R ranks in the EP group,
L experts per rank (E_loc).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from minimoe.model.experts import GroupedExperts


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with uneven splits whose backward sends the gradients back the same way."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty((sum(out_splits), *x.shape[1:]))
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        g = grad.new_empty((sum(ctx.in_splits), *grad.shape[1:]))
        dist.all_to_all_single(g, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return g, None, None, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Differentiable all_to_all_single over dim 0.

    Args:
        x: (sum(in_splits), ...) rows; rows in_splits[j] go to rank j of `group`.
        out_splits: rows received from each rank.
        in_splits: rows sent to each rank.
        group: process group (default: all ranks).
    Returns:
        (sum(out_splits), ...) the received rows, rank 0's first.
    """
    return _AllToAll.apply(x, out_splits, in_splits, group)


class ExpertParallel(GroupedExperts):
    """A MoE layer's routed experts sharded over an EP group: the same `experts(x_ND, counts_E, w_N)`
    call as GroupedExperts, with rows sorted by global expert; this rank holds E_loc of them under the
    same parameter names (`gate_proj`, `up_proj`, `down_proj`, stacked along dim 0).

    Args:
        full: the layer's GroupedExperts with all E experts (identical on every rank).
        group: the expert-parallel process group (R ranks).

    Attributes:
        bytes_sent: bytes of token rows this rank sent to other ranks in forward passes (dispatch and
            combine; backward sends as many again), for benchmarks; reset it yourself.
    """

    def __init__(self, full: GroupedExperts, group):
        size, rank = dist.get_world_size(group), dist.get_rank(group)
        if full.n_experts % size:
            raise ValueError(f"{full.n_experts} experts cannot be split over {size} ranks")
        n_local = full.n_experts // size
        with torch.device("meta"):  # shapes only: the weights are this rank's slice of `full`
            super().__init__(n_local, full.hidden, full.inter, full.act, full.impl)
        self.group, self.size, self.rank = group, size, rank
        self.n_global = full.n_experts
        lo, hi = self.local_range
        for name in ("gate_proj", "up_proj", "down_proj"):
            if getattr(full, name) is not None:
                setattr(self, name, nn.Parameter(getattr(full, name).detach()[lo:hi].clone()))
        self.bytes_sent = 0

    @property
    def local_range(self) -> tuple[int, int]:
        """[first, last) global expert ids held by this rank."""
        return self.rank * self.n_experts, (self.rank + 1) * self.n_experts

    def forward(
        self, x_ND: torch.Tensor, counts_E: torch.Tensor, scale_N: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Run the global experts on rows sorted by global expert.

        Args:
            x_ND: (N, D) rows sorted by global expert.
            counts_E: (E,) int rows per global expert, summing to N.
            scale_N: optional (N,) gate weight of each row.
        Returns:
            (N, D) expert outputs (times scale_N), in the order of x_ND.
        """
        R, L = self.size, self.n_experts
        counts_RL = counts_E.reshape(R, L).contiguous()  # rows for each destination rank's experts
        recv_RL = torch.empty_like(counts_RL)
        dist.all_to_all_single(recv_RL, counts_RL, group=self.group)  # row r: what rank r sends me
        # One host sync per layer: all_to_all with uneven splits takes its sizes as Python ints.
        sizes = torch.cat([counts_RL.sum(1), recv_RL.sum(1)]).tolist()
        send_R, recv_R = sizes[:R], sizes[R:]

        x_recv = all_to_all(x_ND, recv_R, send_R, self.group)  # (N_recv, D), by (source rank, expert)
        # regroup by local expert (stable: each expert sees source 0's rows first, then source 1's, ...)
        expert_of_row = torch.repeat_interleave(
            torch.arange(L, device=x_ND.device).repeat(R), recv_RL.reshape(-1)
        )  # (N_recv,)
        order = torch.sort(expert_of_row, stable=True).indices
        y_sorted = super().forward(x_recv.index_select(0, order), recv_RL.sum(0))  # (N_recv, D)
        y_recv = torch.zeros_like(y_sorted).index_copy(0, order, y_sorted)  # back to arrival order
        y_ND = all_to_all(y_recv, send_R, recv_R, self.group)  # (N, D), the order of x_ND
        # rows leaving this rank (dispatch, then combine); the rows a rank keeps are a local copy
        remote_rows = sum(send_R) - send_R[self.rank] + sum(recv_R) - recv_R[self.rank]
        self.bytes_sent += remote_rows * x_ND.shape[1] * x_ND.element_size()
        # down_proj is linear: scaling the output equals the one-process scaling of its input
        return y_ND if scale_N is None else y_ND * scale_N.to(y_ND.dtype).unsqueeze(-1)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", of {self.n_global} over {self.size} ranks"


def shard_experts(model: nn.Module, group) -> dict[str, nn.Parameter]:
    """Replace every MoE layer's routed experts by this rank's `ExpertParallel` slice.

    Call after the model is built identically on every rank (same seed) and before the optimizer is
    created.

    Args:
        model: a Transformer (its `moe_layers()` are sharded in place).
        group: the expert-parallel process group.
    Returns:
        {fully qualified name: local parameter} of the sharded expert weights (stacked along dim 0).
    """
    names = {id(m): n for n, m in model.named_modules()}
    sharded: dict[str, nn.Parameter] = {}
    for moe in model.moe_layers().values():
        prefix = names[id(moe.experts)]
        moe.experts = ExpertParallel(moe.experts, group)
        for name, p in moe.experts.named_parameters():
            sharded[f"{prefix}.{name}"] = p
    return sharded


def dispatchers(model: nn.Module) -> list[ExpertParallel]:
    """The sharded experts of a model's MoE layers (empty without expert parallelism)."""
    return [m.experts for m in model.moe_layers().values() if isinstance(m.experts, ExpertParallel)]


def gather_experts(local: torch.Tensor, group) -> torch.Tensor:
    """Concatenate every EP rank's slice along dim 0 (all ranks get the full tensor)."""
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, local.contiguous(), group=group)
    return torch.cat(parts)


def local_slice(full: torch.Tensor, group) -> torch.Tensor:
    """This EP rank's slice of a full stacked tensor along dim 0."""
    size, rank = dist.get_world_size(group), dist.get_rank(group)
    n = full.shape[0] // size
    return full[rank * n : (rank + 1) * n]


@torch.no_grad()
def sync_expert_grads(params: list[nn.Parameter], replica_group, world_size: int) -> None:
    """Make sharded expert gradients equal the one-process gradient of the mean loss.

    Each owner already holds the sum over its EP group's tokens of d(local loss)/dw; add the other
    replicas of the shard (`replica_group`, None when there is none) and divide by the world size, as
    DDP averages the dense gradients. A parameter that received no gradient (no tokens reached it on
    any rank of the group) counts as zero.
    """
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    grads = [p.grad for p in params]
    if replica_group is not None:
        flat = torch.cat([g.reshape(-1) for g in grads])
        dist.all_reduce(flat, group=replica_group)
        torch._foreach_copy_(
            grads, [t.view_as(g) for t, g in zip(flat.split([g.numel() for g in grads]), grads)]
        )
    torch._foreach_div_(grads, float(world_size))
