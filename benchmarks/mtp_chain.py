"""Two chained MTP drafts per verify step, prototyped here (greedy, one row, eager) against plain greedy decoding
and the library's one-draft self-speculation (`minimoe.infer.speculative`), on a trained `tiny` model.

One draft commits at most two tokens per verify forward, which caps what speculation gives (BENCHMARKS.md,
"What one speculative step costs"). Here the first MTP module drafts twice: once over the committed positions
as the library does (its output at the last one, j, drafts the token after next), then again one position on,
at j + 1 of its own cache, fed its own output at j in place of the main model's hidden state there and the
first draft's embedding; that second entry is provisional, like a rejected draft's entry in the main cache,
and the next step overwrites it (the next token's position is always committed). The main model verifies
[next token, draft 1, draft 2] in one forward and keeps the longest agreeing prefix plus one token, so the
tokens are plain greedy decoding's (checked). Tokens/s are over all prompts of a round;
ratios are per round against plain greedy in the same round (median and range); the three take turns
prompt by prompt.

    python benchmarks/mtp_chain.py [--quick] [--run-dir RUN] [--threads 1] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch
from decode import prompts_for, trained_model
from tqdm.auto import tqdm

from minimoe.infer.common import GenerationStats
from minimoe.infer.generate import generate_tokens
from minimoe.infer.speculative import make_mtp_cache


def _mtp(model, cache, hidden, next_ids: list[int], start: int) -> tuple[torch.Tensor, int]:
    """MTP module 0 at positions start, start + 1, ... of its one-row cache (writing their entries), fed
    hidden (1, T, D) (already what the module takes: the main model's state after its final norm, or the
    module's own output) and the tokens after those positions: its output at the last position (1, 1, D)
    and the greedy draft from it."""
    T = hidden.shape[1]
    cos, sin = model.rope_cos[start : start + T], model.rope_sin[start : start + T]
    emb = model.embed_tokens(torch.tensor([next_ids], device=hidden.device))
    keep = torch.full((1, 1), T - 1, dtype=torch.long, device=hidden.device)
    h, h_normed, _ = model.mtp[0](hidden, emb, cos, sin, cache.layers[0], start, keep=keep)
    return h, int(model.lm_head(h_normed[:, 0]).argmax(-1))


@torch.no_grad()
def chained_greedy(model, prompt: list[int], budget: int, accepted: list[int] | None = None) -> list[int]:
    """Greedy decoding of `budget` tokens (one fewer than plain decoding where the context ends: the
    verify feeds a draft past the last token) with two chained drafts per verify step. `accepted`, if
    given, gets how many drafts each verify kept (0, 1 or 2)."""
    max_len = model.cfg.max_position_embeddings
    budget = min(budget, max_len - len(prompt) - 1)
    if budget <= 0:
        return []
    cache, mtp_cache = model.make_cache(1, max_len), make_mtp_cache(model, 1, max_len)
    out = model(torch.tensor([prompt], device=model.embed_tokens.weight.device), cache=cache)
    last = int(out.logits[0, -1].argmax())
    tokens = [last]
    # the MTP entries of every prompt position, as the library's prefill writes them
    h1, draft = _mtp(model, mtp_cache, model.norm(out.hidden), prompt[1:] + [last], 0)
    # both caches' entries below cache.pos are final: the committed tokens, `last` not yet among them
    while len(tokens) < budget:
        n = cache.pos
        _, draft2 = _mtp(model, mtp_cache, h1, [draft], n)  # provisional: `last`'s position, one on from h1's
        out = model(torch.tensor([[last, draft, draft2]], device=h1.device), cache=cache)
        best = out.logits[0].argmax(-1).tolist()
        a = 0 if best[0] != draft else 1 if best[1] != draft2 else 2
        if accepted is not None:
            accepted.append(a)
        cache.pos = n + 1 + a  # the rejected drafts' entries are overwritten later
        new = best[: a + 1]
        tokens += new
        last = new[-1]
        if len(tokens) >= budget:
            break
        h1, draft = _mtp(model, mtp_cache, model.norm(out.hidden[:, : a + 1]), new, n)
    return tokens[:budget]


def section(model, tok, trained_on: str, heldout: str, quick: bool, rounds: int) -> str:
    prompts = prompts_for(tok, heldout, 6 if quick else 24, 48)
    new = 32 if quick else 128
    one_stats = GenerationStats()  # the library's draft counts, over every prompt and round

    def plain(p):
        return list(generate_tokens(model, p, new, temperature=0.0))

    def one(p):
        return list(generate_tokens(model, p, new, temperature=0.0, speculative=True, stats=one_stats))

    kept: list[int] = []

    def two(p):
        return chained_greedy(model, p, new, kept)

    methods = {
        "plain greedy": plain,
        "one MTP draft (library)": one,
        "two chained MTP drafts (prototype)": two,
    }
    names = list(methods)
    rates: dict[str, list[float]] = {m: [] for m in names}
    same = {m: True for m in names}
    bar = tqdm(total=rounds * len(prompts), desc="decoding", unit="prompt", file=sys.stderr, leave=False)
    for r in range(rounds):
        seconds, count = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0)
        for i, prompt in enumerate(prompts):  # prompt by prompt, in turns: the host's drift hits all three
            outs = {}
            for name in names[(i + r) % 3 :] + names[: (i + r) % 3]:
                t0 = time.perf_counter()
                outs[name] = methods[name](prompt)
                seconds[name] += time.perf_counter() - t0
                count[name] += len(outs[name])
            for name in names:
                same[name] &= outs[name] == outs["plain greedy"]
            bar.update()
        for name in names:
            rates[name].append(count[name] / seconds[name])
    bar.close()
    per_verify = {
        "plain greedy": "1",
        "one MTP draft (library)": f"{1 + one_stats.accepted / one_stats.drafted:.2f}",
        "two chained MTP drafts (prototype)": f"{1 + sum(kept) / len(kept):.2f}",
    }
    lines = [
        f"{trained_on}; {len(prompts)} held-out prompts of 48 tokens, {new} greedy tokens each, {rounds} rounds, "
        f"{torch.get_num_threads()} thread(s). Second drafts kept where the first was: "
        f"{sum(a == 2 for a in kept)} of {sum(a >= 1 for a in kept)}.",
        "",
        "| decoding | tok/s (median of rounds) | against plain greedy, per round: median (range) | "
        "tokens per verify forward | same tokens as plain greedy |",
        "|---|---:|---:|---:|---|",
    ]
    for name in methods:
        ratios = [r / p for r, p in zip(rates[name], rates["plain greedy"])]
        lines.append(
            f"| {name} | {statistics.median(rates[name]):,.0f} | {statistics.median(ratios):.2f}x "
            f"({min(ratios):.2f}-{max(ratios):.2f}) | {per_verify[name]} | {'yes' if same[name] else 'NO'} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer prompts and tokens; a 60-step model")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds of the three decodings")
    p.add_argument("--run-dir", default=None, help="a trained run with model.mtp_depth >= 1")
    p.add_argument("--work-dir", default="runs/bench-decode", help="where the trained model is kept")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model, tok, trained_on, heldout = trained_model(args)
    if not len(model.mtp):
        sys.exit(f"{sys.argv[0]}: {args.run_dir} has no MTP module (train it with model.mtp_depth=1)")
    print(section(model.eval(), tok, trained_on, heldout, args.quick, args.rounds))


if __name__ == "__main__":
    main()
