"""`minimoe export RUN_DIR --out DIR`: write a Hugging Face checkpoint folder (DeepSeek-V3 for MLA models)."""

from __future__ import annotations

import sys
from pathlib import Path

from minimoe.cli.args import add_checkpoint_arg
from minimoe.errors import MinimoeError, require
from minimoe.hf.formats import ARCHITECTURES


def add_parser(sub) -> None:
    p = sub.add_parser(
        "export",
        help="export a run to a Hugging Face folder (transformers, vLLM)",
        description="Export a trained model as a Hugging Face checkpoint folder: config.json, safetensors, "
        "tokenizer files, generation_config.json. MLA models become DeepSeek-V3 (or V2 for softmax routing), "
        "GQA models GLM-4-MoE, Mixtral, Qwen2-MoE, or Qwen3-MoE / OLMoE (q/k norms); a feature no format "
        "can express is refused.",
    )
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--out", required=True, help="folder to create")
    add_checkpoint_arg(p, help="which checkpoint to export")
    p.add_argument(
        "--format", choices=list(ARCHITECTURES), default=None, help="target format (default: the best fit)"
    )
    p.add_argument(
        "--shard-size", default="5GB", help="largest safetensors file, e.g. 5GB, 500MB (default 5GB)"
    )
    p.add_argument(
        "--dtype", choices=["float32", "bfloat16", "float16"], default="float32", help="weight dtype on disk"
    )
    p.add_argument(
        "--dropless", action="store_true", help="accept exporting a capacity-limited model as dropless"
    )
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument(
        "--adapter",
        default=None,
        help="a `minimoe lora` adapter of this run (OUT/adapter) to write beside the model as OUT/adapter, "
        "renamed for the exported model (peft.PeftModel.from_pretrained loads it there)",
    )
    p.add_argument(
        "--verify", action="store_true", help="load the folder with transformers and compare logits"
    )


def run(args) -> int:
    import torch

    from minimoe.data import Tokenizer
    from minimoe.hf.export import (
        check_adapter_exportable,
        compare_logits,
        export_adapter,
        export_model,
        write_tokenizer_files,
    )
    from minimoe.train.checkpoint import load_run

    if args.verify:  # found out before the folder is written
        require("--verify", "transformers")
    if args.adapter is not None:
        require("--adapter", "peft")
        if not (Path(args.adapter) / "adapter_config.json").is_file():
            raise MinimoeError(
                f"--adapter {args.adapter} holds no adapter_config.json (a `minimoe lora` OUT/adapter)"
            )
    run, out = Path(args.run_dir).resolve(), Path(args.out).resolve()
    if out == run or run in out.parents or out in run.parents:  # --force would delete the run
        raise MinimoeError(f"--out {args.out} overlaps the run {args.run_dir}; export to a folder outside it")
    model, tok, _, _ = load_run(args.run_dir, args.checkpoint)
    if args.adapter is not None:  # refused before the folder is written
        from minimoe.finetune.lora import check_adapter_base

        check_adapter_base(model, args.adapter)
        check_adapter_exportable(model, args.adapter, args.format)
    res = export_model(
        model, tok, args.out, fmt=args.format, shard_size=args.shard_size, dtype=args.dtype,
        dropless=args.dropless, force=args.force,
    )  # fmt: skip
    print(f"exported {res.format} ({res.weight_bytes / 2**20:.1f} MiB of weights) to {res.out_dir}")
    for f in res.files:
        print(f"  {f}")
    for n in res.notes:
        print(f"note: {n}", file=sys.stderr)
    if args.adapter is not None:
        adapter_out = export_adapter(args.adapter, model.cfg, res.out_dir, Path(res.out_dir) / "adapter")
        note = ""
        trained_with = Path(args.adapter) / "tokenizer"  # saved by `minimoe lora`, with its chat template
        if trained_with.is_dir():
            write_tokenizer_files(
                Tokenizer.load(trained_with), adapter_out, model.cfg.max_position_embeddings
            )
            note = ", with the tokenizer and chat template it was trained with"
        print(f"  {adapter_out.name}/ (LoRA adapter, PEFT format{note})")
    if args.verify:
        ids = torch.randint(
            0,
            tok.vocab_size,
            (2, min(32, model.cfg.max_position_embeddings)),
            generator=torch.Generator().manual_seed(0),
        )
        diffs = {"model": compare_logits(model, res.out_dir, ids)}
        if args.adapter is not None:
            from minimoe.finetune.lora import compare_exported_adapter

            diffs["with the adapter"] = compare_exported_adapter(model, args.adapter, res.out_dir, ids)
        for what, diff in diffs.items():
            print(f"max |logit difference| against transformers ({what}): {diff:.2e}")
        if args.dtype == "float32" and max(diffs.values()) > 1e-4:
            print("warning: the exported model's logits differ by more than 1e-4", file=sys.stderr)
            return 1
    return 0
