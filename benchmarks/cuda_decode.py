"""The decode step on a CUDA GPU: eager against compiled, and compiled against compiled replayed as
CUDA graphs, at the bench's reference config and at `small`, random weights, greedy.

    python benchmarks/cuda_decode.py            # needs a CUDA GPU; Markdown on stdout
    python benchmarks/cuda_decode.py --quick    # fewer tokens

Rows: batch 1 and 8, prompt 32. Columns: the pool's eager step (`SlotPool.decode`, what the engine
runs without `compile`), the fixed-shape step compiled by inductor without CUDA graphs, and the same
step replayed as CUDA graphs (`StaticDecode` on CUDA, the engine's `compile=True`). Every method
decodes the same prompts to the same greedy tokens (checked) and runs in turn within each repeat
(median of the repeats kept); each step ends with the argmax on the host, as the engine's does.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import torch

from minimoe.config_yaml import build_run_config
from minimoe.infer.slots import Prefill, SlotPool
from minimoe.infer.static import StaticDecode, static_greedy
from minimoe.model.transformer import Transformer
from minimoe.presets import get_preset

HERE = Path(__file__).parent


def eager_greedy(pool: SlotPool, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """`static_greedy` through the pool's own (eager, growing-shape) step."""
    first = []
    for ids in prompts:
        pre = Prefill(pool)
        row = pre.add(ids)
        first.append(pre.step(len(ids))[row].argmax(-1))
        pool.add(len(ids), src=row)
    tokens = [torch.cat(first)]
    for _ in range(new_tokens - 1):
        tokens.append(pool.decode(tokens[-1]).argmax(-1))
        tokens[-1].tolist()  # the engine reads each step's tokens on the host
    while pool.n:
        pool.remove(pool.n - 1)
    return torch.stack(tokens, dim=1)


def timed(fn, device: str) -> tuple[float, torch.Tensor]:
    sync = torch.cuda.synchronize if device == "cuda" else lambda: None
    sync()
    t0 = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - t0, out


@torch.no_grad()
def row(name: str, model: Transformer, batch: int, new: int, repeats: int, dev: str) -> None:
    """Time the three methods on one batch of prompts (in turn, `repeats` times) and print a row."""
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.cfg.vocab_size, (batch, 32), generator=g).tolist()
    pool = functools.partial(SlotPool, model, batch, max_len=32 + new)
    compiled, graphs = StaticDecode(pool(), cuda_graphs=False), StaticDecode(pool())
    compile_s = graphs.warm_up()
    compiled.warm_up()
    eager_pool = pool()
    fns = {
        "eager": functools.partial(eager_greedy, eager_pool, prompts, new),
        "compiled": functools.partial(static_greedy, compiled, prompts, new),
        "graphs": functools.partial(static_greedy, graphs, prompts, new),
    }
    for fn in fns.values():  # first calls: caches, graph capture
        fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    outs = {}
    for _ in range(repeats):
        for k, fn in fns.items():
            t, outs[k] = timed(fn, dev)
            times[k].append(t)
    # bf16: kernels that sum in another order can flip a near-tie, after which a row diverges
    same = {k: float((outs[k] == outs["eager"]).float().mean()) for k in ("compiled", "graphs")}
    tps = {k: batch * new / statistics.median(v) for k, v in times.items()}
    print(
        f"| {name} | {batch} | {tps['eager']:.0f} | {tps['compiled']:.0f} | {tps['graphs']:.0f} | "
        f"{tps['graphs'] / tps['eager']:.2f}x | {tps['graphs'] / tps['compiled']:.2f}x | "
        f"{compile_s:.0f} | {same['compiled']:.0%}, {same['graphs']:.0%} |",
        flush=True,
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--device", default="cuda", help="cuda (cpu: a dry run of the script, no CUDA graphs)")
    args = p.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/cuda_decode.py needs a CUDA GPU")
    dev = args.device
    new = 64 if args.quick else 256
    configs = {
        "reference": build_run_config(None, str(HERE / "configs" / "hf-reference.yaml")).model,
        "small": get_preset("small"),
    }
    where = torch.cuda.get_device_name() if dev == "cuda" else "CPU (dry run)"
    print(f"{where}, torch {torch.__version__}, bf16 weights, prompt 32, {new} new tokens\n")
    print(
        "| config | batch | eager tok/s | compiled tok/s | CUDA graphs tok/s | graphs / eager | graphs / compiled | compile s | tokens as eager (compiled, graphs) |"
    )
    print("|---|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, cfg in configs.items():
        torch.manual_seed(0)
        cfg.mtp_depth = 0
        model = Transformer(cfg).to(dev, torch.bfloat16).eval()
        for batch in (1, 8):
            row(name, model, batch, new, args.repeats, dev)


if __name__ == "__main__":
    main()
