"""minimoe's serving engine against transformers' continuous batching, on one request mix.

Both sides get the same weights (a minimoe run directory and its export by `minimoe.hf.export`), the same
prompts (token ids), greedy decoding and the same number of new tokens per request (no EOS on either
side), all requests handed over at once:

- minimoe: `minimoe.serve.engine.Engine`, the engine `minimoe serve` runs, with the server's default
  limits (`Limits()`: 64 cache slots, 256-token prefill chunks), called in-process (no HTTP);
- transformers: `model.generate_batch(inputs=..., generation_config=...)` on the model loaded with
  `AutoModelForCausalLM.from_pretrained` (its default SDPA attention; the manager keeps SDPA on a
  CPU, where there is no flash attention), its paged cache sized to hold every request at once.

Each side runs in its own process at its own best CPU setting, chosen as `minimoe.bench.fair` chooses
it: a probe (the same mix, fewer new tokens) runs in a fresh process under every OMP_WAIT_POLICY x
threads setting and the fastest is kept; then the two sides take turns, process after process, and
the median is kept. A process builds its engine (or manager), warms it up on a different mix of the
same shape (transformers' prefix cache never sees the timed prompts), then times one pass: from
handing over the requests to having every output back.

transformers 5.23 and MLA: the paged cache gives keys and values one width per head,
`find_head_dim(config)` (continuous_batching/utils.py), and the DeepseekV3 attention writes its
expanded per-head keys (qk_nope_head_dim + qk_rope_head_dim wide) and values (v_head_dim wide) into
it (integrations/sdpa_attention.py, `cache.update`). `DeepseekV3Config` sets `head_dim` to
qk_rope_head_dim, the RoPE width, so every MLA model fails there with "index_copy_(): Source/destination
tensor must have same slice shapes" (cache_allocators/full_attention.py, `k_cache.index_copy_`). The
transformers side therefore sets `config.head_dim` to the key width after loading (the RoPE table is
already built from it by then; nothing else reads it), which works when the values are as wide as the
keys; `paged_cache_refusal` names the models where they are not.

`python -m minimoe.bench.continuous TASK SIDE --run R --hf H --mix M --threads N` is the worker each
process runs (one JSON line on stdout).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

from minimoe.bench.fair import SIDES, choose_setting, run_worker, settings_to_try

WORKER = "minimoe.bench.continuous"
WARM_UP_TOKENS = 4  # new tokens per request in the warm-up pass
CHAR_BASE = 0xF0000  # Unicode's plane-15 private use area: token id i is the character U+F0000 + i


def make_mix(n: int, min_len: int, max_len: int, vocab_size: int, seed: int) -> list[list[int]]:
    """`n` prompts of random token ids, lengths uniform in [min_len, max_len], drawn from `seed`."""
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(min_len, max_len))] for _ in range(n)]


def paged_cache_refusal(cfg) -> str | None:
    """Why transformers' paged cache cannot hold this model's attention (see the module docstring), or None."""
    if cfg.attn_type != "mla":
        return None
    width = cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.v_head_dim != width:
        return (
            f"transformers' continuous batching keeps keys and values in one paged cache of one width per head, "
            f"and this model's MLA keys are {width} wide (qk_nope_head_dim + qk_rope_head_dim) but its values "
            f"{cfg.v_head_dim} (v_head_dim); compare a model with model.v_head_dim={width}"
        )
    return None


def identical_fraction(a: list[list[int]], b: list[list[int]]) -> float:
    """The fraction of requests whose generated tokens are the same on both sides."""
    return sum(x == y for x, y in zip(a, b, strict=True)) / max(len(a), 1)


# ------------------------------------------------------------------------------------- one side each


class TokenIds:
    """The engine's tokenizer for the benchmark: token i is the character U+F0000 + i, so a finished
    text gives its token ids back, and no token ends a sequence (transformers' side has no EOS either)."""

    eos_id = None

    def __init__(self, vocab_size: int) -> None:
        if vocab_size > 0xFFFFE - CHAR_BASE:
            raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit the private use plane")

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(CHAR_BASE + i) for i in ids)


def engine_generate(engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """Hand every prompt to a started Engine at once (greedy, `max_new_tokens` each); wait for all."""
    from minimoe.serve.jobs import Failure, Finish, Job, JobParams

    outputs: list[list[int] | None] = [None] * len(prompts)
    errors: list[str] = []
    left = [len(prompts)]
    done = threading.Event()

    def post(event) -> None:  # called from the engine's worker thread
        if isinstance(event, Finish):
            outputs[event.index] = [ord(c) - CHAR_BASE for c in event.text]
        elif isinstance(event, Failure):
            errors.append(event.message)
        else:
            return
        left[0] -= 1
        if not left[0]:
            done.set()

    params = JobParams(max_tokens=max_new_tokens, temperature=0.0)
    for i, p in enumerate(prompts):  # one client per request, as from many HTTP clients
        engine.submit([Job(i, p, params, post, client=f"client-{i}")])
    done.wait()
    if errors:
        raise RuntimeError(f"the engine failed a request: {errors[0]}")
    return outputs  # type: ignore[return-value]


def run_minimoe(
    run: str, warm: list[list[int]], prompts: list[list[int]], new: int, compile: bool = False
) -> tuple[list, float]:
    """(outputs, seconds) of the timed pass through the serving engine, after a warm-up pass; with
    `compile`, the engine's compiled fixed-shape step, compiled before the warm-up pass."""
    from minimoe.serve.engine import Engine
    from minimoe.serve.limits import Limits
    from minimoe.train.checkpoint import load_run

    model, _, _, _ = load_run(run)
    # the server's defaults
    engine = Engine.from_limits(model, TokenIds(model.cfg.vocab_size), Limits(), compile=compile)
    engine.warm_up()
    engine.start()
    try:
        engine_generate(engine, warm, min(WARM_UP_TOKENS, new))
        t0 = time.perf_counter()
        outputs = engine_generate(engine, prompts, new)
        return outputs, time.perf_counter() - t0
    finally:
        engine.close()


def run_hf(
    hf_dir: str, warm: list[list[int]], prompts: list[list[int]], new: int, attn: str = "sdpa"
) -> tuple[list, float]:
    """(outputs, seconds) of the timed `generate_batch` pass, after a warm-up pass on the same manager."""
    from transformers import AutoModelForCausalLM, ContinuousBatchingConfig, GenerationConfig

    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, attn_implementation=attn).eval()
    if getattr(model.config, "kv_lora_rank", None):  # MLA: the paged cache's width per head (see above)
        model.config.head_dim = model.config.qk_nope_head_dim + model.config.qk_rope_head_dim
    # eos_token_id None: the manager turns EOS off (-1), so every request gets `new` tokens
    gen = GenerationConfig(do_sample=False, max_new_tokens=new, eos_token_id=None, pad_token_id=0)
    # a cache that holds every request at once, as the engine's 64 slots do; the default takes 60% of
    # the machine's memory on a CPU
    page = 256
    longest = max(len(p) for p in warm + prompts) + new
    cb = ContinuousBatchingConfig(page_size=page, num_blocks=len(prompts) * math.ceil(longest / page) + 1)

    def generate(inputs: list[list[int]], n: int) -> list[list[int]]:
        # persistent: the manager built (and sized, from the number of requests) by the warm-up is reused
        out = model.generate_batch(inputs=inputs, generation_config=gen, continuous_batching_config=cb,
                                   persistent_manager=True, max_new_tokens=n)  # fmt: skip
        results = list(out.values())  # in the order of `inputs`
        failed = [r.error for r in results if r.error is not None]
        if failed or len(results) != len(inputs):
            why = failed[0] if failed else f"{len(inputs) - len(results)} requests have no result"
            raise RuntimeError(f"transformers' continuous batching failed: {why}")
        return [list(r.generated_tokens) for r in results]

    try:
        generate(warm, min(WARM_UP_TOKENS, new))
        t0 = time.perf_counter()
        outputs = generate(prompts, new)
        return outputs, time.perf_counter() - t0
    finally:
        model.destroy_cached_continuous_batching_manager()


# ------------------------------------------------------------------------------------- the comparison


def steps(rounds: int) -> int:
    """Progress steps of `compare`: one per side's choice of setting, one per timed process."""
    return len(SIDES) * (1 + rounds)


def compare(
    base: list[str],
    rounds: int = 3,
    settings: list[tuple[str, int]] | None = None,
    on_step: Callable[[str], None] | None = None,
) -> dict:
    """Choose each side's setting, then time `rounds` processes per side, taking turns.

    Args:
        base: worker arguments: ["--run", RUN, "--hf", HF_DIR, "--mix", MIX_JSON].
        rounds: timed processes per side (median kept).
        settings: (OMP_WAIT_POLICY, threads) pairs to try (default `fair.settings_to_try()`).
        on_step: called with a description after each step (`steps(rounds)` in all).
    Returns:
        per side: settings, probes, tok_s (median), seconds (median), tokens, outputs (the first
        round's), repeatable (the same outputs every round); and ratio (minimoe / transformers) and
        identical (the fraction of requests with the same tokens on both sides).
    """
    settings = settings or settings_to_try()
    step = on_step or (lambda _: None)
    result: dict = {"settings": {}, "probes": {}}
    for side in SIDES:
        best, probes = choose_setting(side, base, settings, module=WORKER, key="tok_s")
        result["settings"][side] = {"omp_wait_policy": best[0], "threads": best[1]}
        result["probes"][side] = probes
        step(f"{side}: {best[0]}/{best[1]} chosen")
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for r in range(rounds):
        for side in SIDES:
            s = result["settings"][side]
            runs[side].append(
                run_worker(["measure", side, *base], s["omp_wait_policy"], s["threads"], module=WORKER)
            )
            step(f"{side}: round {r + 1} of {rounds}, {runs[side][-1]['tok_s']:.1f} tok/s")
    for side in SIDES:
        first = runs[side][0]
        result[side] = {
            "tok_s": statistics.median(x["tok_s"] for x in runs[side]),
            "seconds": statistics.median(x["seconds"] for x in runs[side]),
            "tokens": first["tokens"],
            "outputs": first["outputs"],
            "repeatable": all(x["outputs"] == first["outputs"] for x in runs[side]),
        }
    result["ratio"] = result["minimoe"]["tok_s"] / result["hf"]["tok_s"]
    result["identical"] = identical_fraction(result["minimoe"]["outputs"], result["hf"]["outputs"])
    return result


def _worker(argv: list[str]) -> dict:
    p = argparse.ArgumentParser(prog=f"python -m {WORKER}")
    p.add_argument("task", choices=["probe", "measure"])
    p.add_argument("side", choices=SIDES)
    p.add_argument("--run", required=True, help="minimoe run directory")
    p.add_argument("--hf", required=True, help="its Hugging Face export")
    p.add_argument("--mix", required=True, help="JSON: prompts, warm, max_new_tokens, probe_new_tokens")
    p.add_argument("--hf-attn", default="sdpa", help="transformers' attention implementation")
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--compile", action="store_true", help="minimoe: the compiled fixed-shape step")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    mix = json.loads(Path(args.mix).read_text(encoding="utf-8"))
    new = mix["probe_new_tokens" if args.task == "probe" else "max_new_tokens"]
    if args.side == "minimoe":
        outputs, seconds = run_minimoe(args.run, mix["warm"], mix["prompts"], new, args.compile)
    else:
        outputs, seconds = run_hf(args.hf, mix["warm"], mix["prompts"], new, args.hf_attn)
    tokens = sum(len(o) for o in outputs)
    out = {"tok_s": tokens / seconds, "seconds": seconds, "tokens": tokens, "threads": torch.get_num_threads(),
           "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset")}  # fmt: skip
    if args.task == "measure":
        out["outputs"] = outputs
    return out


if __name__ == "__main__":
    print(json.dumps(_worker(sys.argv[1:])))
