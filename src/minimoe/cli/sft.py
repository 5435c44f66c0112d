"""`minimoe sft RUN_DIR --data chat.jsonl --out NEW_RUN_DIR`: supervised fine-tuning, loss on responses only."""

from __future__ import annotations

from minimoe.cli.args import add_checkpoint_arg, number


def add_common(p) -> None:
    """Arguments shared by `sft` and `lora`."""
    p.add_argument("run_dir", help="run directory (or checkpoint directory) to fine-tune")
    p.add_argument(
        "--data", help='chat JSONL: {"prompt", "response"} or {"messages": [{"role", "content"}]} per line'
    )
    p.add_argument("--val-data", help="chat JSONL for a masked validation loss at the end")
    p.add_argument("--out", required=True, help="new run directory")
    add_checkpoint_arg(p, help="which source checkpoint")
    p.add_argument(
        "--epochs", type=number, default=1.0, help="passes over the data (unless train.max_steps is set)"
    )
    p.add_argument("--packing", action="store_true", help="pack conversations into full windows")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("overrides", nargs="*", default=[], help="dotted train.KEY=VALUE overrides")


def add_parser(sub) -> None:
    p = sub.add_parser(
        "sft",
        help="supervised fine-tuning on chat JSONL",
        description="Fine-tune all weights on conversations rendered with the tokenizer's chat template "
        "(a default one is stored when it has none); only the assistant's tokens carry loss. "
        "Defaults: a tenth of the source run's lr, one epoch, its batch size and sequence length.",
    )
    add_common(p)


def check_epochs(epochs: float) -> None:
    from minimoe.errors import MinimoeError

    if not 0 < epochs < float("inf"):  # NaN too
        raise MinimoeError(f"--epochs must be a positive number, got {epochs}")


def report(res) -> None:
    val = f"  val_loss {res.val_loss:.4f}" if res.val_loss is not None else ""
    print(
        f"{res.steps} steps on {res.examples} sequences ({res.response_tokens:,} response tokens trained on, "
        f"repeats over epochs counted; {res.dropped} dropped)  final loss {res.final_loss:.4f}{val}"
    )
    if res.stopped == "interrupted":  # fine-tuning has no --resume: say that this is all there is
        print(
            f"interrupted at step {res.steps} of {res.max_steps}: what was saved holds those steps "
            "(fine-tuning has no --resume)"
        )
    if res.checkpoint is not None:  # with LoRA: the base with the adapter merged into its weights
        print(f"saved {'the merged model in ' if res.adapter is not None else ''}{res.checkpoint}")
    if res.adapter is not None:
        print(f"adapter in {res.adapter}")


def run(args) -> int:
    from minimoe.errors import MinimoeError
    from minimoe.finetune.sft import finetune

    if not args.data:
        raise MinimoeError("--data is required (a chat JSONL file)")
    check_epochs(args.epochs)
    res = finetune(
        args.run_dir, args.data, args.out, args.overrides, val_data=args.val_data, packing=args.packing,
        epochs=args.epochs, which=args.checkpoint, progress=not args.no_progress,
    )  # fmt: skip
    report(res)
    return 0
