"""Training throughput at small scale (issue 16): ratios measured in one process, models taking turns.

    python benchmarks/train_small.py                # prints ratios A and B
    python benchmarks/train_small.py --write        # also rewrites its section of BENCHMARKS.md
    python benchmarks/train_small.py --quick        # fewer, shorter turns (a smoke run)
    python benchmarks/train_small.py --threads 1    # one thread per model, as the lab's sweeps run
    python benchmarks/train_small.py --muon         # also the tiny MoE with train.optimizer=muon (M)

Ratio A: the `tiny` preset (MoE) against a dense SwiGLU model with the same training FLOPs per token,
both trained by minimoe's Trainer. Ratio B: minimoe's Trainer on a dense nanoGPT-shaped model
(6 x 192, block 128, batch 16, byte vocabulary) against the minimal loop in `ref_gpt.py` with the
same architecture and FLOPs, each as it runs by default: minimoe at `train.precision=auto` (bf16
autocast where the CPU multiplies bf16 natively), the loop in fp32 as nanoGPT's train.py runs on a
CPU. Where auto is not fp32, B32 repeats B with minimoe in fp32 (the machinery alone) and E is the
`tiny` MoE at auto against fp32. Each turn trains one model for a few steps; turns cycle through the
models, and each ratio is the median over rounds of (a's tokens/s / b's tokens/s) within a round,
so load from other processes cancels as far as it can. The first round is warm-up and not counted.
Data: byte-level tinyshakespeare from ../shared/data when present, else generated text.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

# isort: off
import minimoe.cli.main  # noqa: F401 - the CLI's process settings (OpenMP wait policy, glibc malloc)
import torch

# isort: on

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from ref_gpt import GPTConfig, ReferenceLoop  # noqa: E402

from minimoe.bench.ratios import interval  # noqa: E402, F401 (the rounds' interval, also for tests)
from minimoe.config_yaml import build_run_config  # noqa: E402
from minimoe.data import prepare  # noqa: E402
from minimoe.lab.flops import flops_per_token  # noqa: E402
from minimoe.train.optim import newton_schulz, newton_schulz_many  # noqa: E402
from minimoe.train.precision import resolve_precision  # noqa: E402
from minimoe.train.trainer import Trainer  # noqa: E402

BEGIN, END = "<!-- train_small:begin -->", "<!-- train_small:end -->"
NANO = [  # minimoe's dense model of nanoGPT's shape, as issue 16 states it
    "model.attn_type=gqa", "model.hidden_size=192", "model.num_hidden_layers=6", "model.num_attention_heads=6",
    "model.intermediate_size=512", "model.n_routed_experts=0", "model.mtp_depth=0",
    "model.tie_word_embeddings=true", "model.max_position_embeddings=128", "model.vocab_size=320",
    "train.seq_len=128", "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=100",
]  # fmt: skip


def corpus(tmp: Path) -> Path:
    shared = HERE.parent.parent / "shared" / "data" / "tinyshakespeare.txt"
    if shared.exists():
        return shared
    path = tmp / "generated.txt"
    words = "the of and to in is was that for it with as his on be at by had not are but from".split()
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, len(words), (400_000,), generator=g).tolist()
    path.write_text(" ".join(words[i] for i in idx), encoding="utf-8")
    return path


def common(steps: int) -> list[str]:
    """Train settings for timing: no periodic eval, one small eval and a checkpoint at each pause."""
    return [
        "data.tokenizer=byte", "train.max_steps=1000000", "train.max_minutes=null", "train.eval_every=1000000",
        "train.eval_batches=1", f"train.log_every={steps}", "train.keep_last=1", "train.sample_tokens=0",
        "train.optimizer=adamw",  # A, B and E compare models and precisions under one optimizer; M adds Muon
    ]  # fmt: skip


def dense_twin(moe_cfg) -> list[str]:
    """Overrides turning the MoE into dense SwiGLU layers with the nearest training FLOPs per token."""
    import copy

    target = flops_per_token(moe_cfg.model, moe_cfg.train.seq_len).train_per_token
    best = None
    for inter in range(64, 4 * moe_cfg.model.intermediate_size):
        m = copy.deepcopy(moe_cfg.model)
        m.n_routed_experts, m.intermediate_size = 0, inter
        gap = abs(flops_per_token(m, moe_cfg.train.seq_len).train_per_token - target)
        if best is None or gap < best[0]:
            best = (gap, inter)
    return ["model.n_routed_experts=0", f"model.intermediate_size={best[1]}"]


class TrainerSubject:
    """One minimoe Trainer; each turn resumes its loop for `steps` steps and reads the logged tokens/s."""

    def __init__(self, name: str, preset: str | None, overrides: list[str], data, root: Path):
        self.name = name
        self.cfg = build_run_config(preset, None, overrides).validate()
        self.trainer = Trainer(self.cfg, root / name, data, data.tokenizer(), progress=False)
        self.walls: list[float] = []  # seconds per turn, eval and checkpoint included

    def turn(self, steps: int) -> float:
        t0 = time.perf_counter()
        self.trainer.fit(stop_after=steps)
        self.walls.append(time.perf_counter() - t0)
        rows = [json.loads(line) for line in self.trainer.metrics_path.read_text().splitlines()]
        return [r for r in rows if "tokens_per_s" in r][-1]["tokens_per_s"]


class ReferenceSubject:
    def __init__(self, data):
        shard = max(data.memmaps("train"), key=len)
        self.name = "reference loop"
        self.loop = ReferenceLoop(shard, GPTConfig(vocab_size=320), batch_size=16)

    def turn(self, steps: int) -> float:
        return self.loop.run(steps)


def newton_schulz_ms(optimizer, rounds: int) -> dict[str, float]:
    """Milliseconds of one step's Newton-Schulz iterations over the optimizer's Muon matrices (median over
    rounds, the ways taking turns): stacked by shape as the optimizer runs them, in fp32 and in bf16, and in
    bf16 one matrix at a time (as the optimizer ran them before 2026-12-07, 13:30)."""
    mats = [torch.randn_like(p) for g in optimizer.param_groups if g["use_muon"] for p in g["params"]]
    ways = {
        "fp32": lambda: newton_schulz_many(mats),
        "bf16": lambda: newton_schulz_many(mats, dtype=torch.bfloat16),
        "bf16_each": lambda: [newton_schulz(m, dtype=torch.bfloat16) for m in mats],
    }
    times: dict[str, list[float]] = {k: [] for k in ways}
    for r in range(rounds + 1):
        for name, way in ways.items():
            t0 = time.perf_counter()
            way()
            if r > 0:
                times[name].append(1e3 * (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in times.items()}


def measure(subjects: dict, pairs: dict, rounds: int, steps: dict) -> dict:
    tps = {k: [] for k in subjects}
    for r in range(rounds + 1):  # round 0 warms up
        for key, s in subjects.items():
            v = s.turn(steps[key])
            if r > 0:
                tps[key].append(v)
        print(f"round {r}: " + ", ".join(f"{k} {tps[k][-1] if r else 0:,.0f}" for k in subjects), flush=True)
    out = {"tokens_per_s": {k: statistics.median(v) for k, v in tps.items()}, "ratios": {}}
    for name, (a, b) in pairs.items():
        ratios = [x / y for x, y in zip(tps[a], tps[b])]
        out["ratios"][name] = (statistics.median(ratios), min(ratios), max(ratios), interval(ratios))
    return out


def table(res: dict, args, load: tuple[float, float]) -> str:
    a, b = res["ratios"]["A"], res["ratios"]["B"]
    t = res["tokens_per_s"]
    auto = resolve_precision("auto", torch.device("cpu"))
    others = max(load) - torch.get_num_threads()
    shared = f"; about {others:.1f} more cores' worth came from other processes" if others > 0.5 else ""
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"train.precision=auto is {auto} here, {os.cpu_count()} CPUs, OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY', 'unset')}; "
        f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end (this script's own "
        f"{torch.get_num_threads()} threads count in it{shared}). Absolute tokens/s move with the machine; "
        f"the ratios are each the median over {args.rounds} rounds of {args.steps}-step turns (the "
        "nanoGPT-shaped models twice as many) of a within-round ratio, models taking turns.",
        "",
        "| ratio | median | min | max | 95% interval (geometric mean over rounds) | target |",
        "|---|---|---|---|---|---|",
        f"| A: `tiny` MoE / dense SwiGLU with equal training FLOPs (same Trainer) | {a[0]:.2f}x | {a[1]:.2f} "
        f"| {a[2]:.2f} | {a[3][0]:.2f}-{a[3][1]:.2f} | >= 0.9x |",
        f"| B: minimoe Trainer ({auto}) / minimal nanoGPT-style loop (fp32; dense 6 x 192, block 128, batch "
        f"16) | {b[0]:.2f}x | {b[1]:.2f} | {b[2]:.2f} | {b[3][0]:.2f}-{b[3][1]:.2f} | >= 1.0x |",
    ]
    for key, what in (
        ("B32", "B32: minimoe Trainer in fp32 / the same loop (the machinery alone) | |"),
        ("E", f"E: `tiny` MoE at train.precision=auto ({auto}) / fp32 (same Trainer) | |"),
        ("M", "M: `tiny` MoE with train.optimizer=muon / adamw (same Trainer) | |"),
    ):
        if key in res["ratios"]:
            r = res["ratios"][key]
            name, target = what.rsplit(" | ", 1)
            lines.append(
                f"| {name} | {r[0]:.2f}x | {r[1]:.2f} | {r[2]:.2f} | {r[3][0]:.2f}-{r[3][1]:.2f} | {target.strip(' |')} |"
            )
    if "C" in res["ratios"]:
        c = res["ratios"]["C"]
        lines.append(
            f"| C: `tiny` MoE with train.compile=true / eager, after compiling | {c[0]:.2f}x | {c[1]:.2f} "
            f"| {c[2]:.2f} | {c[3][0]:.2f}-{c[3][1]:.2f} | pays if C > 1 and the compile time below is earned back |"
        )
    if "D" in res["ratios"]:
        d = res["ratios"]["D"]
        lines.append(
            f"| D: minimoe dense with train.compile=true / the reference loop (eager, as nanoGPT's CPU recipe "
            f"runs), after compiling | {d[0]:.2f}x | {d[1]:.2f} | {d[2]:.2f} | {d[3][0]:.2f}-{d[3][1]:.2f} "
            "| B's question with minimoe's compiler on |"
        )
    lines += [
        "",
        "Median tokens/s, for orientation only: " + ", ".join(f"{k} {v:,.0f}" for k, v in t.items()) + ".",
    ]
    if "ns_ms" in res:
        ms32, msbf, each = res["ns_ms"]["fp32"], res["ns_ms"]["bf16"], res["ns_ms"]["bf16_each"]
        lines.append(
            f"Muon's Newton-Schulz iteration over the `tiny` MoE's Muon matrices, one optimizer step, the "
            f"matrices stacked by shape as the optimizer runs them: {ms32:.1f} ms in fp32, {msbf:.1f} ms in "
            f"bf16 ({ms32 / msbf:.2f}x; a bf16 run uses bf16); one matrix at a time in bf16 {each:.1f} ms "
            f"({each / msbf:.2f}x the stacked time)."
        )
    if "compile_s" in res:
        lines.append(
            f"The first (warm-up) turn of the compiled tiny MoE took {res['compile_s']:.0f} s more than the "
            f"eager one's, and the compiled dense model's {res['compile_s_dense']:.0f} s more: the compile "
            "time a run pays once."
        )
    return "\n".join(lines)


def write_section(text: str) -> None:
    path = HERE.parent / "BENCHMARKS.md"
    doc = path.read_text(encoding="utf-8")
    body = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        doc = doc[: doc.index(BEGIN)] + body + doc[doc.index(END) + len(END) :]
    else:
        doc = (
            doc.rstrip()
            + "\n\n## Training throughput at small scale (`benchmarks/train_small.py`)\n\n"
            + body
            + "\n"
        )
    path.write_text(doc, encoding="utf-8")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="counted rounds of turns (one more warms up)")
    p.add_argument(
        "--steps",
        type=int,
        default=16,
        help="training steps per turn of the tiny models (8: ratios move +-0.05)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads (default: torch's, every core; the lab's sweeps run each model on 1)",
    )
    p.add_argument("--quick", action="store_true", help="2 rounds of 2-step turns")
    p.add_argument("--write", action="store_true", help="rewrite the section of BENCHMARKS.md")
    p.add_argument(
        "--compile", action="store_true", help="also time the tiny MoE under torch.compile (ratio C)"
    )
    p.add_argument("--muon", action="store_true", help="also time the tiny MoE trained with Muon (ratio M)")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.steps = 2, 2
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    load0 = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare(str(corpus(tmp)), "byte", tmp / "data", val_fraction=0.05, workers=1, progress=False)
        common_a = common(args.steps)
        moe = TrainerSubject("tiny MoE", "tiny", common_a, data, tmp)
        dense = TrainerSubject("dense twin", "tiny", common_a + dense_twin(moe.cfg), data, tmp)
        nano_steps = 2 * args.steps  # half the tokens per step: about the same seconds per turn
        nano = TrainerSubject("minimoe dense", None, common(nano_steps) + NANO, data, tmp)
        ref = ReferenceSubject(data)
        subjects = {"tiny MoE": moe, "dense twin": dense, "minimoe dense": nano, "reference loop": ref}
        steps = {"tiny MoE": args.steps, "dense twin": args.steps, "minimoe dense": nano_steps}
        steps["reference loop"] = nano_steps
        pairs = {"A": ("tiny MoE", "dense twin"), "B": ("minimoe dense", "reference loop")}
        if resolve_precision("auto", torch.device("cpu")) != "fp32":
            fp32 = ["train.precision=fp32"]
            subjects["minimoe dense fp32"] = TrainerSubject(
                "minimoe dense fp32", None, common(nano_steps) + NANO + fp32, data, tmp
            )
            subjects["tiny MoE fp32"] = TrainerSubject("tiny MoE fp32", "tiny", common_a + fp32, data, tmp)
            steps.update({"minimoe dense fp32": nano_steps, "tiny MoE fp32": args.steps})
            pairs.update(
                {"B32": ("minimoe dense fp32", "reference loop"), "E": ("tiny MoE", "tiny MoE fp32")}
            )
        if args.compile:
            subjects["tiny MoE compiled"] = TrainerSubject(
                "tiny MoE compiled", "tiny", common_a + ["train.compile=true"], data, tmp
            )
            steps["tiny MoE compiled"] = args.steps
            pairs["C"] = ("tiny MoE compiled", "tiny MoE")
            subjects["minimoe dense compiled"] = TrainerSubject(
                "minimoe dense compiled", None, common(nano_steps) + NANO + ["train.compile=true"], data, tmp
            )
            steps["minimoe dense compiled"] = nano_steps
            pairs["D"] = ("minimoe dense compiled", "reference loop")
        if args.muon:
            subjects["tiny MoE Muon"] = TrainerSubject(
                "tiny MoE Muon", "tiny", common_a + ["train.optimizer=muon"], data, tmp
            )
            steps["tiny MoE Muon"] = args.steps
            pairs["M"] = ("tiny MoE Muon", "tiny MoE")
        res = measure(subjects, pairs, args.rounds, steps)
        if args.muon:
            res["ns_ms"] = newton_schulz_ms(subjects["tiny MoE Muon"].trainer.optimizer, args.rounds)
        if args.compile:
            res["compile_s"] = subjects["tiny MoE compiled"].walls[0] - moe.walls[0]
            res["compile_s_dense"] = subjects["minimoe dense compiled"].walls[0] - nano.walls[0]
    text = table(res, args, (load0, os.getloadavg()[0]))
    print(text)
    if args.write:
        write_section(text)


if __name__ == "__main__":
    main()
