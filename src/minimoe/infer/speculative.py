"""Self-speculative decoding with the model's own MTP module (DeepSeek-V3 report, section 2.2 / 5.4.3).

Each step the main model runs once over two tokens, [last committed token, draft], at positions
n and n+1 of its cache:
- the logits at n give the true next token; if it equals the draft, the draft is accepted and the
  logits at n+1 give one more token for free (2 tokens per forward); otherwise the draft's cache
  entry is rolled back (`cache.pos -= 1`) and only the true token is kept (1 token per forward).
- the first MTP module then consumes, for every newly committed cache position i, the main
  hidden state h_i and the embedding of token i+1 (exactly as in training), in its own cache, and its
  output at the last position drafts the token after the next one.
With greedy decoding the committed tokens are the main model's argmax at every position, so the
output is identical to plain greedy decoding. With sampling, a draft d ~ q (MTP distribution) is
accepted with probability min(1, p(d)/q(d)) and a rejection resamples from max(p - q, 0)
(Leviathan et al. 2023), which keeps the main model's distribution exactly.

Only the first MTP module drafts (one draft token per step, as DeepSeek-V3 deploys it). The MTP cache
only ever receives committed positions, so it never needs rolling back.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import torch

from minimoe.errors import MinimoeError
from minimoe.infer.common import GenerationStats, decode_threads, fit_prompt, make_generator
from minimoe.infer.sampling import SamplingParams, process_logits
from minimoe.model.transformer import KVCache


def make_mtp_cache(model, batch: int, max_len: int) -> KVCache:
    """A cache for the first MTP module's block: `batch` rows of `max_len` positions."""
    block = model.mtp[0].block
    w = model.embed_tokens.weight
    return KVCache([block.self_attn.make_cache(batch, max_len, w.dtype, w.device)])


def mtp_step(model, cache: KVCache, hidden: torch.Tensor, next_ids: torch.Tensor) -> torch.Tensor:
    """Run the first MTP module over new committed positions of a one-row cache; returns draft logits
    (1, V) for the token two after the last position.

    Args:
        cache: the MTP block's cache; the new positions start at cache.pos.
        hidden: (1, T, D) main-model hidden states (before the final norm, applied here) at those positions.
        next_ids: (1, T) the token following each position.
    """
    start, T = cache.pos, hidden.shape[1]
    cos, sin = model.rope_cos[start : start + T], model.rope_sin[start : start + T]
    emb = model.embed_tokens(next_ids)  # (1, T, D)
    last = torch.full((1, 1), T - 1, dtype=torch.long, device=hidden.device)  # the FFN runs there only
    _, h_normed, _ = model.mtp[0](model.norm(hidden), emb, cos, sin, cache.layers[0], start, keep=last)
    cache.pos += T
    return model.lm_head(h_normed[:, 0])  # (1, V)


def _seen_with(seen: torch.Tensor | None, token: int) -> torch.Tensor | None:
    if seen is None:
        return None
    seen = seen.clone()
    seen[0, token] = True
    return seen


def choose_token(logits, params, seen, gen) -> tuple[int, torch.Tensor | None]:
    """Pick a token from (1, V) logits; returns (token, probabilities or None when greedy)."""
    x = process_logits(logits, params, seen)
    if params.greedy:
        return int(x.argmax(-1).item()), None
    probs = x.softmax(-1)
    return int(torch.multinomial(probs[0], 1, generator=gen).item()), probs


def verify_draft(draft: int, q: torch.Tensor | None, logits0, params, seen, gen) -> tuple[bool, int]:
    """Accept or reject the draft against the main model's logits at its position.

    Returns:
        (accepted, token): the draft itself when accepted, else the corrected token.
    """
    x = process_logits(logits0, params, seen)
    if params.greedy:
        tok = int(x.argmax(-1).item())
        return tok == draft, tok
    p = x.softmax(-1)[0]  # (V,)
    ratio = (p[draft] / q[0, draft]).clamp(max=1.0)
    u = torch.rand((), generator=gen, device=p.device)
    if bool(u < ratio):
        return True, draft
    residual = (p - q[0]).clamp(min=0)
    if float(residual.sum()) <= 0:  # p == q up to rounding: any sample from p is right
        residual = p
    return False, int(torch.multinomial(residual / residual.sum(), 1, generator=gen).item())


def verify_rows(logits: torch.Tensor, best: torch.Tensor, rows) -> list[list[int]]:
    """A batch's verify step: each row's new tokens from the (n, 2, V) logits over [next token, draft]
    and their argmax `best` (n, 2): [draft, bonus] when its draft is accepted, else [the corrected
    token]. `rows` are the sequences (each with `sampling`, `draft`, `q` and `gen`); greedy rows read
    `best` (one host sync for all), sampled rows draw from their own generators, as one sequence does."""
    out: list[list[int]] = []
    for row, (tok, bonus), x in zip(rows, best.tolist(), logits):
        if row.sampling.greedy:
            out.append([tok, bonus] if tok == row.draft else [tok])
            continue
        ok, tok = verify_draft(row.draft, row.q, x[0:1], row.sampling, None, row.gen)
        out.append([tok, choose_token(x[1:2], row.sampling, None, row.gen)[0]] if ok else [tok])
    return out


def next_drafts(draft_logits: torch.Tensor, rows) -> None:
    """Set each row's next `draft` (and, sampling, the `q` it was drawn from) from the MTP module's
    (n, V) logits; greedy rows take their argmax together (one host sync)."""
    greedy = [i for i, r in enumerate(rows) if r.sampling.greedy]
    if greedy:
        index = torch.tensor(greedy, device=draft_logits.device)
        for i, tok in zip(greedy, draft_logits.index_select(0, index).argmax(-1).tolist()):
            rows[i].draft = tok
    for i, row in enumerate(rows):
        if not row.sampling.greedy:
            row.draft, row.q = choose_token(draft_logits[i : i + 1], row.sampling, None, row.gen)


@torch.no_grad()
def speculative_tokens(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int,
    params: SamplingParams,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield new tokens for one prompt, drafting with MTP module 0 and verifying with the main model.

    Args:
        model: a Transformer with mtp_depth >= 1, in eval mode.
        prompt_ids: the prompt (cut to its last max_position_embeddings - 1 tokens).
        max_new_tokens: at most this many tokens (also bounded by max_position_embeddings).
        params: sampling knobs; greedy gives exactly plain greedy decoding's tokens.
        seed: random seed (sampling only).
        stop_ids: tokens that end generation (not yielded).
        stats: filled in place (drafted / accepted counts give the acceptance rate).
    Yields:
        token ids.
    """
    if not len(model.mtp):
        raise MinimoeError("speculative decoding needs a model with MTP modules (model.mtp_depth >= 1)")
    params = params.validate()
    device = model.embed_tokens.weight.device
    max_len = model.cfg.max_position_embeddings
    ids = fit_prompt(prompt_ids, max_len)
    P = len(ids)
    budget = min(max_new_tokens, max_len - P)
    if budget <= 0:
        return
    stop = set(stop_ids)
    stats = stats if stats is not None else GenerationStats()
    gen = None if params.greedy else make_generator(seed, device)
    seen = None
    if params.repetition_penalty != 1.0:
        seen = torch.zeros(1, model.cfg.vocab_size, dtype=torch.bool, device=device)
        seen[0, torch.tensor(ids, device=device)] = True

    t0 = time.perf_counter()
    cache, mtp_cache = model.make_cache(1, P + budget), make_mtp_cache(model, 1, P + budget)
    prompt = torch.tensor([ids], device=device)
    # all positions' hidden states feed the MTP prefill; only the last one's logits are read
    out = model(prompt, cache=cache, num_logits_to_keep=1)
    last, _ = choose_token(out.logits[:, -1], params, seen, gen)
    seen = _seen_with(seen, last)
    stats.prompt_tokens += P
    stats.forward_calls += 1
    stats.prefill_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        if last in stop:
            return
        stats.new_tokens += 1
        yield last
        produced = 1
        next_ids = torch.tensor([ids[1:] + [last]], device=device)  # (1, P)
        draft_logits = mtp_step(model, mtp_cache, out.hidden, next_ids)
        while produced < budget:
            n = cache.pos  # cache holds every committed token except `last`
            use_draft = budget - produced >= 2
            draft, q = choose_token(draft_logits, params, seen, gen) if use_draft else (None, None)
            inp = [last, draft] if use_draft else [last]
            with decode_threads(model, len(inp)):  # a small step on one thread (never across a yield)
                out = model(torch.tensor([inp], device=device), cache=cache)
            stats.forward_calls += 1
            if use_draft:
                stats.drafted += 1
                accepted, tok = verify_draft(draft, q, out.logits[:, 0], params, seen, gen)
            else:
                accepted, tok = False, choose_token(out.logits[:, 0], params, seen, gen)[0]
            if accepted:
                stats.accepted += 1
                seen_after = _seen_with(seen, draft)
                bonus, _ = choose_token(out.logits[:, 1], params, seen_after, gen)
                new = [draft, bonus]
                seen = _seen_with(seen_after, bonus)
                hidden = out.hidden  # (1, 2, D) at positions n, n+1
            else:
                if use_draft:
                    cache.pos = n + 1  # roll back the rejected draft's cache entry
                new = [tok]
                seen = _seen_with(seen, tok)
                hidden = out.hidden[:, :1]  # (1, 1, D) at position n
            in_use = KVCache(cache.layers + mtp_cache.layers)  # both caches count as memory in use
            in_use.pos = cache.pos
            stats.note_cache(in_use)
            for t in new:
                if t in stop:
                    return
                stats.new_tokens += 1
                produced += 1
                yield t
            last = new[-1]
            if produced < budget:
                with decode_threads(model, len(new)):
                    draft_logits = mtp_step(model, mtp_cache, hidden, torch.tensor([new], device=device))
    finally:
        stats.decode_s += time.perf_counter() - t0
