"""Which OpenMP wait policy to start minimoe with (issue 16): tiny-preset training tokens/s under each
policy, on the machine as it is and with one competing busy process, each run in a fresh subprocess
(the policy is read once, when torch loads OpenMP).

    python benchmarks/omp_policy.py            # prints the table
    python benchmarks/omp_policy.py --write    # also rewrites its section of BENCHMARKS.md

Policies: PASSIVE (idle OpenMP threads sleep at once), ACTIVE (they spin), and unset (libgomp's
default: spin for a while, then sleep). Runs cycle through every (policy, load) cell each round, and
each cell reports the median over rounds; "vs PASSIVE" is the median of within-round ratios.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
BEGIN, END = "<!-- omp_policy:begin -->", "<!-- omp_policy:end -->"
POLICIES = ("PASSIVE", "unset", "ACTIVE")
LOADS = ("as is", "+1 busy process")

STEP = r"""
import sys, time, torch
from minimoe.presets import get_preset
from minimoe.config import TrainConfig
from minimoe.model.transformer import Transformer
from minimoe.train.optim import build_optimizer
torch.manual_seed(0)
cfg = get_preset("tiny")
model = Transformer(cfg)
opt = build_optimizer(model, TrainConfig(), torch.device("cpu"))
B, T, steps = int(sys.argv[1]), 256, int(sys.argv[2])
x = torch.randint(0, cfg.vocab_size, (B, T + 1))
def step():
    out = model(x[:, :-1], targets=x[:, 1:], return_logits=False)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
step()
t0 = time.perf_counter()
for _ in range(steps):
    step()
print(steps * B * T / (time.perf_counter() - t0))
"""


def run(policy: str, busy: bool, batch: int, steps: int) -> float:
    env = dict(os.environ)
    env.pop("OMP_WAIT_POLICY", None)
    if policy != "unset":
        env["OMP_WAIT_POLICY"] = policy
    hog = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        out = subprocess.run(
            [sys.executable, "-c", STEP, str(batch), str(steps)],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    finally:
        if hog is not None:
            hog.kill()
            hog.wait()
    return float(out.stdout.strip().splitlines()[-1])


def load_sentence(start: float, end: float) -> str:
    """What the load averages say of the machine: shared where other processes loaded it at the start
    (the end's includes this script's own runs)."""
    loads = f"load average {start:.1f} at the start, {end:.1f} at the end"
    if start >= 0.5:
        return (
            f'**The machine was shared** ({loads}: other processes ran, so "as is" was not an idle machine).'
        )
    return f"The machine was idle at the start ({loads}, this script's own runs included)."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--batch", type=int, default=8, help="sequences of 256 tokens per step")
    p.add_argument("--steps", type=int, default=4, help="timed steps per run (after one warm-up step)")
    p.add_argument("--write", action="store_true", help="rewrite the section of BENCHMARKS.md")
    args = p.parse_args()
    load0 = os.getloadavg()[0]
    tps = {(pol, load): [] for load in LOADS for pol in POLICIES}
    for r in range(args.rounds):
        for load in LOADS:
            for pol in POLICIES:
                tps[(pol, load)].append(run(pol, load != "as is", args.batch, args.steps))
        print(f"round {r}: " + ", ".join(f"{k[0]}/{k[1]} {v[-1]:,.0f}" for k, v in tps.items()), flush=True)
    lines = [
        f"Measured {time.strftime('%Y-%m-%d')}, {os.cpu_count()} CPUs, tiny preset, batch {args.batch} x 256, "
        f"fp32, {args.rounds} rounds. " + load_sentence(load0, os.getloadavg()[0]),
        "",
        "| load | policy | tokens/s (median) | vs PASSIVE (median of within-round ratios) |",
        "|---|---|---|---|",
    ]
    for load in LOADS:
        for pol in POLICIES:
            ratio = statistics.median(a / b for a, b in zip(tps[(pol, load)], tps[("PASSIVE", load)]))
            lines.append(f"| {load} | {pol} | {statistics.median(tps[(pol, load)]):,.0f} | {ratio:.2f}x |")
    text = "\n".join(lines)
    print(text)
    if args.write:
        path = HERE.parent / "BENCHMARKS.md"
        doc = path.read_text(encoding="utf-8")
        body = f"{BEGIN}\n{text}\n{END}"
        if BEGIN in doc and END in doc:
            doc = doc[: doc.index(BEGIN)] + body + doc[doc.index(END) + len(END) :]
        else:
            doc = doc.rstrip() + "\n\n## OpenMP wait policy (`benchmarks/omp_policy.py`)\n\n" + body + "\n"
        path.write_text(doc, encoding="utf-8")


if __name__ == "__main__":
    main()
