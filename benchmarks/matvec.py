"""Matrix products of one and a few rows on the CPU: the BLAS call (what `F.linear` makes eagerly and what
inductor calls in a compiled graph) against the product-and-sum that the compiled decode step generates
instead (`minimoe.infer.inductor_cpu.few_row_mm`), then the compiled decode step with and without it.

    python benchmarks/matvec.py            # both tables, Markdown on stdout
    python benchmarks/matvec.py --quick    # fewer shapes and rounds
    python benchmarks/matvec.py --write    # also into BENCHMARKS.md

Table 1 times `F.linear(x, w)` for x of 1 to 8 rows, eagerly and compiled through `cpu_inductor` with
the decomposition, at one and two threads, on weights cycled from a pool larger than the caches (so
each is read from memory, as a decode step reads its weights), and gives the weight bytes read per
second. Table 2 runs the `StaticDecode` step of the bench's reference config (random weights, greedy,
64 new tokens after 32-token prompts, prefill included, as `minimoe bench` times decoding) with
`few_rows=FEW_ROWS` (the default) and `few_rows=0` (every product a BLAS call), the two taking turns in
every round; the ratio is the median of the within-round ratios. One process; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

# isort: off
import minimoe.cli.main  # noqa: F401 - the CLI's OpenMP wait policy, set before torch loads OpenMP
import torch
import torch.nn.functional as F

# isort: on

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode import table  # noqa: E402

from minimoe.bench.measure import machine_info  # noqa: E402
from minimoe.config_yaml import build_run_config  # noqa: E402
from minimoe.infer.inductor_cpu import FEW_ROWS, cpu_inductor  # noqa: E402
from minimoe.infer.slots import SlotPool  # noqa: E402
from minimoe.infer.static import StaticDecode, static_greedy  # noqa: E402
from minimoe.model.transformer import Transformer  # noqa: E402

BEGIN, END = "<!-- matvec:begin -->", "<!-- matvec:end -->"


def best_seconds(fn, calls: int, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - t0) / calls)
    return best


def cycled_seconds(fn, x: torch.Tensor, pool: list[torch.Tensor]) -> float:
    """Best seconds per call of fn(x, w), w cycling through `pool` (each read from memory)."""
    i = iter(range(10**9))
    return best_seconds(lambda: fn(x, pool[next(i) % len(pool)]), 40, 5)


def products(quick: bool) -> str:
    shapes = [(4096, 256), (16384, 512)] if quick else [(4096, 256), (1536, 512), (16384, 512)]
    rows_list = [1, 2, 8] if quick else [1, 2, 4, 8]
    out = []
    saved = torch.get_num_threads()
    for threads in (1, 2):
        torch.set_num_threads(threads)
        for n, k in shapes:
            pool = [torch.randn(n, k) for _ in range(max(2, (256 << 20) // (n * k * 4)))]  # >= 256 MiB
            for rows in rows_list:
                x = torch.randn(rows, k)
                torch._dynamo.reset()
                compiled = torch.compile(
                    lambda x, w: F.linear(x, w),
                    dynamic=False,
                    backend=functools.partial(cpu_inductor, few_rows=rows),
                )
                torch.testing.assert_close(compiled(x, pool[0]), F.linear(x, pool[0]), rtol=1e-4, atol=1e-4)
                secs = {
                    "eager": cycled_seconds(F.linear, x, pool),
                    "compiled": cycled_seconds(compiled, x, pool),
                }
                gib = {name: n * k * 4 / s / 2**30 for name, s in secs.items()}
                out.append([threads, f"{n} x {k}", rows, f"{gib['eager']:.1f}", f"{gib['compiled']:.1f}",
                            f"**{secs['eager'] / secs['compiled']:.2f}x**"])  # fmt: skip
    torch.set_num_threads(saved)
    torch._dynamo.reset()
    return table(
        ["threads", "weight (fp32)", "rows", "BLAS (F.linear) GiB/s", "generated reduction GiB/s", "speedup"],
        out,
    )


def decode_step(quick: bool) -> str:
    rc = build_run_config(None, str(HERE / "configs" / "hf-reference.yaml"), []).validate()
    torch.manual_seed(0)
    model = Transformer(rc.model).eval()
    g = torch.Generator().manual_seed(1)
    new, rounds = (32, 3) if quick else (64, 7)
    out = []
    saved = torch.get_num_threads()
    for batch, threads in ((1, 1), (1, 2), (8, 2)):
        torch.set_num_threads(threads)
        prompts = torch.randint(0, rc.model.vocab_size, (batch, 32), generator=g).tolist()
        steps, compile_s = {}, {}
        with torch.no_grad():
            for few in (FEW_ROWS, 0):
                pool = SlotPool(model, batch, max_len=32 + new, prefill_rows=batch)  # as `minimoe bench`
                steps[few] = StaticDecode(pool, few_rows=few)
                compile_s[few] = steps[few].warm_up()
            tokens = {few: static_greedy(s, prompts, new) for few, s in steps.items()}
            rates = {few: [] for few in steps}
            for _ in range(rounds):
                for few, s in steps.items():
                    t0 = time.perf_counter()
                    n = static_greedy(s, prompts, new).numel()
                    rates[few].append(n / (time.perf_counter() - t0))
        ratios = [a / b for a, b in zip(rates[FEW_ROWS], rates[0])]
        out.append([batch, threads, f"{statistics.median(rates[0]):.0f}", f"{statistics.median(rates[FEW_ROWS]):.0f}",
                    f"**{statistics.median(ratios):.2f}x** ({min(ratios):.2f}-{max(ratios):.2f})",
                    f"{compile_s[0]:.0f} / {compile_s[FEW_ROWS]:.0f}", "yes" if torch.equal(tokens[0], tokens[FEW_ROWS]) else "no"])  # fmt: skip
    torch.set_num_threads(saved)
    return table(
        ["batch", "threads", "BLAS products tok/s", "few-row reductions tok/s", "ratio (min-max over rounds)",
         "compile s (BLAS / reductions)", "same tokens"],
        out,
    )  # fmt: skip


def write_section(text: str) -> None:
    path = HERE.parent / "BENCHMARKS.md"
    doc = path.read_text(encoding="utf-8")
    body = f"{BEGIN}\n{text}\n{END}"
    if BEGIN not in doc or END not in doc:
        sys.exit(f"{path} has no {BEGIN} ... {END} section to write into")
    path.write_text(doc[: doc.index(BEGIN)] + body + doc[doc.index(END) + len(END) :], encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer shapes, tokens and rounds")
    p.add_argument("--write", action="store_true", help="write the tables into BENCHMARKS.md")
    args = p.parse_args()
    cpu = machine_info(torch.device("cpu"))["cpu"]
    head = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M')}, torch {torch.__version__}, {cpu}, {os.cpu_count()} CPUs, "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}."
    )
    text = "\n\n".join([head, products(args.quick), decode_step(args.quick)])
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
