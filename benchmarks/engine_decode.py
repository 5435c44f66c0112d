"""The serving engine's decode step: MTP self-speculation and the compiled static-shape step.

    python benchmarks/engine_decode.py                  # both sections, Markdown on stdout
    python benchmarks/engine_decode.py --section spec   # speculative vs plain greedy only
    python benchmarks/engine_decode.py --quick          # fewer tokens and repeats

Sections:
  spec     `minimoe.serve.engine.Engine` with and without `speculative=True`, eager and compiled
           (`compile=True`), on a trained `tiny` model with one MTP module (trained once by
           benchmarks/decode.py's recipe and kept in --work-dir, or --run-dir), greedy, batch 1
           and 8: tokens/s, acceptance, same tokens;
  compile  the engine's eager decode step vs the compiled static-shape one (`compile=True`):
           compile time, steady-state tokens/s, same tokens;
  choices  one request of n sampled choices of one long prompt, whose choices share one prefill,
           against the same engine with the sharing rule switched off (every choice prefills the
           prompt itself): time to every choice's first token, the request's time, same texts.
Both engines of a row run in this one process and take turns within every repeat (median kept), so
load from other processes hits both alike: compare the ratios, not the absolute numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from decode import prompts_for, table, trained_model  # noqa: E402

import minimoe.serve.engine as engine_module  # noqa: E402
from minimoe.serve.engine import Delta, Engine, Finish, Job, JobParams  # noqa: E402
from minimoe.serve.limits import Limits  # noqa: E402


def run_engine(engine: Engine, prompts: list[list[int]], max_tokens: int) -> tuple[float, int, list[str]]:
    """Every prompt as one greedy job, all submitted at once to a started engine; (seconds, tokens
    generated, texts)."""
    texts: dict[int, str] = {}
    done = threading.Event()
    lock = threading.Lock()

    def post(e) -> None:
        if isinstance(e, Finish):
            with lock:
                texts[e.index] = e.text
                if len(texts) == len(prompts):
                    done.set()

    params = JobParams(max_tokens=max_tokens, temperature=0)
    jobs = [Job(i, p, params, post, client=str(i)) for i, p in enumerate(prompts)]
    before = engine.generated_tokens
    t0 = time.perf_counter()
    engine.submit(jobs)
    if not done.wait(1800):
        raise RuntimeError("the engine did not finish")
    return time.perf_counter() - t0, engine.generated_tokens - before, [texts[i] for i in range(len(prompts))]


def take_turns(
    engines: dict[str, Engine], prompts: list[list[int]], max_tokens: int, repeats: int
) -> tuple[dict[str, float], dict[str, list[str]]]:
    """Start the engines, let each run every prompt in turn, `repeats` times, and close them: (median
    tokens/s per engine, each engine's texts)."""
    for engine in engines.values():
        engine.start()
    rates: dict[str, list[float]] = {name: [] for name in engines}
    texts: dict[str, list[str]] = {}
    for _ in range(repeats):
        for name, engine in engines.items():
            s, n, texts[name] = run_engine(engine, prompts, max_tokens)
            rates[name].append(n / s)
    for engine in engines.values():
        engine.close()
    return {name: statistics.median(v) for name, v in rates.items()}, texts


def section_spec(model, tok, trained_on: str, heldout: str, quick: bool) -> str:
    """Plain and speculative engines, eager and through the compiled fixed-shape step, taking turns."""
    max_tokens, repeats = (48, 1) if quick else (128, 3)
    rows = []
    kinds = {"plain": {}, "spec": {"speculative": True}, "plain compiled": {"compile": True},
             "spec compiled": {"speculative": True, "compile": True}}  # fmt: skip
    for batch in (1, 8):
        prompts = prompts_for(tok, heldout, batch, 32)
        engines = {name: Engine(model, tok, max_active=batch, **kw) for name, kw in kinds.items()}
        compile_s = {name: e.warm_up() for name, e in engines.items()}
        r, texts = take_turns(engines, prompts, max_tokens, repeats)
        spec_engine = engines["spec compiled"]
        drafted, accepted = spec_engine.drafted, spec_engine.accepted
        steps, tokens = spec_engine.steps, spec_engine.generated_tokens
        same = all(texts[name] == texts["plain"] for name in engines)
        rows.append([
            batch, f"{r['plain']:.1f}", f"{r['spec']:.1f}", f"{r['spec'] / r['plain']:.2f}x",
            f"{r['plain compiled']:.1f}", f"{r['spec compiled']:.1f}",
            f"{r['spec compiled'] / r['plain compiled']:.2f}x", f"**{r['spec compiled'] / r['plain']:.2f}x**",
            f"{compile_s['spec compiled']:.0f}", f"{accepted / max(drafted, 1):.1%}",
            f"{tokens / max(steps, 1) / batch:.2f}", "yes" if same else "no",
        ])  # fmt: skip
    head = (
        f"{trained_on}; {max_tokens} new tokens per prompt (32-token held-out prompts), greedy, fp32, "
        f"{torch.get_num_threads()} thread(s), engine steps include the prefill, median of {repeats}; "
        "the four engines take turns within every repeat; compile s is the speculative engine's "
        "`warm_up` (the one-graph speculative step and the draft alone, torch.compile inductor)."
    )
    return head + "\n\n" + table(
        ["batch", "plain tok/s", "speculative tok/s", "spec / plain", "compiled plain tok/s",
         "compiled spec tok/s", "compiled spec / compiled plain", "compiled spec / plain", "compile s",
         "acceptance", "tokens per row per step", "same tokens"],
        rows,
    )  # fmt: skip


def section_compile(model, tok, trained_on: str, heldout: str, quick: bool) -> str:
    """The eager engine against the compiled one, in pools as large as the batch and, for one request,
    in `minimoe serve`'s default pool (`Limits.max_active` slots), where the compiled step runs the
    one-row bucket; there a third engine runs every slot each step (no row buckets: the step before)."""
    max_tokens, repeats = (48, 1) if quick else (128, 3)
    rows = []
    big = Limits().max_active
    for batch, slots in ((1, 1), (8, 8), (1, big)):
        prompts = prompts_for(tok, heldout, batch, 32)
        engines = {
            "eager": Engine(model, tok, max_active=slots),
            "compiled": Engine(model, tok, max_active=slots, compile=True),
        }
        if slots > batch:
            engines["every slot"] = Engine(model, tok, max_active=slots, compile=True)
            engines["every slot"].static.row_buckets = [slots]
        compile_s = sum(e.warm_up() for e in engines.values())
        r, texts = take_turns(engines, prompts, max_tokens, repeats)
        eager, comp = r["eager"], r["compiled"]
        every = f"{r['every slot']:.1f}" if "every slot" in r else ""
        rows.append([
            batch, slots, f"{compile_s:.1f}", f"{eager:.1f}", f"{comp:.1f}", f"**{comp / eager:.2f}x**", every,
            "yes" if all(t == texts["eager"] for t in texts.values()) else "no",
        ])  # fmt: skip
    head = (
        f"{trained_on}; {max_tokens} new tokens per prompt, greedy, fp32, {torch.get_num_threads()} "
        f"thread(s), median of {repeats}; compile time is `Engine.warm_up` (torch.compile, inductor; "
        "both compiled engines' in the large pool)."
    )
    return (
        head
        + "\n\n"
        + table(
            [
                "batch",
                "slots",
                "compile s",
                "eager tok/s",
                "compiled tok/s",
                "speedup",
                "compiled, every slot, tok/s",
                "same tokens",
            ],
            rows,
        )  # fmt: skip
    )


def run_choices(engine: Engine, prompt: list[int], n: int, max_tokens: int) -> tuple[float, float, list[str]]:
    """One request of `n` sampled choices (seeds 0..n-1) of `prompt`, submitted to a started engine:
    (seconds until every choice has its first token, seconds until all are done, texts)."""
    firsts: dict[int, float] = {}
    texts: dict[int, str] = {}
    done = threading.Event()
    lock = threading.Lock()
    t0 = time.perf_counter()

    def post(e) -> None:
        with lock:
            if isinstance(e, Delta) and e.text:
                firsts.setdefault(e.index, time.perf_counter() - t0)
            if isinstance(e, Finish):
                texts[e.index] = e.text
                if len(texts) == n:
                    done.set()

    engine.submit([Job(i, prompt, JobParams(max_tokens, temperature=1.0, seed=i), post) for i in range(n)])
    if not done.wait(1800):
        raise RuntimeError("the engine did not finish")
    total = time.perf_counter() - t0
    return (
        max(firsts.values(), default=total),
        total,
        [texts[i] for i in range(n)],
    )  # (none: every choice ended at once)


@contextlib.contextmanager
def separate_prefills():
    """The engine's rule for sharing a prefill switched off: every choice prefills its prompt alone."""
    rule = engine_module._shares_prefill
    engine_module._shares_prefill = lambda first, job: False
    try:
        yield
    finally:
        engine_module._shares_prefill = rule


def section_choices(model, tok, trained_on: str, heldout: str, quick: bool) -> str:
    """n choices of one prompt in one request: one shared prefill against one per choice, taking turns."""
    max_tokens, repeats = (16, 2) if quick else (32, 5)
    context = model.cfg.max_position_embeddings
    rows = []
    for n, length in (
        (8, min(384, context - max_tokens - 1)),
        (8, 32),
        (32, min(128, context - max_tokens - 1)),
    ):
        prompt = prompts_for(tok, heldout, 1, length)[0]
        engine = Engine(model, tok)  # `minimoe serve`'s default limits: 64 slots, 256 positions per step
        engine.start()
        times: dict[str, list[tuple[float, float]]] = {"shared": [], "separate": []}
        texts = {}
        for _ in range(repeats):
            for name in times:
                with separate_prefills() if name == "separate" else contextlib.nullcontext():
                    first, total, texts[name] = run_choices(engine, prompt, n, max_tokens)
                times[name].append((first, total))
        engine.close()
        med = {k: [statistics.median(t[i] for t in v) for i in (0, 1)] for k, v in times.items()}
        (fs, ts), (fp, tp) = med["shared"], med["separate"]
        rows.append([
            n, length, f"{fp * 1e3:.0f}", f"{fs * 1e3:.0f}", f"**{fp / fs:.2f}x**",
            f"{tp * 1e3:.0f}", f"{ts * 1e3:.0f}", f"**{tp / ts:.2f}x**",
            "yes" if texts["shared"] == texts["separate"] else "no",
        ])  # fmt: skip
    head = (
        f"{trained_on}; one request of n choices (temperature 1, a seed each) of one held-out prompt, {max_tokens} "
        f"tokens each, in an engine at `minimoe serve`'s default limits (64 slots, 256 prompt positions per step), "
        f"eager, fp32, {torch.get_num_threads()} thread(s), median of {repeats} turns of the two ways."
    )
    return head + "\n\n" + table(
        ["n", "prompt tokens", "all first tokens, separate prefills (ms)", "shared prefill (ms)", "speedup",
         "request, separate (ms)", "shared (ms)", "speedup", "same texts"],
        rows,
    )  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer tokens and repeats")
    p.add_argument("--section", choices=["all", "spec", "compile", "choices"], default="all")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--run-dir", default=None, help="a trained run with model.mtp_depth >= 1")
    p.add_argument("--work-dir", default="runs/bench-decode", help="where the trained model is kept")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} thread(s)\n")
    model, tok, trained_on, heldout = trained_model(args)
    if args.section in ("all", "spec"):
        print(section_spec(model, tok, trained_on, heldout, args.quick) + "\n", flush=True)
    if args.section in ("all", "compile"):
        print(section_compile(model, tok, trained_on, heldout, args.quick) + "\n", flush=True)
    if args.section in ("all", "choices"):
        print(section_choices(model, tok, trained_on, heldout, args.quick) + "\n", flush=True)


if __name__ == "__main__":
    main()
