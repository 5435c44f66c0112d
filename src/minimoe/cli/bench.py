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
    p.add_argument(
        "--fair",
        action="store_true",
        help="with --against hf on CPU: each side in its own processes, at the OpenMP wait policy and "
        "thread count its own probe finds fastest, taking turns; transformers is also timed alone "
        "(minimoe.bench.fair)",
    )
    p.add_argument("--rounds", type=int, default=3, help="--fair: processes per side, median kept")
    p.add_argument(
        "--compiled-decode",
        action="store_true",
        help="also time minimoe's compiled fixed-shape decode step (what `minimoe serve --compile` runs) at "
        "every decode shape; compile seconds are reported apart, not in tokens/s",
    )
    p.add_argument("overrides", nargs="*", default=[], help="dotted config overrides key=value")


def _settings(args):
    from minimoe.bench.measure import BenchSettings

    s = BenchSettings.quick() if args.quick else BenchSettings()
    if args.repeats is not None:
        if args.repeats < 1:
            raise MinimoeError(f"--repeats must be at least 1, got {args.repeats}")
        s.repeats = args.repeats
    s.compiled_decode = args.compiled_decode
    return s


def run_fair(args) -> int:
    """`--against hf --fair`: minimoe.bench.fair's comparison, reported as `run` reports its own."""
    import torch

    from minimoe.bench import measure as M
    from minimoe.bench.fair import COMPUTE, SIDES, fair_compare
    from minimoe.bench.measure import bench_config
    from minimoe.bench.ratios import spread
    from minimoe.bench.run import add_decode_ceiling, format_table

    if args.against != "hf":
        raise MinimoeError("--fair compares with transformers: add --against hf")
    if args.device not in (None, "cpu") or args.precision not in (None, "fp32") or args.threads is not None:
        raise MinimoeError(
            "--fair measures CPU fp32 and chooses the threads itself: drop --device, --precision and --threads"
        )
    if args.rounds < 1:
        raise MinimoeError(f"--rounds must be at least 1, got {args.rounds}")
    if args.preset is None and args.config is None:
        args.preset = "tiny"
    # This process only checks the config and waits for the measuring processes. Under the
    # OMP_WAIT_POLICY=ACTIVE that the CLI picks on an idle machine, an OpenMP worker thread that ran
    # one parallel region here would spin on a core for the whole comparison, against the processes
    # being measured; with one thread there is no worker to spin.
    torch.set_num_threads(1)
    rc = bench_config(args.preset, args.config, list(args.overrides))  # refuses a bad config here
    M.check_context(rc, _settings(args))
    from minimoe.bench.hf import hf_twin
    from minimoe.model.transformer import Transformer

    hf_twin(Transformer(rc.model))  # and a model transformers cannot hold, before any process starts
    base = ["--preset", args.preset] if args.preset else ["--config", args.config]
    base += ["--quick"] if args.quick else []
    base += ["--repeats", str(args.repeats)] if args.repeats else []
    base += ["--compiled-decode"] if args.compiled_decode else []
    base += list(args.overrides)
    device = torch.device("cpu")
    result: dict = {
        "config": args.config or args.preset, "device": "cpu", "dtype": "fp32", "fair": True,
        "batch": [rc.train.batch_size, rc.train.seq_len], **M.machine_info(device),
    }  # fmt: skip
    if not args.no_progress:
        print("minimoe bench --fair: probing each side's settings, then measuring...", file=sys.stderr)
    result.update(fair_compare(base, rounds=args.rounds))
    st = result["settings"]
    # the matmul peak (MFU) at the larger thread count the two sides trained at
    result["threads"] = max(st.get(side + COMPUTE, st[side])["threads"] for side in SIDES)
    torch.set_num_threads(result["threads"])
    result["matmul_peak_gflops"] = M.matmul_peak_gflops(device, torch.float32, _settings(args).peak_size)
    result["mfu"] = M.mfu(rc, result["train_tok_s"], result["matmul_peak_gflops"])
    result["hf_mfu"] = M.mfu(rc, result["hf_train_tok_s"], result["matmul_peak_gflops"])
    add_decode_ceiling(result, rc, device, torch.float32, tuple(result["bandwidth_gib_s"]))
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(format_table(result, True))
    print(
        "\nsettings (each by a probe of its own: batch-1 decode, batch-8 decode, prefill for training and prefill): "
        + ", ".join(
            f"{k} OMP_WAIT_POLICY={v['omp_wait_policy']} threads={v['threads']}" for k, v in st.items()
        )
        + f"\ntransformers alone (its own process, decode batch 1): {result['hf_alone_decode_b1_tok_s']:,.0f} tok/s; "
        f"the bench's HF side / alone = {result['hf_alone_ratio']:.2f}{spread(result, 'hf_alone_ratio')} "
        "(the median of the rounds' ratios, each alone process next to the HF side's of its round)"
    )
    return 0


def run(args) -> int:
    if args.fair:
        return run_fair(args)
    import torch

    from minimoe.bench.measure import bench_config
    from minimoe.bench.run import benchmark, format_table, steps_of

    overrides = list(args.overrides)
    if args.precision:
        overrides.append(f"train.precision={args.precision}")
    if args.device:
        overrides.append(f"train.device={args.device}")
    if args.preset is None and args.config is None:
        args.preset = "tiny"  # what the quickstart trains
    rc = bench_config(args.preset, args.config, overrides)
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
