"""Inference benchmarks: KV cache, absorbed MLA, MTP self-speculative decoding, int8/int4 weights.

    python benchmarks/decode.py                 # all four sections, Markdown on stdout
    python benchmarks/decode.py --quick         # smaller sizes, fewer repeats (about a minute)
    python benchmarks/decode.py --section spec --run-dir runs/tinystories   # reuse a trained run

Sections:
  cache  decode tokens/s with the KV cache vs recomputing the full sequence every step
         (`tiny` preset, random weights), batch 1 and 8, prompt 32 and 512;
  mla    absorbed MLA decode (attend over the cached latent) vs naive MLA (re-expand the whole latent
         cache through kv_b_proj every step, as HF does), tokens/s and cache bytes at growing context
         (`small` preset attention shapes, random weights);
  spec   MTP self-speculative vs plain decoding on a trained model (greedy, greedy with a repetition
         penalty, sampling): acceptance and speedup (the model is trained here, once, unless --run-dir
         names a run with model.mtp_depth >= 1);
  quant  int8 / int4 weights vs fp32 / bf16: weight memory, decode tokens/s, perplexity on held-out
         text (same trained model).
Methods in one table run round-robin within each repeat and the median is kept, so a burst of
load from other processes hits all of them alike; compare the ratios, not the absolute numbers.
The spec and quant sections train on /work/shared/data/tinystories when it exists, else on the
built-in corpus (Python's standard library) with minimoe's own source as held-out text.
"""

from __future__ import annotations

import argparse
import copy
import functools
import platform
import statistics
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from minimoe.infer.generate import GenerationStats, generate_tokens, stream_batch
from minimoe.infer.quantize import heldout_ids, perplexity, quantize_model, weight_bytes
from minimoe.infer.sampling import SamplingParams
from minimoe.model.attention import MLAttention
from minimoe.model.transformer import Transformer
from minimoe.presets import get_preset

TINYSTORIES = Path("/work/shared/data/tinystories")
GREEDY = SamplingParams(temperature=0.0)


def median_rates(fns: dict, repeats: int) -> dict[str, float]:
    """Run each zero-argument fn (returning tokens produced) round-robin; median tokens/s per name."""
    rates: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            n = fn()
            rates[name].append(n / (time.perf_counter() - t0))
    return {k: statistics.median(v) for k, v in rates.items()}


def table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def random_model(preset: str, max_position_embeddings: int, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    return Transformer(
        replace(get_preset(preset), max_position_embeddings=max_position_embeddings, mtp_depth=0)
    ).eval()


# ------------------------------------------------------------------------------------ 1: cache


@torch.no_grad()
def decode_no_cache(model, prompts: torch.Tensor, n_new: int) -> int:
    """Greedy decoding that re-runs the whole (B, L + t) sequence every step; returns tokens made."""
    seq = prompts
    for _ in range(n_new):
        nxt = model(seq, num_logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)  # (B, 1)
        seq = torch.cat([seq, nxt], dim=1)
    return prompts.shape[0] * n_new


def decode_cached(model, prompts: torch.Tensor, n_new: int) -> int:
    return sum(
        sum(t is not None for t in step) for step in stream_batch(model, prompts.tolist(), n_new, GREEDY)
    )


def section_cache(quick: bool) -> str:
    n_new, repeats = (16, 2) if quick else (32, 3)
    model = random_model("tiny", 512 + n_new)
    g = torch.Generator().manual_seed(0)
    rows = []
    for batch in (1, 8):
        for prompt_len in (32, 512):
            prompts = torch.randint(0, model.cfg.vocab_size, (batch, prompt_len), generator=g)
            r = median_rates(
                {
                    "cache": lambda p=prompts: decode_cached(model, p, n_new),
                    "recompute": lambda p=prompts: decode_no_cache(model, p, n_new),
                },
                repeats,
            )
            rows.append(
                [
                    batch,
                    prompt_len,
                    f"{r['recompute']:.1f}",
                    f"{r['cache']:.1f}",
                    f"**{r['cache'] / r['recompute']:.1f}x**",
                ]
            )
    cfg = model.cfg
    attention = (
        "MLA" if cfg.attn_type == "mla" else "GQA" if cfg.kv_heads < cfg.num_attention_heads else "MHA"
    )
    head = (
        f"### KV cache vs full recompute\n\n`tiny` preset ({attention}, {model.num_params() / 1e6:.1f}M parameters), "
        f"random weights, greedy, {n_new} new tokens, prefill included, fp32.\n\n"
    )
    return head + table(["batch", "prompt", "recompute tok/s", "cached tok/s", "speedup"], rows)


# -------------------------------------------------------------------------------------- 2: MLA


def set_absorb(model, absorb: bool) -> None:
    """Force MLA decoding to the absorbed or the naive path (naive re-expands the latent every step)."""
    for block in model.layers:
        attn = block.self_attn
        if isinstance(attn, MLAttention):
            if absorb:
                attn.__dict__.pop("forward", None)
            else:
                attn.forward = functools.partial(MLAttention.forward, attn, absorb=False)


@torch.no_grad()
def decode_from_context(model, context: int, n_new: int, absorb: bool) -> int:
    set_absorb(model, absorb)
    g = torch.Generator().manual_seed(context)
    ids = torch.randint(0, model.cfg.vocab_size, (1, context), generator=g)
    cache = model.make_cache(1, context + n_new)
    model(ids, cache=cache, num_logits_to_keep=1)  # prefill is the same for both: not timed below
    tok = ids[:, -1:]
    t0 = time.perf_counter()
    for _ in range(n_new):
        tok = model(tok, cache=cache, num_logits_to_keep=1).logits[:, -1].argmax(-1, keepdim=True)
    return n_new, time.perf_counter() - t0


def section_mla(quick: bool) -> str:
    contexts = [128, 512] if quick else [128, 512, 1024, 2048]
    n_new, repeats = (8, 2) if quick else (32, 3)
    model = random_model("small", max(contexts) + n_new)
    cfg = model.cfg
    latent = model.cache_bytes_per_token(torch.float32)  # (kv_lora_rank + rope) per layer
    expanded = (
        cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4
    )  # HF-style K/V
    rows = []
    for ctx in contexts:
        times: dict[bool, list[float]] = {True: [], False: []}
        for _ in range(repeats):
            for absorb in (True, False):
                n, dt = decode_from_context(model, ctx, n_new, absorb)
                times[absorb].append(n / dt)
        a, nv = statistics.median(times[True]), statistics.median(times[False])
        rows.append(
            [
                ctx,
                f"{latent * ctx / 2**20:.2f}",
                f"{expanded * ctx / 2**20:.2f}",
                f"{nv:.1f}",
                f"{a:.1f}",
                f"**{a / nv:.2f}x**",
            ]
        )
    set_absorb(model, True)
    head = (
        f"### Absorbed vs naive MLA decoding\n\n`small` preset ({cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
        f"kv_lora_rank {cfg.kv_lora_rank}, rope {cfg.qk_rope_head_dim}, nope {cfg.qk_nope_head_dim}, "
        f"v {cfg.v_head_dim}), random weights, batch 1, fp32, {n_new} decode steps after a prefill of the "
        f"given context (prefill not timed). Both paths keep the same latent cache "
        f"({latent} bytes/token); naive re-expands all of it through kv_b_proj every step, and an HF-style "
        f"cache of expanded keys and values would hold {expanded} bytes/token "
        f"({expanded / latent:.0f}x).\n\n"
    )
    return head + table(
        ["context", "latent cache MiB", "expanded K/V MiB", "naive tok/s", "absorbed tok/s", "speedup"], rows
    )


# ------------------------------------------------------------------------- trained model (3, 4)


def trained_model(args) -> tuple[Transformer, object, str, str]:
    """(model, tokenizer, what it was trained on, held-out source) from --run-dir or a quick training."""
    from minimoe.errors import MinimoeError
    from minimoe.train.checkpoint import load_run
    from minimoe.train.run import train_from_config

    have_stories = (TINYSTORIES / "train.txt").exists()
    heldout = (
        str(TINYSTORIES / "valid.txt") if have_stories else str(Path(__file__).parents[1] / "src/minimoe")
    )
    if args.run_dir:
        try:
            model, tok, cfg, _ = load_run(args.run_dir)
        except MinimoeError as e:  # e.g. no such run on a fresh clone
            raise SystemExit(f"{Path(sys.argv[0]).name}: {e}") from None
        return model, tok, f"`{args.run_dir}` ({cfg.data.path or 'built-in corpus'})", heldout
    steps = 60 if args.quick else 400
    run = Path(args.work_dir) / f"spec-{'stories' if have_stories else 'builtin'}-{steps}"
    if not (run / "checkpoints" / "latest").exists():
        overrides = [
            f"train.max_steps={steps}", "train.batch_size=8", "train.seq_len=128", "train.lr=3e-3",
            "train.warmup_steps=20", f"train.eval_every={steps}", "train.eval_batches=4", "train.sample_tokens=0",
            "model.mtp_depth=1", "data.tokenizer=byte", "data.workers=1", "train.max_minutes=null",
        ]  # fmt: skip
        if have_stories:
            overrides.append(f"data.path={TINYSTORIES / 'train.txt'}")
        print(f"training {run} ({steps} steps)...", file=sys.stderr)
        train_from_config("tiny", overrides=overrides, run_dir=run, progress=False, sample=False)
    model, tok, cfg, meta = load_run(run)
    data = "TinyStories (1,000 stories)" if have_stories else "the built-in corpus"
    shape = f"{cfg.train.batch_size} x {cfg.train.seq_len} tokens"
    return model, tok, f"`tiny` preset, byte tokenizer, {meta['step']} steps of {shape} on {data}", heldout


def prompts_for(tok, heldout: str, n: int, length: int) -> list[list[int]]:
    ids = heldout_ids(tok, heldout, n * length * 4)
    return [ids[i * 3 * length : i * 3 * length + length].tolist() for i in range(n)]


SPEC_MODES = {  # name -> generate_tokens keyword arguments
    "greedy": dict(temperature=0.0),
    "greedy, repetition penalty 1.3": dict(temperature=0.0, repetition_penalty=1.3),
    "sampling T=0.8, top-k 50": dict(temperature=0.8, top_k=50),
}


def section_spec(model, tok, trained_on: str, heldout: str, quick: bool) -> str:
    n_prompts, n_new, repeats = (4, 48, 1) if quick else (8, 128, 2)
    prompts = prompts_for(tok, heldout, n_prompts, 32)
    rows = []
    for mode, kw in SPEC_MODES.items():
        plain_rates, spec_rates = [], []
        stats = GenerationStats()
        identical = True
        for _ in range(repeats):
            for i, p in enumerate(prompts):
                t0 = time.perf_counter()
                plain = list(generate_tokens(model, p, n_new, seed=i, **kw))
                plain_rates.append(len(plain) / (time.perf_counter() - t0))
                t0 = time.perf_counter()
                spec = list(generate_tokens(model, p, n_new, seed=i, speculative=True, stats=stats, **kw))
                spec_rates.append(len(spec) / (time.perf_counter() - t0))
                identical &= spec == plain
        a, b = statistics.median(plain_rates), statistics.median(spec_rates)
        same = ("yes" if identical else "**NO**") if kw["temperature"] == 0 else "n/a (same distribution)"
        rows.append(
            [
                mode,
                f"{a:.1f}",
                f"{b:.1f}",
                f"{stats.acceptance_rate:.1%}",
                f"{stats.new_tokens / stats.forward_calls:.2f}",
                f"**{b / a:.2f}x**",
                same,
            ]
        )
    head = (
        f"### MTP self-speculative vs plain decoding\n\n{trained_on}; {len(prompts)} prompts of 32 "
        f"held-out tokens, {n_new} new tokens each, batch 1, fp32, median tok/s over prompts"
        f"{' and repeats' if repeats > 1 else ''}. One draft token per step from the MTP module, verified "
        f"by one main-model forward over 2 tokens (rejection sampling when sampling). Tokens per main "
        f"forward counts the prefill.\n\n"
    )
    return head + table(
        ["decoding", "plain tok/s", "speculative tok/s", "acceptance", "tokens per main forward", "speedup",
         "same tokens as plain"],
        rows,
    )  # fmt: skip


def section_quant(model, tok, trained_on: str, heldout: str, quick: bool) -> str:
    n_new, repeats = (32, 2) if quick else (96, 3)
    eval_tokens = 8192 if quick else 65536
    ids = heldout_ids(tok, heldout, eval_tokens)
    prompt = ids[:32].tolist()
    variants = {"fp32": model, "bf16": copy.deepcopy(model).to(torch.bfloat16)}
    for bits, gs in ((8, 0), (4, 64), (4, 32)):  # group sizes that divide the tiny preset's widths
        name = "int8 (per channel)" if bits == 8 else f"int4 (group {gs})"
        variants[name] = quantize_model(copy.deepcopy(model), bits, gs or 64)

    def run(m):
        return lambda: len(list(generate_tokens(m, prompt, n_new, temperature=0.0)))

    rates = median_rates({k: run(m) for k, m in variants.items()}, repeats)
    base_bytes, base_rate = weight_bytes(model), rates["fp32"]
    base_ppl = perplexity(model, ids, 128)
    rows = []
    for name, m in variants.items():
        ppl = base_ppl if name == "fp32" else perplexity(m, ids, 128)
        rows.append(
            [
                name,
                f"{weight_bytes(m) / 2**20:.2f}",
                f"{weight_bytes(m) / base_bytes:.2f}",
                f"{rates[name]:.1f}",
                f"{rates[name] / base_rate:.2f}",
                f"{ppl:.3f}",
                f"{ppl / base_ppl - 1:+.2%}",
            ]
        )
    emb = model.embed_tokens.weight
    tied = model.lm_head.weight is emb
    head = (
        f"### Weight-only int8 / int4\n\n{trained_on}; perplexity on {ids.numel()} held-out tokens "
        f"(windows of 128), decode {n_new} tokens greedy at batch 1. All linear and routed-expert weights "
        f"are quantized; the {'tied ' if tied else ''}embedding, norms and router stay in the model dtype "
        f"({emb.numel() * emb.element_size() / 2**20:.2f} MiB of embedding in fp32). Weights are "
        f"dequantized on the fly (int8 on CPU/fp32 through `torch._weight_int8pack_mm`).\n\n"
    )
    return head + table(
        ["weights", "MiB", "vs fp32", "decode tok/s", "vs fp32", "perplexity", "change"], rows
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    p.add_argument("--section", choices=["all", "cache", "mla", "spec", "quant"], default="all")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--run-dir", default=None, help="trained run (with MTP) for the spec and quant sections")
    p.add_argument("--work-dir", default="runs/bench-decode", help="where the trained model is kept")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {platform.machine()} CPU, {torch.get_num_threads()} thread(s)"
        f"{', --quick' if args.quick else ''}\n"
    )
    if args.section in ("all", "cache"):
        print(section_cache(args.quick) + "\n", flush=True)
    if args.section in ("all", "mla"):
        print(section_mla(args.quick) + "\n", flush=True)
    if args.section in ("all", "spec", "quant"):
        model, tok, trained_on, heldout = trained_model(args)
        if args.section in ("all", "spec"):
            print(section_spec(model, tok, trained_on, heldout, args.quick) + "\n", flush=True)
        if args.section in ("all", "quant"):
            print(section_quant(model, tok, trained_on, heldout, args.quick) + "\n", flush=True)


if __name__ == "__main__":
    main()
