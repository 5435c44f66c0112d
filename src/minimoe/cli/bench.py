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

    from minimoe.bench import measure as M
    from minimoe.config_yaml import build_run_config
    from minimoe.dist.init import resolve_device
    from minimoe.model.transformer import Transformer

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
    device = resolve_device(rc.train.device)
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[rc.train.precision]

    result: dict = {
        "config": args.config or args.preset,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "dtype": rc.train.precision,
        "batch": [rc.train.batch_size, rc.train.seq_len],
        **M.machine_info(device),
    }
    # everything that can refuse the config happens before the first timed run
    torch.manual_seed(rc.train.seed)
    model = Transformer(rc.model).to(device)
    subjects: list[M.Subject] = [M.MinimoeSubject(model, rc, device)]
    if args.against == "hf":
        from minimoe.bench.hf import hf_twin, max_logit_diff

        hf = hf_twin(model)
        probe = torch.randint(0, rc.model.vocab_size, (2, min(64, rc.model.max_seq_len)), device=device)
        result["logits_max_abs_diff"] = diff = max_logit_diff(model, hf, probe)
        if not diff < 1e-3:
            raise RuntimeError(f"the HF twin computes a different function (max logit difference {diff:.3g})")
        subjects.append(M.HFSubject(hf, rc, device))

    from tqdm.auto import tqdm

    total = 1 + len(M.measurements(settings)) * len(subjects) * (settings.repeats + 1)
    with tqdm(total=total, desc="matmul peak", unit="run", disable=args.no_progress, file=sys.stderr) as bar:
        result["matmul_peak_gflops"] = M.matmul_peak_gflops(device, dtype, settings.peak_size)
        if dtype != torch.float32:
            fp32 = result["matmul_peak_fp32_gflops"] = M.matmul_peak_gflops(
                device, torch.float32, settings.peak_size
            )
            if result["matmul_peak_gflops"] < 0.5 * fp32:
                bar.write(
                    f"minimoe bench: note: {rc.train.precision} matmuls run at {result['matmul_peak_gflops']:.1f} "
                    f"GFLOP/s here against {fp32:.1f} in fp32 (no {rc.train.precision} arithmetic in hardware); "
                    "expect every measurement to be slower than fp32",
                    file=sys.stderr,
                )
        bar.update(1)

        def step(key: str) -> None:
            bar.set_description(key)
            bar.update(1)

        for key, values in M.run_bench(subjects, rc, device, settings, on_step=step):
            result.update(values)
            if args.against:
                result[f"{key}_ratio"] = values[f"{key}_tok_s"] / values[f"hf_{key}_tok_s"]
    result["mfu"] = M.mfu(rc, result["train_tok_s"], result["matmul_peak_gflops"])
    if args.against:
        result["hf_mfu"] = M.mfu(rc, result["hf_train_tok_s"], result["matmul_peak_gflops"])
    published = M.published_peak_tflops(device)
    if published is not None:
        result["published_peak_tflops"] = published
        result["mfu_published"] = result["mfu"] * result["matmul_peak_gflops"] / (published * 1e3)

    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(format_table(result, bool(args.against)))
    return 0


def format_table(r: dict, against: bool) -> str:
    """The result as a Markdown table: one row per measurement, ratios when compared."""
    lines = [
        f"{r['config']} on {r.get('gpu') or r['cpu']} ({r['device']}, {r['threads']} threads, {r['dtype']}), "
        f"torch {r['torch']}"
        + (f", transformers {r['transformers']}" if against and "transformers" in r else ""),
        f"matmul peak {r['matmul_peak_gflops']:.1f} GFLOP/s; training MFU {r['mfu']:.1%}"
        + (f" (hf {r['hf_mfu']:.1%})" if against else ""),
        "",
        "| measurement | minimoe tok/s | peak MiB |"
        + (" hf tok/s | hf peak MiB | minimoe / hf |" if against else ""),
        "|---|---:|---:|" + ("---:|---:|---:|" if against else ""),
    ]
    keys = [k[: -len("_tok_s")] for k in r if k.endswith("_tok_s") and not k.startswith("hf_")]
    for k in keys:
        row = f"| {k} | {r[k + '_tok_s']:,.0f} | {r[f'peak_mem_{k}_mib']:,.0f} |"
        if against:
            row += f" {r[f'hf_{k}_tok_s']:,.0f} | {r[f'hf_peak_mem_{k}_mib']:,.0f} | {r[f'{k}_ratio']:.2f}x |"
        lines.append(row)
    return "\n".join(lines)
