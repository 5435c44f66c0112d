"""`minimoe quantize RUN_DIR --bits 8|4 --out DIR`: weight-only int8/int4 quantization of a run.

Writes DIR as a checkpoint directory (integer weights and scales, config, tokenizer, meta) that
`minimoe generate DIR` and `load_run(DIR)` load again. With `--eval-data` it measures perplexity on
held-out text before and after.
"""

from __future__ import annotations

from minimoe.cli.args import add_checkpoint_arg, add_device_args, integer, set_threads


def add_parser(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a run's weights to int8 or int4")
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument(
        "--bits", type=integer, choices=[8, 4], required=True, help="8 (per channel) or 4 (groups)"
    )
    p.add_argument("--group-size", type=integer, default=64, help="int4: inputs sharing one scale")
    p.add_argument("--out", required=True, help="new checkpoint directory to write")
    add_checkpoint_arg(p)
    p.add_argument("--eval-data", default=None, help="held-out text for a perplexity check before/after")
    p.add_argument("--eval-tokens", type=integer, default=32768, help="tokens of --eval-data to score")
    p.add_argument("--seq-len", type=integer, default=None, help="perplexity window (default: train.seq_len)")
    add_device_args(p, threads=True)


def run(args) -> int:
    from minimoe.dist.init import resolve_device
    from minimoe.errors import MinimoeError
    from minimoe.infer.quantize import (
        check_quant_args,
        check_quantized_out,
        heldout_ids,
        perplexity,
        quantize_model,
        save_quantized,
        weight_bytes,
    )
    from minimoe.train.checkpoint import load_run

    check_quant_args(args.bits, args.group_size)
    set_threads(args.threads)
    if args.eval_tokens < 2:
        raise MinimoeError(f"--eval-tokens must be at least 2, got {args.eval_tokens}")
    if args.seq_len is not None and args.seq_len < 2:
        raise MinimoeError(f"--seq-len must be at least 2, got {args.seq_len}")
    resolve_device(args.device, what="--device")
    check_quantized_out(args.out)  # before any work: loading, quantizing, the perplexity passes
    model, tok, cfg, meta = load_run(args.run_dir, args.checkpoint, args.device)
    if getattr(model, "quantization", None):
        raise MinimoeError(f"{meta['path']} is already quantized")
    seq_len = args.seq_len or cfg.train.seq_len
    # perplexity() would cut a longer window to the context, and the report would name the uncut one
    if seq_len > cfg.model.max_position_embeddings:
        raise MinimoeError(
            f"--seq-len {seq_len} exceeds the model's context ({cfg.model.max_position_embeddings} tokens)"
        )
    ids = heldout_ids(tok, args.eval_data, args.eval_tokens) if args.eval_data else None
    before = weight_bytes(model)
    ppl_before = perplexity(model, ids, seq_len) if ids is not None else None
    quantize_model(model, args.bits, args.group_size)
    after = weight_bytes(model)
    ppl_after = perplexity(model, ids, seq_len) if ids is not None else None
    out = save_quantized(model, meta["path"], args.out)

    scheme = "per-channel int8" if args.bits == 8 else f"int4, groups of {args.group_size}"
    print(f"quantized {meta['path']} ({scheme})")
    print(
        f"weights: {before / 2**20:.2f} MiB -> {after / 2**20:.2f} MiB "
        f"({1 - after / before:.1%} smaller; embedding, norms and router stay {model.embed_tokens.weight.dtype})"
    )
    if ids is not None:
        print(
            f"perplexity on {args.eval_data} ({ids.numel()} tokens, windows of {seq_len}): "
            f"{ppl_before:.3f} -> {ppl_after:.3f} ({ppl_after / ppl_before - 1:+.2%})"
        )
    print(f"wrote {out}")
    return 0
