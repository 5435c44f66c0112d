"""`minimoe generate RUN_DIR --prompt ...`: sample from a trained model with the KV cache."""

from __future__ import annotations

import sys


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained run")
    p.add_argument("run_dir", help="run directory or checkpoint directory")
    p.add_argument("--prompt", default=None, help="prompt text (default: read standard input if piped)")
    p.add_argument(
        "--checkpoint", choices=["best", "latest"], default="best", help="which checkpoint to load"
    )
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument("--seed", type=int, default=None, help="random seed")
    p.add_argument("--device", default="cpu", help="cpu or cuda")


def run(args) -> int:
    from minimoe.errors import MinimoeError
    from minimoe.infer.generate import generate_tokens
    from minimoe.train.checkpoint import load_run

    if args.max_new_tokens < 0:
        raise MinimoeError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    if args.temperature < 0:
        raise MinimoeError(f"--temperature must be >= 0, got {args.temperature}")
    if not 0 < args.top_p <= 1:
        raise MinimoeError(f"--top-p must be in (0, 1], got {args.top_p}")
    prompt = args.prompt
    if prompt is None:
        prompt = "" if sys.stdin.isatty() else sys.stdin.read()
    model, tok, _, _ = load_run(args.run_dir, args.checkpoint, args.device)
    ids = tok.encode(prompt) if prompt else [tok.eos_id]
    sys.stdout.write(prompt)
    produced: list[int] = []
    printed = ""
    for t in generate_tokens(
        model, ids, args.max_new_tokens, args.temperature, args.top_k, args.top_p, args.seed, (tok.eos_id,)
    ):
        produced.append(t)
        text = tok.decode(produced)
        if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
            sys.stdout.write(text[len(printed) :])
            sys.stdout.flush()
            printed = text
    sys.stdout.write(tok.decode(produced)[len(printed) :] + "\n")
    return 0
