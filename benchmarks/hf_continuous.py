"""minimoe's serving engine against transformers' continuous batching (`generate_batch`): same weights, same requests.

    python benchmarks/hf_continuous.py                     # reference config (random weights), 32 requests
    python benchmarks/hf_continuous.py --quick             # 8 short requests, one round (a minute or two)
    python benchmarks/hf_continuous.py --run runs/x        # a trained run instead (its weights, exported)
    python benchmarks/hf_continuous.py --compile           # minimoe's engine as `minimoe serve --compile` runs

One model (the reference config, `benchmarks/configs/hf-reference.yaml`, random weights from its seed,
or `--run`) is saved as a minimoe run and exported with `minimoe.hf.export`; transformers loads the
export with `AutoModelForCausalLM`. One request mix (`--requests` prompts of random token ids, lengths
drawn uniformly from [--min-prompt, --max-prompt] with `--seed`, `--max-new-tokens` each, greedy, no
EOS) goes through minimoe's `Engine` (what `minimoe serve` runs, without HTTP) and through
`model.generate_batch`, each side in its own processes at its own best OMP_WAIT_POLICY x threads
setting; see `minimoe.bench.continuous` for how it is timed and made fair.

transformers 5.23's paged cache holds MLA only when the value heads are as wide as the key heads
(qk_nope_head_dim + qk_rope_head_dim; `minimoe.bench.continuous` explains why), which the reference
config's are not (32 against 48), so by default the reference config runs with model.v_head_dim=48 on
both sides. Reported: total generated tokens/s per side (median of `--rounds` processes each), the ratio
minimoe / transformers (target: >= 1.5x) and the fraction of requests whose greedy tokens are the same
on both sides (fp32; the check that both ran the same weights on the same requests). Markdown on
stdout, the whole result as JSON on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from pathlib import Path

import torch
import yaml

from minimoe.bench import continuous as C
from minimoe.bench.fair import POLICIES, settings_to_try

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "benchmarks" / "configs" / "hf-reference.yaml"
# the reference config with value heads as wide as its key heads (32 + 16), which transformers' paged
# cache needs (see the docstring)
DEFAULT_OVERRIDES = ["model.v_head_dim=48"]


def make_run(config: Path, overrides: list[str], out: Path) -> Path:
    """A run directory holding the config's model with random weights (its train.seed) and the byte
    tokenizer; throughput does not depend on what the weights say."""
    from minimoe.config_yaml import build_run_config
    from minimoe.data import Tokenizer
    from minimoe.model.transformer import Transformer
    from minimoe.train.checkpoint import save_checkpoint

    rc = build_run_config(None, str(config), overrides)
    torch.manual_seed(rc.train.seed)
    model = Transformer(rc.model)
    text = yaml.safe_dump(rc.to_dict(), sort_keys=False)
    save_checkpoint(out, 0, model, {}, {"step": 0}, text, Tokenizer.byte(), is_best=True)
    return out


def parse_settings(text: str | None) -> list[tuple[str, int]]:
    """ "PASSIVE/1,unset/2" -> [("PASSIVE", 1), ("unset", 2)] (policies in any case, as `fair.POLICIES`
    spells them); None -> every setting fair.py tries."""
    if not text:
        return settings_to_try()
    spelled = {p.upper(): p for p in POLICIES}
    out = []
    for item in text.split(","):
        policy, _, threads = item.strip().partition("/")
        if policy.upper() not in spelled or not threads.isdigit() or int(threads) < 1:
            raise SystemExit(
                f"hf_continuous: --settings {item.strip()!r} is not POLICY/THREADS "
                f"(POLICY one of {', '.join(POLICIES)}; THREADS at least 1)"
            )
        out.append((spelled[policy.upper()], int(threads)))
    return out


def table(r: dict, args, model_line: str) -> str:
    engine = (
        "`Engine(compile=True)` (what `minimoe serve --compile` runs)"
        if args.compile
        else "`Engine` (what `minimoe serve` runs)"
    )
    names = {"minimoe": f"minimoe {engine}",
             "hf": f"transformers `generate_batch` ({args.hf_attn} attention)"}  # fmt: skip
    lines = [
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"transformers {r['transformers']}",
        f"model: {model_line}",
        f"mix: {args.requests} requests, prompts of {args.min_prompt}-{args.max_prompt} tokens (seed {args.seed}), "
        f"{args.max_new_tokens} new tokens each, greedy, fp32; median of {args.rounds} process(es) per side",
        "",
        "| engine | setting (OMP_WAIT_POLICY/threads) | generated tokens | seconds | tokens/s |",
        "|---|---|---:|---:|---:|",
    ]
    for side in C.SIDES:
        s, m = r["settings"][side], r[side]
        lines.append(
            f"| {names[side]} | {s['omp_wait_policy']}/{s['threads']} | {m['tokens']} | {m['seconds']:.2f} | "
            f"{m['tok_s']:.1f} |"
        )
    n = len(r["minimoe"]["outputs"])
    lines += [
        "",
        f"**minimoe / transformers, total generated tokens/s: {r['ratio']:.2f}x** (target >= 1.5x)",
        f"greedy tokens identical on both sides: {round(r['identical'] * n)} of {n} requests "
        f"({r['identical']:.0%}); each side the same every round: minimoe {r['minimoe']['repeatable']}, "
        f"transformers {r['hf']['repeatable']}",
        "probes (tokens/s, the mix with fewer new tokens): "
        + "; ".join(
            f"{side}: " + ", ".join(f"{k} {v:.1f}" for k, v in r["probes"][side].items()) for side in C.SIDES
        ),
    ]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", type=Path, default=REFERENCE, help="model config (random weights)")
    ap.add_argument("--run", type=Path, default=None, help="compare this run's model instead of --config")
    ap.add_argument("--requests", type=int, default=32, help="requests in the mix")
    ap.add_argument("--min-prompt", type=int, default=16, help="shortest prompt, tokens")
    ap.add_argument("--max-prompt", type=int, default=128, help="longest prompt, tokens")
    ap.add_argument("--max-new-tokens", type=int, default=64, help="new tokens per request")
    ap.add_argument("--seed", type=int, default=0, help="seed of the prompts")
    ap.add_argument("--rounds", type=int, default=3, help="timed processes per side (median kept)")
    ap.add_argument("--settings", default=None,
                    help="settings to try, e.g. 'PASSIVE/1,ACTIVE/2' (default: PASSIVE, ACTIVE and unset x 1 thread / every core)")  # fmt: skip
    ap.add_argument(
        "--quick", action="store_true", help="8 requests of 8-32 tokens, 16 new tokens, one round"
    )
    ap.add_argument("--no-progress", action="store_true", help="no progress bar")
    ap.add_argument("--compile", action="store_true",
                    help="minimoe's engine with the compiled fixed-shape step (`minimoe serve --compile`), "
                         "compiled before timing in every process")  # fmt: skip
    ap.add_argument("--hf-attn", default="sdpa", choices=["sdpa", "paged|eager"],
                    help="transformers' attention implementation (both run on a CPU)")  # fmt: skip
    ap.add_argument("overrides", nargs="*",
                    help=f"config overrides, key=value (the reference config gets {' '.join(DEFAULT_OVERRIDES)} first)")  # fmt: skip
    args = ap.parse_args()
    if args.run is not None and args.overrides:
        raise SystemExit("hf_continuous: config overrides apply to --config; --run compares the run as it is")
    if args.quick:
        args.requests, args.min_prompt, args.max_prompt, args.max_new_tokens, args.rounds = 8, 8, 32, 16, 1
    import transformers

    from minimoe.errors import MinimoeError
    from minimoe.hf.export import export_model
    from minimoe.train.checkpoint import load_run

    with tempfile.TemporaryDirectory() as tmp:
        if args.run is not None:
            run = args.run
            model_line = f"{args.run} (exported)"
        else:
            # the reference config's default first, so that an override on the command line wins
            overrides = (DEFAULT_OVERRIDES if args.config.resolve() == REFERENCE else []) + args.overrides
            run = make_run(args.config, overrides, Path(tmp) / "run")
            shown = args.config.resolve()
            shown = shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown
            model_line = f"{shown} {' '.join(overrides)}, random weights"
        try:
            model, tokenizer, _, _ = load_run(run)
        except MinimoeError as e:  # e.g. no such run
            raise SystemExit(f"hf_continuous: {e}") from None
        why = C.paged_cache_refusal(model.cfg)
        if why is not None:
            raise SystemExit(f"hf_continuous: {why}")
        try:
            export_model(model, tokenizer, Path(tmp) / "hf")
        except MinimoeError as e:
            raise SystemExit(f"hf_continuous: {e}") from None
        vocab = model.cfg.vocab_size
        del model
        mix = {
            "prompts": C.make_mix(args.requests, args.min_prompt, args.max_prompt, vocab, args.seed),
            "warm": C.make_mix(args.requests, args.min_prompt, args.max_prompt, vocab, args.seed + 1),
            "max_new_tokens": args.max_new_tokens,
            "probe_new_tokens": max(2, args.max_new_tokens // 4),
        }
        (Path(tmp) / "mix.json").write_text(json.dumps(mix), encoding="utf-8")
        base = ["--run", str(run), "--hf", str(Path(tmp) / "hf"), "--mix", str(Path(tmp) / "mix.json")]
        base += ["--hf-attn", args.hf_attn] + (["--compile"] if args.compile else [])

        from tqdm.auto import tqdm

        with tqdm(total=C.steps(args.rounds), desc="choosing settings", unit="step", file=sys.stderr,
                  disable=args.no_progress) as bar:  # fmt: skip

            def step(text: str) -> None:
                bar.set_description(text)
                bar.update(1)

            result = C.compare(base, args.rounds, parse_settings(args.settings), on_step=step)
    result["transformers"] = transformers.__version__
    print(table(result, args, model_line))
    summary = {k: v for k, v in result.items() if k not in C.SIDES}  # the outputs stay out
    summary |= {side: {k: v for k, v in result[side].items() if k != "outputs"} for side in C.SIDES}
    print(json.dumps(summary), file=sys.stderr)


if __name__ == "__main__":
    main()
