"""minimoe against Hugging Face transformers' DeepseekV3 on the same configs and weights, via `minimoe bench`.

    python benchmarks/vs_hf.py                  # reference config + `small` preset, Markdown on stdout
    python benchmarks/vs_hf.py --quick          # reference config only, `--quick` settings
    python benchmarks/vs_hf.py --write          # also insert the result at the top of BENCHMARKS.md's section
    python benchmarks/vs_hf.py --profile        # add where the time goes, by kernel family, for both models
    python benchmarks/vs_hf.py --fair --write   # each side in its own processes at its best setting
                                                # (`minimoe bench --fair --compiled-decode`)
    python benchmarks/vs_hf.py --fair --from-json ref.json [small.json]   # tables from saved results

Every table comes from one `minimoe bench --against hf --json` process, in which both models take turns
within every repeat (with `--fair`: processes taking turns, 3 rounds for every config): each ratio is
the median of the repeats' (rounds') ratios, shown with their min-max and 95% interval. Compare the
ratios, not the absolute numbers (other load on the machine moves both). The bf16 line measures the matmul peak in bf16 and fp32 in this process, which bounds what
bf16 autocast can gain on this CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from minimoe.bench.fair import BATCHED, COMPILED, COMPUTE
from minimoe.bench.measure import HFSubject, MinimoeSubject, matmul_peak_gflops
from minimoe.bench.ratios import spread
from minimoe.config_yaml import build_run_config
from minimoe.model.transformer import Transformer

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = "benchmarks/configs/hf-reference.yaml"
ROUNDS = 3  # `--fair` rounds of every tabled config (each a process per side)
SECTION = "## minimoe vs Hugging Face transformers (`minimoe bench`)"
ROWS = ["train", "prefill", "decode_b1", "decode_b8", "decode_b1_p512", "decode_b8_p512"]
LABELS = {
    "train": "training (fwd + bwd + AdamW)",
    "prefill": "prefill",
    "decode_b1": "decode, batch 1, prompt 32",
    "decode_b8": "decode, batch 8, prompt 32",
    "decode_b1_p512": "decode, batch 1, prompt 512",
    "decode_b8_p512": "decode, batch 8, prompt 512",
}


def label(r: dict, key: str) -> str:
    """The row's label, with the prompt length it ran where a short context cut it."""
    prompt = r.get(f"{key}_prompt")
    return LABELS[key].replace("prompt 512", f"prompt {prompt}") if prompt else LABELS[key]


def bench(argv: list[str]) -> tuple[str, dict]:
    """Run `minimoe bench ... --json` in a fresh process; returns (the command, its JSON)."""
    cmd = ["minimoe", "bench", *argv, "--against", "hf", "--json"]
    print("running:", " ".join(cmd), file=sys.stderr)
    out = subprocess.run(
        [sys.executable, "-m", "minimoe", *cmd[1:]], cwd=ROOT, check=True, capture_output=True, text=True
    )
    return " ".join(cmd), json.loads(out.stdout)


def ratio(r: dict, key: str) -> str:
    """A row's ratio: the median of its rounds' ratios, then their min-max and 95% interval."""
    return f"**{r[f'{key}_ratio']:.2f}x**{spread(r, f'{key}_ratio')}"


RATIOS = (
    "Each ratio is the median of the ratios of the rounds in which the two sides took turns (in-process: "
    "the repeats; `--fair`: the processes), then their min-max and, from 3 rounds, the 95% interval of "
    "their geometric mean."
)


def table(cmd: str, r: dict) -> str:
    lines = [
        f"`{cmd}`: {r['config']}, batch {r['batch'][0]} x {r['batch'][1]}, {r['dtype']}, {r['threads']} threads"
        f"{', OMP_WAIT_POLICY=' + r['omp_wait_policy'] if 'omp_wait_policy' in r else ''} on "
        f"{r.get('gpu') or r['cpu']} ({r['cores']} cores), torch {r['torch']}, transformers {r.get('transformers')}, "
        f"{r['date']}. Matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s; training MFU minimoe "
        f"{r['mfu']:.1%}, HF {r['hf_mfu']:.1%}; max logit difference {r['logits_max_abs_diff']:.1e}. {RATIOS}",
        "",
        "| measurement | minimoe tok/s | HF tok/s | minimoe / HF | peak MiB minimoe | peak MiB HF |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for k in ROWS:
        if f"{k}_tok_s" in r:
            lines.append(
                f"| {label(r, k)} | {r[f'{k}_tok_s']:,.0f} | {r[f'hf_{k}_tok_s']:,.0f} | {ratio(r, k)} | "
                f"{r[f'peak_mem_{k}_mib']:,.0f} | {r[f'hf_peak_mem_{k}_mib']:,.0f} |"
            )
    return "\n".join(lines)


def _compute_settings(st: dict) -> str:
    """The sentence on the other rows' settings: since 2026-12-05 (16:30) each side's batch-8 decode and its
    training and prefill have settings of their own, by probes of their own; before, every row ran at the
    batch-1 decode probe's, so training and prefill compared only where the thread counts agreed."""
    others = {k: v for k, v in st.items() if k.endswith((BATCHED, COMPUTE))}
    if others:
        named = "; ".join(
            f"{k.replace('hf', 'transformers', 1)} {v['omp_wait_policy']}, {v['threads']} thread(s)"
            for k, v in others.items()
        )
        return f" The other rows at the settings their own probes chose: {named}."
    if st["minimoe"]["threads"] != st["hf"]["threads"]:
        return (
            f" Training and prefill ran minimoe on {st['minimoe']['threads']} thread(s) and transformers on "
            f"{st['hf']['threads']}: those rows are not a comparison."
        )
    return ""


def fair_table(cmd: str, r: dict) -> str:
    """One `minimoe bench --fair --compiled-decode --json` result: both decode paths of minimoe against
    transformers' own decode, the settings each side was measured at, and the batch-1 ceiling."""
    st = r["settings"]
    c = st.get(COMPILED)
    compiled = (
        f" (its compiled step, by a probe of its own: {c['omp_wait_policy']}, {c['threads']} thread(s))"
        if c
        else ""
    )
    lines = [
        f"`{cmd}`: {r['config']}, fp32 on {r['cpu']} ({r['cores']} cores), torch {r['torch']}, "
        f"transformers {r.get('transformers')}, {r['date']}. Settings chosen by each side's batch-1 decode "
        f"probe: minimoe OMP_WAIT_POLICY={st['minimoe']['omp_wait_policy']}, {st['minimoe']['threads']} "
        f"thread(s){compiled}; transformers {st['hf']['omp_wait_policy']}, {st['hf']['threads']} thread(s). "
        "The ceiling's bandwidth is read with every core. "
        f"transformers alone (its own process next to the HF side's in every round, batch 1, prompt 32): "
        f"{r['hf_alone_decode_b1_tok_s']:,.0f} tok/s; the bench's HF side / alone = {r['hf_alone_ratio']:.2f}"
        f"{spread(r, 'hf_alone_ratio')}." + _compute_settings(st) + f" {RATIOS}",
        "",
        "| measurement | minimoe tok/s | minimoe / HF | compiled decode tok/s | compiled / HF | compile s | HF tok/s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for k in ROWS:
        if f"{k}_tok_s" not in r:
            continue
        c = f"{k}_compiled"
        comp = (
            f"{r[c + '_tok_s']:,.0f} | {ratio(r, c)} | {r[k + '_compile_s']:.0f}"
            if c + "_tok_s" in r
            else " | | "
        )
        lines.append(
            f"| {label(r, k)} | {r[k + '_tok_s']:,.0f} | {ratio(r, k)} | {comp} | {r['hf_' + k + '_tok_s']:,.0f} |"
        )
    fracs = []
    for k, v in r.items():
        if k.endswith("_ceiling_fraction"):
            key = k.removesuffix("_ceiling_fraction")
            who = (
                "HF"
                if key.startswith("hf_")
                else "minimoe compiled"
                if key.endswith("_compiled")
                else "minimoe"
            )
            shape = label(r, key.removeprefix("hf_").removesuffix("_compiled")).removeprefix("decode, ")
            fracs.append(f"{who} ({shape}) {v:.0%}")
    fracs = "; ".join(fracs)
    lines += [
        "",
        f"Batch-1 decode ceiling: {r['decode_ceiling_tok_s']:,.0f} tok/s (the activated weights, read once per "
        f"token at the measured {r['matvec_bandwidth_gib_s']:.1f} GiB/s matrix-vector bandwidth). Reached: {fracs}.",
    ]
    return "\n".join(lines)


def bf16_line(threads: int, repeats: int = 3) -> str:
    """The bf16 and fp32 matmul peaks, and minimoe's training tokens/s at the reference config under
    bf16 autocast against fp32, the two taking turns in this process."""
    torch.set_num_threads(threads)
    cpu = torch.device("cpu")
    fp32, bf16 = matmul_peak_gflops(cpu, torch.float32), matmul_peak_gflops(cpu, torch.bfloat16)
    subjects = {}
    for precision in ("fp32", "bf16"):
        rc = build_run_config(None, str(ROOT / REFERENCE), [f"train.precision={precision}"])
        torch.manual_seed(0)
        subjects[precision] = MinimoeSubject(Transformer(rc.model), rc, cpu)
    seq = torch.randint(0, rc.model.vocab_size, (rc.train.batch_size, rc.train.seq_len + 1))
    rates: dict[str, list[float]] = {k: [] for k in subjects}
    for i in range(repeats + 1):  # the first round warms up
        for k, s in subjects.items():
            t0 = time.perf_counter()
            n = s.train_step(seq[:, :-1], seq[:, 1:])
            if i:
                rates[k].append(n / (time.perf_counter() - t0))
    tok = {k: statistics.median(v) for k, v in rates.items()}
    return (
        f"bf16 on this CPU ({threads} threads): matmul peak {bf16:.1f} GFLOP/s against {fp32:.1f} in fp32 "
        f"({bf16 / fp32:.2f}x, 1024 x 1024 through `F.linear`); training at the reference config under bf16 "
        f"autocast {tok['bf16']:,.0f} tokens/s against {tok['fp32']:,.0f} in fp32 (**{tok['bf16'] / tok['fp32']:.2f}x**). "
        "Without bf16 arithmetic in hardware (AVX-512 BF16 / AMX) bf16 is slower than fp32 here; "
        "run `minimoe bench --precision bf16` on a machine that has it."
    )


# kernel families for the profile: first matching prefix wins
FAMILIES = [
    (
        "matmul (mm, bmm, grouped_mm)",
        ("aten::mm", "aten::bmm", "aten::_grouped_mm", "aten::addmm", "aten::baddbmm"),
    ),
    ("attention kernels (SDPA)", ("aten::_scaled_dot_product",)),
    ("softmax / cross-entropy", ("aten::_log_softmax", "aten::_softmax", "aten::nll_loss")),
    ("optimizer (AdamW)", ("aten::_fused_adamw", "aten::lerp", "aten::addcdiv", "aten::_foreach")),
    (
        "routing, sort, gather / scatter",
        (
            "aten::sort",
            "aten::topk",
            "aten::index",
            "aten::scatter",
            "aten::gather",
            "aten::bincount",
            "aten::cumsum",
            "aten::nonzero",
            "aten::where",
            "aten::one_hot",
        ),
    ),
    ("copies, cat, casts", ("aten::copy_", "aten::cat", "aten::_to_copy", "aten::clone", "aten::contiguous")),
]


def family(name: str) -> str:
    for label, prefixes in FAMILIES:
        if name.startswith(prefixes):
            return label
    return "other elementwise / bookkeeping"


def profile_breakdown(threads: int) -> str:
    """Self CPU time per kernel family of one training step and one 16-token batch-1 decode, for both
    models at the reference config (profiled once each after a warm-up)."""
    from torch.profiler import profile

    from minimoe.bench.hf import hf_twin

    torch.set_num_threads(threads)
    rc = build_run_config(None, str(ROOT / REFERENCE), [])
    torch.manual_seed(0)
    model = Transformer(rc.model)
    cpu = torch.device("cpu")
    subjects = [MinimoeSubject(model, rc, cpu), HFSubject(hf_twin(model), rc, cpu)]
    seq = torch.randint(0, rc.model.vocab_size, (rc.train.batch_size, rc.train.seq_len + 1))
    prompt = torch.randint(0, rc.model.vocab_size, (1, 32))
    work = {
        "training step": lambda s: s.train_step(seq[:, :-1], seq[:, 1:]),
        "decode b1": lambda s: s.decode(prompt, 16),
    }
    cols: dict[str, dict[str, float]] = {}
    for what, fn in work.items():
        for s in subjects:
            fn(s)
            with profile() as prof:
                fn(s)
            ms: dict[str, float] = {}
            for e in prof.key_averages():
                if e.key.startswith("aten::"):
                    ms[family(e.key)] = ms.get(family(e.key), 0.0) + e.self_cpu_time_total / 1e3
            cols[f"{what}: {s.name}"] = ms
    labels = [label for label, _ in FAMILIES] + ["other elementwise / bookkeeping"]
    lines = ["| kernel family | " + " | ".join(cols) + " |", "|---|" + "---:|" * len(cols)]
    for label in labels:
        cells = []
        for ms in cols.values():
            total = sum(ms.values())
            cells.append(f"{ms.get(label, 0.0):,.1f} ms ({ms.get(label, 0.0) / total:.0%})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines.append(
        "| total (self CPU time of aten ops) | "
        + " | ".join(f"{sum(ms.values()):,.1f} ms" for ms in cols.values())
        + " |"
    )
    return (
        "Where the time goes (`python benchmarks/vs_hf.py --profile`, torch.profiler, reference config, "
        f"{threads} threads; the profiler adds its own overhead per kernel, which inflates the decode columns):\n\n"
        + "\n".join(lines)
    )


def write(markdown: str, path: Path) -> None:
    """Insert `markdown` right under SECTION in `path` (newest first), creating the section if needed."""
    text = path.read_text(encoding="utf-8") if path.exists() else "# Benchmarks\n"
    if SECTION not in text:
        text = text.rstrip("\n") + f"\n\n{SECTION}\n\nRegenerate: `python benchmarks/vs_hf.py --write`.\n"
    head, tail = text.split(SECTION, 1)
    # the section's intro ends at its first dated subsection or at the next section, whichever is first
    ends = [i for i in (tail.find("\n### "), tail.find("\n## ")) if i >= 0]
    cut = min(ends) if ends else len(tail)
    intro, rest = tail[:cut], tail[cut:]
    path.write_text(
        head + SECTION + intro.rstrip("\n") + "\n\n" + markdown.strip() + "\n" + rest, encoding="utf-8"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="reference config only, with --quick settings")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--write", action="store_true", help="insert the result into BENCHMARKS.md")
    ap.add_argument("--profile", action="store_true", help="add a per-kernel-family profile of both models")
    ap.add_argument("--fair", action="store_true", help="`--fair --compiled-decode` runs (no bf16 line)")
    ap.add_argument("--from-json", nargs="+", type=Path, help="with --fair: render these saved results")
    args = ap.parse_args()
    if args.fair:
        return main_fair(args)
    common = ["--threads", str(args.threads), "--no-progress"] + (["--quick"] if args.quick else [])
    runs = [bench(["--config", REFERENCE, *common])]
    if not args.quick:
        runs.append(
            bench(["--preset", "small", "model.mtp_depth=0", "train.batch_size=8", "--repeats", "3", *common])
        )
    date = runs[0][1]["date"]
    parts = [f"### {date}: {runs[0][1]['cpu']}, {args.threads} threads"]
    parts += [table(cmd, r) for cmd, r in runs]
    parts.append(bf16_line(args.threads))
    if args.profile:
        parts.append(profile_breakdown(args.threads))
    markdown = "\n\n".join(parts)
    print(markdown)
    if args.write:
        write(markdown, ROOT / "BENCHMARKS.md")


def main_fair(args) -> None:
    base = "minimoe bench --against hf --fair --compiled-decode --json"
    if args.from_json:
        runs = [(base, json.loads(f.read_text())) for f in args.from_json]
    else:
        common = ["--fair", "--compiled-decode", "--no-progress"] + (["--quick"] if args.quick else [])
        runs = [bench(["--config", REFERENCE, "--rounds", str(ROUNDS), *common])]
        if not args.quick:
            # three rounds, as the reference config's: a ratio of one round has no spread to show
            runs.append(bench(["--preset", "small", "model.mtp_depth=0", "train.batch_size=8", "--repeats", "3",
                               "--rounds", str(ROUNDS), *common]))  # fmt: skip
    r0 = runs[0][1]
    parts = [f"### {r0['date']}: {r0['cpu']}, each side at its own best setting (`--fair`)"]
    parts += [fair_table(cmd if "--config" in cmd or "--preset" in cmd else f"{cmd} ({r['config']})", r)
              for cmd, r in runs]  # fmt: skip
    markdown = "\n\n".join(parts)
    print(markdown)
    if args.write:
        write(markdown, ROOT / "BENCHMARKS.md")


if __name__ == "__main__":
    main()
