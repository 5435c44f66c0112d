"""`minimoe bench [--preset P | --config C.yaml] [--against hf] [--quick] [--json]`: training, prefill and
decode tokens/s, peak memory and MFU of one config on this machine, optionally against transformers."""

from __future__ import annotations

import json
import sys

from minimoe.cli.args import integer
from minimoe.errors import MinimoeError

PRECISIONS = ("fp32", "bf16", "fp16")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "bench",
        help="measure training / decode speed and MFU, optionally against Hugging Face",
        description="Measure training tokens/s (forward + backward + AdamW), prefill and decode tokens/s "
        "(batch 1 and 8, prompt 32 and 512), peak memory and MFU against the matmul peak measured "
        "first. Random weights; the batch shape is train.batch_size x train.seq_len.",
    )
    p.add_argument(
        "--preset", help="named model config (default: tiny; see also benchmarks/configs/hf-reference.yaml)"
    )
    p.add_argument("--config", help="YAML file with model/train sections")
    p.add_argument(
        "--against", choices=["hf"], help="also measure transformers' DeepseekV3 with the same weights"
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer repeats and tokens (about a minute on 2 cores)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--precision", choices=PRECISIONS, help="autocast precision (sets train.precision)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (sets train.device; default: auto)")
    p.add_argument("--threads", type=integer, help="CPU threads (default: torch's default)")
    p.add_argument("--repeats", type=integer, help="timed repeats per measurement (median kept)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", default=[], help="dotted config overrides key=value")


def _settings(args):
    from minimoe.bench.measure import BenchSettings

    s = BenchSettings.quick() if args.quick else BenchSettings()
    if args.repeats is not None:
        if args.repeats < 1:
            raise MinimoeError(f"--repeats must be at least 1, got {args.repeats}")
        s.repeats = args.repeats
    return s


def run(args) -> int:
    import torch

    from minimoe.bench.run import benchmark, format_table, steps_of
    from minimoe.config_yaml import build_run_config

    overrides = list(args.overrides)
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.preset is None and args.config is None:
        args.preset = "tiny"  # what the quickstart trains
    rc = build_run_config(args.preset, args.config, overrides)
    if args.threads is not None:
        if args.threads < 1:
            raise MinimoeError(f"--threads must be at least 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    settings = _settings(args)

    from tqdm.auto import tqdm

    bars: list = []  # opened at the first timed run, after everything that can refuse the config

    def bar():
        if not bars:
            bars.append(tqdm(total=steps_of(settings, against=args.against), desc="matmul peak", unit="run",
                             disable=args.no_progress, file=sys.stderr))  # fmt: skip
        return bars[0]

    def step(key: str) -> None:
        bar().set_description(key)
        bar().update(1)

    def note(text: str) -> None:
        bar().write(f"minimoe bench: note: {text}", file=sys.stderr)

    try:
        result = benchmark(rc, args.config or args.preset, settings, against=args.against, on_step=step,
                           on_note=note)  # fmt: skip
    finally:
        for b in bars:
            b.close()
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result, bool(args.against)))
    return 0
