"""`minimoe import HF_DIR --out RUN_DIR`: turn a Hugging Face MoE checkpoint folder into a minimoe run."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser(
        "import",
        help="import a Hugging Face MoE checkpoint folder as a run",
        description="Import a local DeepSeek-V3/V2 (Moonlight), DeepSeekMoE, GLM-4-MoE, Mixtral, Qwen2-MoE, "
        "Qwen3-MoE or OLMoE checkpoint folder (config.json + safetensors) into a run directory that "
        "generate, eval and train read.",
    )
    p.add_argument("hf_dir", help="checkpoint folder")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument(
        "--tokenizer", default=None, help="byte or a tokenizer folder, when HF_DIR has no tokenizer.json"
    )
    p.add_argument(
        "--force", action="store_true", help="write into an existing run directory or a non-empty folder"
    )


def run(args) -> int:
    from minimoe.hf.load import import_hf

    ckpt, fmt, notes = import_hf(args.hf_dir, args.out, tokenizer=args.tokenizer, force=args.force)
    print(f"imported {fmt} checkpoint into {ckpt}")
    for n in notes:
        print(f"note: {n}", file=sys.stderr)
    return 0
