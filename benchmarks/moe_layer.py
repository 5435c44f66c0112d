"""Forward + backward time of one MoE layer against a naive per-expert mask loop and a dense SwiGLU MLP
with the same activated FLOPs (intermediate = K * moe_intermediate + shared intermediate).

    python benchmarks/moe_layer.py              # prints a Markdown table (2 threads, wall time)
    python benchmarks/moe_layer.py --quick      # fewer repeats, 2048 tokens
    python benchmarks/moe_layer.py --mallopt    # glibc keeps large blocks (see tune_glibc_malloc)
    python benchmarks/moe_layer.py --cpu-time   # 1 thread, CPU time: for a machine others are using

All numbers in one table come from one run (fp32, CPU threads as given, warm-up, then the median and
the best of the repeats; the best is the least disturbed by other processes).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import random
import statistics
import time

import torch
import torch.nn.functional as F

from minimoe.config import ModelConfig
from minimoe.model.experts import MLP, resolve_impl
from minimoe.model.moe import MoE

SIZES = [  # (hidden D, experts E, top-k K, expert intermediate I, shared experts)
    (256, 8, 2, 256, 0),
    (512, 16, 2, 512, 0),
    (256, 32, 8, 64, 0),
    (256, 32, 6, 64, 2),  # DeepSeekMoE-style fine-grained experts plus shared experts
]


def tune_glibc_malloc() -> bool:
    """Keep freed large blocks in glibc's heap. By default a tensor at or over glibc's mmap threshold
    (dynamic, at most 32 MiB) is a fresh mmap whose pages fault in on first touch; the MoE's (T*K, D)
    buffers are K times the dense layer's (T, D) ones. In isolation a (32768, 256) fp32 index_select
    took 17 ms plain and 2 ms tuned; in this benchmark's quiet runs the two settings came out within
    noise, so the default table stands. A process-wide setting: an entry point's job, not the library's."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    return bool(libc.mallopt(M_MMAP_THRESHOLD, 1 << 30)) and bool(libc.mallopt(M_TRIM_THRESHOLD, 1 << 30))


def naive_moe(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """DeepSeek-V3 reference style (inference/model.py): `torch.where(indices == i)` per expert."""
    B, S, D = x.shape
    x_TD = x.reshape(-1, D)
    r = moe.gate(x)
    y_TD = torch.zeros_like(x_TD)
    counts = r.counts.tolist()
    e = moe.experts
    for i in range(moe.n_experts):
        if counts[i] == 0:
            continue
        tok, slot = torch.where(r.topk_idx == i)
        h = F.silu(x_TD[tok] @ e.gate_proj[i].T) * (x_TD[tok] @ e.up_proj[i].T)
        y_TD[tok] += (h @ e.down_proj[i].T) * r.topk_weight[tok, slot, None]
    if moe.shared_experts is not None:
        y_TD = y_TD + moe.shared_experts(x_TD)
    return y_TD.view(B, S, D)


def fwd_bwd_ms(fn, x: torch.Tensor, clock=time.perf_counter) -> float:
    """Milliseconds of one forward + backward of fn(x)."""
    xi = x.detach().requires_grad_()
    t0 = clock()
    y = fn(xi)
    y.backward(torch.ones_like(y))
    return 1e3 * (clock() - t0)


def bench_size(D, E, K, I, shared, tokens, warmup, repeats, clock=time.perf_counter) -> dict:
    """(median, min) fwd+bwd ms per method. Every repeat runs all methods in a fresh random order, so
    neither a burst of load from other processes nor the position in the round skews one row."""
    torch.manual_seed(0)
    cfg = ModelConfig(
        hidden_size=D,
        n_routed_experts=E,
        num_experts_per_tok=K,
        moe_intermediate_size=I,
        n_shared_experts=shared,
        scoring_func="sigmoid",
        aux_free_bias=True,
    ).validate()
    moe = MoE(cfg)
    with torch.no_grad():
        moe.gate.weight.normal_(0.0, 0.5)  # roughly balanced routing, as after training
    dense = MLP(D, K * I + shared * I)
    seq = min(512, tokens)
    x = torch.randn(tokens // seq, seq, D)

    def moe_with(impl: str):
        def run(t: torch.Tensor) -> torch.Tensor:
            moe.experts.impl = impl
            return moe(t)[0]

        return run

    auto = resolve_impl("auto", x.view(-1, D), D, I)
    methods = {
        f"moe auto ({auto})": moe_with("auto"),
        "moe grouped_mm": moe_with("grouped_mm"),
        "moe loop": moe_with("loop"),
        "naive mask loop": lambda t: naive_moe(moe, t),
        "dense FLOP-equal": dense,
    }
    times: dict[str, list[float]] = {name: [] for name in methods}
    order = list(methods)
    rng = random.Random(0)
    for i in range(warmup + repeats):
        rng.shuffle(order)
        for name in order:
            ms = fwd_bwd_ms(methods[name], x, clock)
            if i >= warmup:
                times[name].append(ms)
    return {name: (statistics.median(ts), min(ts)) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and only 2048 tokens")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument(
        "--mallopt",
        action="store_true",
        help="raise glibc's mmap and trim thresholds to 1 GiB first (large tensors reuse heap memory)",
    )
    p.add_argument(
        "--cpu-time",
        action="store_true",
        help="1 thread, timed by the CPU time of that thread: robust when other processes load the machine",
    )
    p.add_argument(
        "--tokens", type=int, default=None, help="tokens per batch (default 4096, 2048 with --quick)"
    )
    args = p.parse_args()
    tuned = tune_glibc_malloc() if args.mallopt else False
    threads = 1 if args.cpu_time else args.threads
    torch.set_num_threads(threads)
    clock = time.thread_time if args.cpu_time else time.perf_counter
    tokens = args.tokens or (2048 if args.quick else 4096)
    warmup, repeats = (2, 5) if args.quick else (3, 15)
    timer = "CPU" if args.cpu_time else "wall"
    print(
        f"torch {torch.__version__}, {threads} thread(s), {timer} time, fp32, T = {tokens} tokens, fwd+bwd; "
        f"glibc malloc {'tuned' if tuned else 'default'}; median and best of {repeats} repeats after "
        f"{warmup} warm-up; load average {os.getloadavg()[0]:.1f}\n"
    )
    print(
        "| D | E | K | I | shared | dense I | method | median ms | vs dense | vs naive | best ms | best vs dense |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for D, E, K, I, shared in SIZES:
        rows = bench_size(D, E, K, I, shared, tokens, warmup, repeats, clock)
        (dense, dense_best), (naive, _) = rows["dense FLOP-equal"], rows["naive mask loop"]
        for name, (ms, best) in rows.items():
            print(
                f"| {D} | {E} | {K} | {I} | {shared} | {K * I + shared * I} | {name} | {ms:.1f} "
                f"| {ms / dense:.2f}x | {ms / naive:.2f}x | {best:.1f} | {best / dense_best:.2f}x |"
            )
    print(
        f"\nload average at the end: {os.getloadavg()[0]:.1f} (other processes on the machine skew timings)"
    )


if __name__ == "__main__":
    main()
