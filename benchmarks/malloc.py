"""glibc keeping freed memory (`keep_freed_memory` in minimoe/cli/main.py) against its default, on
`tiny` training steps: page faults, system CPU time and tokens/s per step.

    python benchmarks/malloc.py              # 6 pairs of processes
    python benchmarks/malloc.py --pairs 2    # a smoke run

The setting is process-wide and cannot be cleanly undone, so each arm is its own process: pairs of
processes (default first, then kept; MINIMOE_KEEP_FREED_MEMORY=0 / 1) run one after the other, and
each trains the `tiny` MoE and its dense twin (train_small.py's models, byte data) for a warm-up turn
and then `--turns` turns of 16 steps each, reading its own page faults and CPU times from getrusage.
Faults and system time are counted exactly; tokens/s moves with the machine between processes, so the
table gives the median over pairs of the within-pair ratio.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(turns: int) -> None:
    import minimoe.cli.main as cli  # the CLI's process settings, this one included

    sys.path.insert(0, str(HERE))
    import train_small as ts

    from minimoe.data import prepare

    out = {"kept": cli.KEEPS_FREED_MEMORY}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = prepare(
            str(ts.corpus(tmp)), "byte", tmp / "data", val_fraction=0.05, workers=1, progress=False
        )
        moe = ts.TrainerSubject("tiny MoE", "tiny", ts.common(16), data, tmp)
        dense = ts.TrainerSubject("dense twin", "tiny", ts.common(16) + ts.dense_twin(moe.cfg), data, tmp)
        for s in (moe, dense):
            s.turn(16)
        for s in (moe, dense):
            rows = []
            for _ in range(turns):
                r0 = resource.getrusage(resource.RUSAGE_SELF)
                tok_s = s.turn(16)
                r1 = resource.getrusage(resource.RUSAGE_SELF)
                rows.append(
                    {
                        "tok_s": tok_s,
                        "faults": (r1.ru_minflt - r0.ru_minflt) / 16,
                        "sys_ms": (r1.ru_stime - r0.ru_stime) / 16 * 1e3,
                        "user_ms": (r1.ru_utime - r0.ru_utime) / 16 * 1e3,
                    }
                )
            out[s.name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
    out["peak_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print("RESULT " + json.dumps(out))


def run_child(keep: bool, turns: int) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env["MINIMOE_KEEP_FREED_MEMORY"] = "1" if keep else "0"
    proc = subprocess.run(
        [sys.executable, __file__, "--child", "--turns", str(turns)],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pairs", type=int, default=6, help="pairs of processes (default arm, kept arm)")
    p.add_argument("--turns", type=int, default=3, help="measured 16-step turns per model per process")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.turns)
        return
    pairs = []
    for i in range(args.pairs):
        pair = (run_child(False, args.turns), run_child(True, args.turns))
        if pair[0]["kept"] or not pair[1]["kept"]:
            sys.exit(
                "the setting did not take effect as asked (not glibc, or LD_PRELOAD set): nothing to compare"
            )
        pairs.append(pair)
        print(f"pair {i + 1}/{args.pairs} done", file=sys.stderr, flush=True)
    print(
        f"{args.pairs} pairs of processes, {args.turns} turns of 16 steps per model each, {os.cpu_count()} CPUs\n"
    )
    print("| model | faults / step, default → kept | system CPU ms / step, default → kept "
          "| user CPU ms / step, default → kept | tokens/s, kept / default (median over pairs, min-max) |")  # fmt: skip
    print("|---|---|---|---|---|")
    for name in ("tiny MoE", "dense twin"):
        d = [a[name] for a, _ in pairs]
        k = [b[name] for _, b in pairs]
        med = lambda rows, key: statistics.median(r[key] for r in rows)  # noqa: E731
        ratios = [b["tok_s"] / a["tok_s"] for a, b in zip(d, k)]
        print(
            f"| {name} | {med(d, 'faults'):,.0f} → {med(k, 'faults'):,.0f} "
            f"| {med(d, 'sys_ms'):.1f} → {med(k, 'sys_ms'):.1f} "
            f"| {med(d, 'user_ms'):.0f} → {med(k, 'user_ms'):.0f} "
            f"| {statistics.median(ratios):.3f}x ({min(ratios):.2f}-{max(ratios):.2f}) |"
        )
    peaks = [(a["peak_mib"], b["peak_mib"]) for a, b in pairs]
    print(
        f"\nPeak resident memory of a process (both models), median: "
        f"{statistics.median(a for a, _ in peaks):,.0f} MiB default, {statistics.median(b for _, b in peaks):,.0f} MiB kept."
    )


if __name__ == "__main__":
    main()
