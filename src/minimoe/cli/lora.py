"""`minimoe lora RUN_DIR --data chat.jsonl --out DIR [--merge] [--qlora]`: LoRA / QLoRA fine-tuning via PEFT."""

from __future__ import annotations

from minimoe.cli.args import integer
from minimoe.cli.sft import add_common, check_epochs, report


def add_parser(sub) -> None:
    p = sub.add_parser(
        "lora",
        help="LoRA / QLoRA fine-tuning on chat JSONL (PEFT)",
        description="Train LoRA adapters on attention, routed experts (stacked tensors, via PEFT "
        "target_parameters) and dense/shared MLPs; the base model stays frozen. Saves the adapter in "
        "OUT/adapter; --merge also writes the merged model as a run. With --adapter and no --data, "
        "merges an existing adapter.",
    )
    add_common(p)
    p.add_argument("--rank", type=integer, default=8, help="LoRA rank r")
    p.add_argument("--alpha", type=integer, default=16, help="LoRA alpha (update scaled by alpha / r)")
    p.add_argument("--targets", default="attention,experts,mlp", help="comma list of attention, experts, mlp")
    p.add_argument("--merge", action="store_true", help="also write the merged model as a run directory")
    p.add_argument("--qlora", action="store_true", help="4-bit NF4 base weights (bitsandbytes, CUDA)")
    p.add_argument("--adapter", help="merge this saved adapter instead of training (needs --merge)")


def run(args) -> int:
    from minimoe.errors import MinimoeError, require
    from minimoe.finetune.sft import finetune

    require("LoRA", "peft")  # before the data is read

    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    if args.adapter:
        if args.data or not args.merge:
            raise MinimoeError("--adapter merges a saved adapter: give --merge and no --data")
        from minimoe.finetune.lora import merge_saved_adapter

        print(f"saved {merge_saved_adapter(args.run_dir, args.adapter, args.out, args.checkpoint)}")
        return 0
    if not args.data:
        raise MinimoeError("--data is required (a chat JSONL file), or --adapter with --merge")
    check_epochs(args.epochs)
    if args.alpha <= 0:
        raise MinimoeError(f"--alpha must be positive, got {args.alpha}")
    res = finetune(
        args.run_dir, args.data, args.out, args.overrides, val_data=args.val_data, packing=args.packing,
        epochs=args.epochs, which=args.checkpoint, progress=not args.no_progress,
        lora={"r": args.rank, "alpha": args.alpha, "targets": targets, "qlora": args.qlora}, merge=args.merge,
    )  # fmt: skip
    report(res)
    return 0
