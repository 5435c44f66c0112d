"""`minimoe train`: train a model on raw text (the built-in corpus when no --data is given)."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from minimoe.errors import MinimoeError


def add_parser(sub) -> None:
    p = sub.add_parser(
        "train",
        help="train a model from raw text",
        description="Train a model. Config: --preset, then --config YAML, then dotted overrides "
        "(e.g. train.max_steps=500 model.num_hidden_layers=2).",
    )
    p.add_argument("--preset", help="named model config (default: tiny when no --config is given)")
    p.add_argument("--config", help="YAML file with model/train/data/dist sections")
    p.add_argument(
        "--data", help="text file, folder, .jsonl, .parquet, .npy/.bin, or hf:NAME (default: built-in corpus)"
    )
    p.add_argument("--val-data", help="separate validation source (default: a split of --data)")
    p.add_argument(
        "--tokenizer", help="byte, bpe:VOCAB, or a tokenizer.json file/folder (sets data.tokenizer)"
    )
    p.add_argument("--out", help="run directory (default: runs/PRESET)")
    p.add_argument(
        "--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its latest checkpoint"
    )
    p.add_argument(
        "--init",
        metavar="RUN_DIR",
        help="start a new run (--out) from the latest weights, config and tokenizer of RUN_DIR (a run of "
        "train, upcycle, import, sft or lora --merge), with a fresh optimizer, schedule and data position",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--skip-memory-check",
        action="store_true",
        help="train even when the estimated memory (weights, gradients, AdamW) exceeds what is available",
    )
    p.add_argument("--no-sample", action="store_true", help="do not print a generated sample at the end")
    p.add_argument("overrides", nargs="*", default=[], help="dotted config overrides key=value")


def run(args) -> int:
    from minimoe.train.run import train_from_config

    # under torchrun only rank 0 reports progress; the other ranks log warnings only
    level = logging.INFO if os.environ.get("RANK", "0") == "0" else logging.WARNING
    logging.basicConfig(level=level, format="%(message)s", stream=sys.stderr)
    if args.resume and (args.preset or args.config):
        raise MinimoeError("--resume takes its config from the run directory; drop --preset/--config")
    # a resume writes into RUN_DIR itself: another --out would be ignored, not receive a copy
    if args.resume and args.out and Path(args.out).resolve() != Path(args.resume).resolve():
        raise MinimoeError(
            f"--resume continues the run in {args.resume} itself; drop --out {args.out} (copy the run "
            "directory first to continue a copy of it)"
        )
    if args.init and args.resume:
        raise MinimoeError(
            "--resume continues a run and --init starts a new one from a run's weights; give one"
        )
    if args.init and not args.out:
        raise MinimoeError("--init starts a new run: name its folder with --out")
    overrides = list(args.overrides)
    if args.data is not None:
        overrides.append(f"data.path={args.data}")
    if args.tokenizer is not None:
        overrides.append(f"data.tokenizer={args.tokenizer}")
    result = train_from_config(
        preset=args.preset,
        config_path=args.config,
        overrides=overrides,
        run_dir=Path(args.resume or args.out or f"runs/{args.preset or 'tiny'}"),
        resume=bool(args.resume),
        val_source=args.val_data,
        progress=not args.no_progress,
        sample=not args.no_sample,
        clock_start=getattr(args, "started", None),
        memory_check=not args.skip_memory_check,
        init_from=args.init,
    )
    if not result.is_main:
        return 0
    # bits per byte need the validation text's bytes, which pre-tokenized validation data lacks
    bpb = f"  val_bpb {result.val_bpb:.4f}" if result.val_bpb is not None else ""
    print(
        f"step {result.step}  tokens {result.tokens:,}  val_loss {result.val_loss:.4f}{bpb}  "
        f"{result.tokens_per_s:,.0f} tok/s overall  {result.elapsed_s / 60:.1f} min  ({result.stopped})"
        if result.val_loss is not None
        else f"step {result.step} ({result.stopped})"
    )
    print(f"checkpoint: {result.checkpoint}")
    if result.sample is not None:
        print("--- sample ---")
        print(result.sample)
    return 0
