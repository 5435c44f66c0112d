"""`minimoe upcycle HF_LLAMA_DIR --experts N --top-k K --out RUN_DIR`: a dense Llama-family model -> an MoE run."""

from __future__ import annotations

from minimoe.cli.args import integer, number


def add_parser(sub) -> None:
    p = sub.add_parser(
        "upcycle",
        help="initialise an MoE from a dense Llama-family checkpoint",
        description="Sparse upcycling: copy embedding, attention, norms and head from a dense Hugging Face "
        "Llama/Mistral/Qwen2 folder; build each MoE layer's experts from its dense MLP (split into "
        "--granularity slices of the intermediate dimension); start a fresh router. Extra dotted "
        "model.KEY=VALUE overrides set routing and balancing (e.g. model.aux_free_bias=false).",
    )
    p.add_argument("dense_dir", help="dense checkpoint folder (config.json + safetensors)")
    p.add_argument("--experts", type=integer, required=True, help="routed experts per MoE layer")
    p.add_argument("--top-k", type=integer, required=True, help="experts per token")
    p.add_argument(
        "--granularity",
        type=integer,
        default=1,
        help="slices of the dense intermediate dimension per expert copy",
    )
    p.add_argument("--dense-layers", type=integer, default=0, help="leading layers kept dense")
    p.add_argument("--scoring", choices=["softmax", "sigmoid"], default="softmax", help="router scoring")
    p.add_argument(
        "--router-std",
        type=number,
        default=None,
        help="std of the fresh router (default initializer_range; 0 = uniform)",
    )
    p.add_argument("--tokenizer", default=None, help="byte or a tokenizer folder, when the folder has none")
    p.add_argument("--seed", type=integer, default=0, help="router initialisation seed")
    p.add_argument("--out", required=True, help="run directory to create")
    p.add_argument(
        "--force", action="store_true", help="write into an existing run directory or a non-empty folder"
    )
    p.add_argument("overrides", nargs="*", default=[], help="model.KEY=VALUE overrides")


def run(args) -> int:
    from minimoe.hf.upcycle import upcycle

    ckpt = upcycle(
        args.dense_dir, args.out, args.experts, args.top_k, granularity=args.granularity,
        dense_layers=args.dense_layers, scoring=args.scoring, router_std=args.router_std,
        tokenizer=args.tokenizer, overrides=args.overrides, seed=args.seed, force=args.force,
    )  # fmt: skip
    print(
        f"upcycled {args.dense_dir} into {ckpt} ({args.experts} experts, top-{args.top_k}, granularity {args.granularity})"
    )
    return 0
