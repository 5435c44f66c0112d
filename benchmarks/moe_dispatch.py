"""The `tiny` MoE layer's dispatch: the gathers of model/dispatch.py against the index_select /
padding copy / index_add_ dispatch they replaced, and both against a dense SwiGLU MLP with the same
activated FLOPs (intermediate K x moe_intermediate + shared), forward + backward under CPU bf16
autocast, in one process.

    python benchmarks/moe_dispatch.py              # 1 thread, 20 rounds
    python benchmarks/moe_dispatch.py --threads 2

A fourth row runs the experts' gate and up projections as two grouped GEMMs each instead of one
(`FUSE_GATE_UP_BELOW` in model/expert_kernels.py decides; `tiny`'s width 128 is fused since
2026-12-05). A fifth row is the same expert parameters in half as many experts, twice as wide, top-1 (e.g. 4 x 256
top-1 + a shared 128 for `tiny`'s 8 x 128 top-2 + shared 128): the size of the expert GEMMs, not the
dispatch, is most of the layer's distance from the dense MLP.

A second table times one GEMM call at the experts' gate+up shape (rows x 192 by 192 x 256, bf16, as the
grouped GEMM issues one per expert) and at a 64 x 64 weight, against fp32, for rows from 16 to 4,096:
what a call costs before its arithmetic, and the rate at the experts' row counts against the dense
layer's.

Each round times 5 forward + backward passes of each layer in turn, on inputs cycled from a pool, so
the routing (and the padded row counts) changes every call as in training; the table gives each
layer's median and the median of the within-round ratios. The replaced dispatch is kept below as
`ScatterMoE`; the script first checks that both give the same output and gradients (to bf16 rounding).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import time

# isort: off
import minimoe.cli.main  # noqa: F401 - the CLI's OpenMP wait policy, set before torch loads OpenMP
import torch

# isort: on

from minimoe.config_yaml import build_run_config
from minimoe.model import expert_kernels
from minimoe.model.expert_kernels import grouped_mm_experts
from minimoe.model.experts import CPU_LOW_PRECISION_ROWS, MLP, rank_in_expert
from minimoe.model.moe import MoE, MoEStats


class ScatterMoE(MoE):
    """The dropless dispatch before model/dispatch.py: gather the sorted pairs, copy them into padded
    rows, run the experts, pick the real rows back out, scatter-add them into the tokens (autograd
    makes the gathers' backward scatter-adds)."""

    def forward(self, x):
        B, S, D = x.shape
        r = self.gate(x)
        dt = torch.get_autocast_dtype("cpu")
        x_TD = x.reshape(B * S, D).to(dt)
        K = self.top_k
        expert_sorted_N, order_N = torch.sort(r.topk_idx.reshape(-1), stable=True)
        token_N = order_N // K
        x_ND = x_TD.index_select(0, token_N)
        w_N = r.topk_weight.reshape(-1).index_select(0, order_N)
        counts_E = r.counts.to(torch.long)
        m = CPU_LOW_PRECISION_ROWS
        padded_E = (counts_E + m - 1) // m * m
        dest_N = (torch.cumsum(padded_E, 0) - padded_E)[expert_sorted_N] + rank_in_expert(
            expert_sorted_N, counts_E
        )
        P = int(padded_E.sum())
        x_PD = x_ND.new_zeros(P, D).index_copy(0, dest_N, x_ND)
        w_P = w_N.new_zeros(P).index_copy(0, dest_N, w_N)
        # the kernel GroupedExperts picks, called directly: GroupedExperts no longer pads
        e = self.experts
        y_PD = grouped_mm_experts(
            x_PD, padded_E, e.gate_proj.to(dt), e.up_proj.to(dt), e.down_proj.to(dt), w_P
        )
        y_ND = y_PD.index_select(0, dest_N)
        out = self.shared_experts(x_TD).to(torch.float32).index_add_(0, token_N, y_ND.to(torch.float32))
        return out.to(x.dtype).view(B, S, D), MoEStats(
            r.aux_loss, r.z_loss, r.counts.float(), r.counts.new_zeros(())
        )


class SeparateGateUp(MoE):
    """The layer with the experts' gate and up projections as separate grouped GEMMs (the autograd graph
    keeps the choice for the backward)."""

    def forward(self, x):
        saved, expert_kernels.FUSE_GATE_UP_BELOW = expert_kernels.FUSE_GATE_UP_BELOW, 0
        try:
            return super().forward(x)
        finally:
            expert_kernels.FUSE_GATE_UP_BELOW = saved


class Coarse(torch.nn.Module):
    """A MoE layer with a shared expert of its own width (ModelConfig ties it to the routed width)."""

    def __init__(self, cfg, shared: int):
        super().__init__()
        self.moe, self.shared = MoE(cfg), MLP(cfg.hidden_size, shared, "swiglu")

    def forward(self, x):
        return self.moe(x)[0] + self.shared(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--rounds", type=int, default=20)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfg = build_run_config("tiny", None, []).validate().model
    torch.manual_seed(0)
    new = MoE(cfg)
    old = ScatterMoE(cfg)
    old.load_state_dict(new.state_dict())
    separate = SeparateGateUp(cfg)
    separate.load_state_dict(new.state_dict())
    inter = (
        cfg.num_experts_per_tok * cfg.moe_intermediate_size + cfg.n_shared_experts * cfg.moe_intermediate_size
    )
    dense = MLP(cfg.hidden_size, inter, "swiglu")
    xs = [torch.randn(16, 128, cfg.hidden_size, requires_grad=True) for _ in range(61)]
    calls = [0]

    def step(m, x=None, grad=None):
        calls[0] += 1
        x = xs[calls[0] % len(xs)] if x is None else x
        with torch.autocast("cpu", torch.bfloat16):
            y = m(x)
            y = y[0] if isinstance(y, tuple) else y
        (y.float() * grad).sum().backward() if grad is not None else y.float().square().mean().backward()
        return y

    x, g = xs[0], torch.randn(cfg.hidden_size)
    got = []
    for m in (old, separate, new):
        x.grad = None
        m.zero_grad()
        y = step(m, x, g)
        got.append(
            [y.detach(), x.grad.clone()] + [p.grad.clone() for p in m.parameters() if p.grad is not None]
        )
    diff, diff_sep = (max_relative_difference(got[i], got[2]) for i in (0, 1))
    # the same total and activated expert parameters in half as many, twice as wide experts, top-1:
    # each expert's GEMMs twice as wide (routed 4 x 2I top-1 plus the shared expert of width I)
    coarse_cfg = copy.deepcopy(cfg)
    coarse_cfg.n_routed_experts = cfg.n_routed_experts // 2
    coarse_cfg.num_experts_per_tok = cfg.num_experts_per_tok // 2
    coarse_cfg.moe_intermediate_size = 2 * cfg.moe_intermediate_size
    coarse_cfg.n_shared_experts = 0
    coarse = Coarse(coarse_cfg.validate(), cfg.n_shared_experts * cfg.moe_intermediate_size)
    layout = f"{coarse_cfg.n_routed_experts} x {coarse_cfg.moe_intermediate_size} top-{coarse_cfg.num_experts_per_tok} + shared"
    layers = {
        "gathers (model/dispatch.py)": new,
        "scatter-add (replaced)": old,
        "gathers, gate and up as separate GEMMs": separate,
        f"dense SwiGLU {inter}": dense,
        f"{layout} {cfg.n_shared_experts * cfg.moe_intermediate_size}, gathers (same parameters)": coarse,
    }
    for m in layers.values():
        for _ in range(2 * len(xs)):
            step(m)
    times = {k: [] for k in layers}
    for _ in range(args.rounds):
        for k, m in layers.items():
            t0 = time.perf_counter()
            for _ in range(5):
                step(m)
            times[k].append((time.perf_counter() - t0) / 5)
    ref = times["gathers (model/dispatch.py)"]
    print(f"`tiny` MoE layer, 2,048 tokens, forward + backward, CPU bf16 autocast, {args.threads} thread(s), "
          f"{args.rounds} rounds; largest relative difference of output and gradients, old vs new: {diff:.1e}, "
          f"separate vs fused gate and up: {diff_sep:.1e}\n")  # fmt: skip
    print("| layer | median ms | gathers / this (median of rounds) |\n|---|---|---|")
    for k, v in times.items():
        r = statistics.median(a / b for a, b in zip(ref, v))
        print(f"| {k} | {statistics.median(v) * 1e3:.2f} | {r:.3f} |")

    gemm_calls()


def max_relative_difference(tensors: list[torch.Tensor], refs: list[torch.Tensor]) -> float:
    """The largest relative (Frobenius) difference of each tensor from its reference."""
    return max(float((a.float() - b.float()).norm() / b.float().norm()) for a, b in zip(tensors, refs))


def gemm_calls(repeat: int = 200) -> None:
    """Median microseconds per `a @ w.T` call over 7 timed batches of `repeat` calls, after a warm-up."""

    def per_call(a, w) -> float:
        for _ in range(20):
            a @ w.T
        batches = []
        for _ in range(7):
            t0 = time.perf_counter()
            for _ in range(repeat):
                a @ w.T
            batches.append((time.perf_counter() - t0) / repeat)
        return statistics.median(batches) * 1e6

    print(
        "\n| rows | bf16, 192 x 256 weight: us (GFLOP/s) | fp32, same: us | bf16, 64 x 64 weight: us | fp32, same: us |"
    )
    print("|---|---|---|---|---|")
    for rows in (16, 64, 256, 512, 1024, 2048, 4096):
        us = {}
        for k, n in ((192, 256), (64, 64)):
            for dt in (torch.bfloat16, torch.float32):
                us[k, dt] = per_call(torch.randn(rows, k, dtype=dt), torch.randn(n, k, dtype=dt))
        gf = 2 * rows * 192 * 256 / us[192, torch.bfloat16] / 1e3
        print(
            f"| {rows} | {us[192, torch.bfloat16]:.1f} ({gf:.0f}) | {us[192, torch.float32]:.1f} | "
            f"{us[64, torch.bfloat16]:.1f} | {us[64, torch.float32]:.1f} |"
        )


if __name__ == "__main__":
    main()
