"""`minimoe generate RUN_DIR`: sample from a trained run with the KV cache.

Prompts come from `--prompt` (repeatable), `--prompt-file` (one prompt per line, or JSONL records
with a "prompt" field; `-` reads the file from standard input), or, with neither, the whole of
standard input as one prompt. Text output streams tokens as they are produced when prompts are
decoded one at a time; JSONL output writes one record per prompt.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minimoe.cli.args import add_checkpoint_arg, add_device_args, integer, number, set_threads, stop_string


def add_parser(sub) -> None:
    p = sub.add_parser("generate", help="generate text from a trained run")
    p.add_argument("run_dir", help="run directory or checkpoint directory (quantized ones too)")
    p.add_argument("--prompt", action="append", default=None, help="prompt text; repeat for several prompts")
    p.add_argument(
        "--prompt-file",
        default=None,
        help="file with one prompt per line, or JSONL with a 'prompt' field ('-' = standard input)",
    )
    add_checkpoint_arg(p)
    p.add_argument("--max-new-tokens", type=integer, default=200, help="tokens to generate per prompt")
    p.add_argument("--temperature", type=number, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=integer, default=0, help="keep the k most likely tokens (0 = off)")
    p.add_argument("--top-p", type=number, default=1.0, help="nucleus sampling mass (1 = off)")
    p.add_argument(
        "--repetition-penalty", type=number, default=1.0, help="CTRL penalty on seen tokens (1 = off)"
    )
    p.add_argument("--beams", type=integer, default=1, help="beam search with this many beams (1 = off)")
    p.add_argument(
        "--length-penalty", type=number, default=1.0, help="beam scores are divided by length**this"
    )
    p.add_argument(
        "--stop", action="append", default=[], type=stop_string,
        help='stop string ("\\n" is the newline); repeat for several',
    )  # fmt: skip
    p.add_argument("--seed", type=integer, default=None, help="random seed")
    p.add_argument("--batch-size", type=integer, default=8, help="prompts decoded together")
    p.add_argument(
        "--speculative",
        action="store_true",
        help="self-speculative decoding: draft with the MTP module, verify with the main model",
    )
    p.add_argument(
        "--quantize", type=integer, choices=[8, 4], default=None, help="quantize weights on load (int8/int4)"
    )
    p.add_argument("--group-size", type=integer, default=64, help="int4 group size")
    p.add_argument("--output", choices=["text", "jsonl"], default="text", help="output format")
    p.add_argument("--stats", action="store_true", help="print tokens/s, cache bytes, acceptance to stderr")
    add_device_args(p, threads=True)


def utf8_text(text: str, where: str) -> str:
    """`text`, or MinimoeError naming `where` when it came from bytes that are not UTF-8 (Python reads
    those bytes of standard input and of arguments as lone surrogates, which no tokenizer encodes)."""
    from minimoe.errors import MinimoeError

    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise MinimoeError(f"{where} is not UTF-8 text") from None
    return text


def read_stdin() -> str:
    """Standard input's text without a leading UTF-8 byte-order mark, as prompt files are read: the mark
    is not part of a prompt, and before a JSONL '{' it made the JSON lines plain prompts."""
    return utf8_text(sys.stdin.read(), "standard input").removeprefix("\ufeff")


def read_prompt_file(path: str) -> list[str]:
    """Prompts from a file: JSONL records with a 'prompt' field when the first non-blank line starts
    with '{', else one prompt per non-blank line. '-' reads standard input (`read_stdin`)."""
    from minimoe.errors import MinimoeError

    if path == "-":
        text = read_stdin()
    else:
        f = Path(path)
        if f.is_dir():
            raise MinimoeError(f"prompt file {f} is a directory, not a file")
        if not f.is_file():
            raise MinimoeError(f"prompt file {f} does not exist")
        try:
            text = f.read_text(encoding="utf-8-sig")  # a leading byte-order mark is not part of a prompt
        except UnicodeDecodeError:
            raise MinimoeError(f"prompt file {f} is not UTF-8 text") from None
    lines = [(n, line) for n, line in enumerate(text.splitlines(), 1) if line.strip()]
    if not lines:
        raise MinimoeError(f"prompt file {path} holds no prompts")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    prompts = []
    for n, line in lines:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            raise MinimoeError(f"{path} line {n} is not valid JSON") from None
        if not isinstance(rec, dict) or not isinstance(rec.get("prompt"), str):
            raise MinimoeError(f"{path} line {n} has no string 'prompt' field")
        prompts.append(rec["prompt"])
    return prompts


def _validate(args) -> None:
    from minimoe.dist.init import resolve_device
    from minimoe.errors import MinimoeError
    from minimoe.infer.sampling import SamplingParams

    resolve_device(args.device, what="--device")
    if args.max_new_tokens < 0:
        raise MinimoeError(f"--max-new-tokens must be >= 0, got {args.max_new_tokens}")
    SamplingParams(args.temperature, args.top_k, args.top_p, args.repetition_penalty).validate()
    if args.beams < 1:
        raise MinimoeError(f"--beams must be >= 1, got {args.beams}")
    if args.batch_size < 1:
        raise MinimoeError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.speculative and args.beams > 1:
        raise MinimoeError("--speculative and --beams cannot be combined")


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def run(args) -> int:
    from minimoe.errors import MinimoeError
    from minimoe.infer.generate import GenerationStats, complete
    from minimoe.infer.quantize import quantize_model, weight_bytes
    from minimoe.train.checkpoint import load_run

    _validate(args)
    set_threads(args.threads)
    prompts = [utf8_text(p, "--prompt") for p in args.prompt or []]
    if args.prompt_file:
        prompts += read_prompt_file(args.prompt_file)
    if not prompts:
        prompts = ["" if sys.stdin.isatty() else read_stdin()]
    model, tok, _, meta = load_run(args.run_dir, args.checkpoint, args.device)
    if args.quantize:
        if getattr(model, "quantization", None):
            raise MinimoeError(f"{meta['path']} is already quantized ({meta['quantization']['bits']}-bit)")
        quantize_model(model, args.quantize, args.group_size)
    if args.speculative and not len(model.mtp):
        raise MinimoeError("--speculative needs a model trained with MTP modules (model.mtp_depth >= 1)")

    limit = model.cfg.max_position_embeddings - 1
    for i, prompt in enumerate(prompts):
        n = len(tok.encode(prompt))
        if n > limit:
            sys.stderr.write(f"minimoe generate: prompt {i} has {n} tokens; keeping its last {limit}\n")
    stats = GenerationStats()
    kw = dict(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
        top_p=args.top_p, repetition_penalty=args.repetition_penalty, seed=args.seed, stop=args.stop,
        num_beams=args.beams, length_penalty=args.length_penalty, speculative=args.speculative,
        batch_size=args.batch_size, stats=stats,
    )  # fmt: skip
    out = sys.stdout

    def write_result(i: int, res) -> None:
        rec = {"index": i, "prompt": res.prompt, "completion": res.text}
        rec.update(num_tokens=len(res.token_ids), finish_reason=res.finish_reason)
        if res.score is not None:
            rec["score"] = res.score
        out.write(json.dumps(rec, ensure_ascii=False) + "\n")
        out.flush()

    def stream(i: int, piece: str) -> None:
        out.write(piece)
        out.flush()

    sequential = len(prompts) == 1 or args.batch_size == 1 or args.beams > 1 or args.speculative
    if sequential:  # one prompt at a time: text output streams as tokens arrive
        for i, prompt in enumerate(prompts):
            if args.output == "text":
                out.write(prompt)
                out.flush()
            on_text = stream if args.output == "text" else None
            (res,) = complete(model, tok, [prompt], on_text=on_text, **kw)
            if args.output == "text":
                out.write("\n")
            else:
                write_result(i, res)
    else:
        for i, res in enumerate(complete(model, tok, prompts, **kw)):
            if args.output == "text":
                out.write(res.prompt + res.text + "\n")
            else:
                write_result(i, res)
    out.flush()

    if args.stats:
        _print_stats(model, stats, len(prompts), weight_bytes(model))
    return 0


def _print_stats(model, stats, n_prompts: int, wbytes: int) -> None:
    cfg = model.cfg
    kind = (
        "MLA latent, absorbed decode" if cfg.attn_type == "mla"
        else f"{'GQA' if cfg.kv_heads < cfg.num_attention_heads else 'MHA'} keys/values"
    )  # fmt: skip
    q = getattr(model, "quantization", None)
    lines = [
        f"stats: {n_prompts} prompt(s), {stats.prompt_tokens} prompt tokens, {stats.new_tokens} new tokens "
        f"in {stats.seconds:.2f} s ({stats.tokens_per_s:.1f} tokens/s; prefill {stats.prefill_s:.2f} s, "
        f"{stats.forward_calls} forward passes)",
        f"stats: KV cache ({kind}): {_format_bytes(stats.cache_bytes_used)} in use, "
        f"{_format_bytes(stats.cache_bytes_allocated)} allocated, "
        f"{model.cache_bytes_per_token(model.embed_tokens.weight.dtype)} bytes per token",
        f"stats: weights {_format_bytes(wbytes)}" + (f" (int{q['bits']})" if q else ""),
    ]
    if stats.acceptance_rate is not None:
        lines.append(
            f"stats: speculative acceptance {stats.acceptance_rate:.1%} ({stats.accepted}/{stats.drafted} "
            f"drafts), {stats.new_tokens / max(stats.forward_calls, 1):.2f} tokens per forward pass"
        )
    sys.stderr.write("\n".join(lines) + "\n")
