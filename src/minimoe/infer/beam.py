"""Beam search over the KV cache: the beams are the batch rows, and `cache.reorder` follows the
surviving beams after each step.

Scores are summed log-probabilities divided by length ** length_penalty (as in HF; 0 = raw sum,
> 0 favours longer sequences). A hypothesis ends when it picks a stop token; the search ends when
`num_beams` hypotheses have ended (HF's early_stopping=True) or the token budget runs out, so one
beam is exactly greedy decoding.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minimoe.errors import MinimoeError
from minimoe.infer.common import GenerationStats, decode_threads, fit_prompt, seen_mask
from minimoe.infer.sampling import apply_repetition_penalty


@dataclass
class Hypothesis:
    tokens: list[int]  # generated tokens, without the stop token
    logprob: float  # summed log-probability of the generated tokens (stop token included)
    score: float  # logprob / length ** length_penalty
    finished: bool  # ended with a stop token (False: ran out of budget)


def _score(logprob: float, length: int, length_penalty: float) -> float:
    return logprob / max(length, 1) ** length_penalty


@torch.no_grad()
def beam_search(
    model,
    prompt_ids: Sequence[int],
    num_beams: int = 4,
    max_new_tokens: int = 100,
    length_penalty: float = 1.0,
    stop_ids: Sequence[int] = (),
    repetition_penalty: float = 1.0,
    stats: GenerationStats | None = None,
) -> list[Hypothesis]:
    """Beam search for one prompt.

    Args:
        model: a Transformer in eval mode.
        prompt_ids: the prompt (cut to its last max_position_embeddings - 1 tokens).
        num_beams: beams kept per step (1 = greedy).
        max_new_tokens: token budget per hypothesis.
        length_penalty: exponent of the length normalisation.
        stop_ids: tokens that end a hypothesis.
        repetition_penalty: CTRL penalty on tokens already in each beam's context (1 = off).
        stats: filled in place when given.
    Returns:
        up to num_beams hypotheses, best score first (at least one).
    """
    if num_beams < 1:
        raise MinimoeError(f"num_beams must be >= 1, got {num_beams}")
    if max_new_tokens < 0:
        raise MinimoeError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if repetition_penalty <= 0:
        raise MinimoeError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    device = model.embed_tokens.weight.device
    max_len, V = model.cfg.max_position_embeddings, model.cfg.vocab_size
    ids = fit_prompt(prompt_ids, max_len)
    budget = min(max_new_tokens, max_len - len(ids))
    if budget <= 0:
        return [Hypothesis([], 0.0, 0.0, False)]
    stop = set(stop_ids)
    n = num_beams
    t0 = time.perf_counter()
    cache = model.make_cache(1, len(ids) + budget)
    logits = model(torch.tensor([ids], device=device), cache=cache, num_logits_to_keep=1).logits[:, -1]
    # every beam starts as the prompt; only beam 0 may expand at the first step
    cache.reorder(torch.zeros(n, dtype=torch.long, device=device))
    logits = logits.expand(n, V)
    # log-probabilities accumulate in fp64, so scores are exact sums for any model dtype
    beam_lp = torch.full((n,), float("-inf"), dtype=torch.float64, device=device)
    beam_lp[0] = 0.0
    seqs: list[list[int]] = [[] for _ in range(n)]
    seen = seen_mask([ids] * n, V, device) if repetition_penalty != 1.0 else None
    done: list[Hypothesis] = []
    if stats is not None:
        stats.prompt_tokens += len(ids)
        stats.forward_calls += 1
        stats.prefill_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    for step in range(budget):
        x = logits.double()
        if seen is not None:
            x = apply_repetition_penalty(x, seen, repetition_penalty)
        cand = (beam_lp[:, None] + x.log_softmax(-1)).view(-1)  # (n * V,)
        # 2n candidates: even if n of them end in a stop token, n beams survive
        top_lp, top_idx = cand.topk(min(2 * n, cand.numel()))
        keep_beam, keep_tok, keep_lp = [], [], []
        for rank, (lp, idx) in enumerate(zip(top_lp.tolist(), top_idx.tolist())):  # host sync per step
            if lp == float("-inf"):
                break
            beam, tok = divmod(idx, V)
            if tok in stop:
                if rank < n:  # a stop candidate outside the top n would not have been a beam
                    done.append(Hypothesis(seqs[beam], lp, _score(lp, step + 1, length_penalty), True))
                continue
            keep_beam.append(beam)
            keep_tok.append(tok)
            keep_lp.append(lp)
            if len(keep_beam) == n:
                break
        if len(done) >= n or not keep_beam:
            break
        seqs = [seqs[b] + [t] for b, t in zip(keep_beam, keep_tok)]
        if stats is not None:
            stats.new_tokens += len(keep_tok)
        if step == budget - 1:
            beam_lp = torch.tensor(keep_lp, dtype=torch.float64, device=device)
            break
        index = torch.tensor(keep_beam, device=device)
        toks = torch.tensor(keep_tok, device=device)
        cache.reorder(index)
        if seen is not None:
            seen = seen.index_select(0, index)
            seen[torch.arange(len(keep_tok), device=device), toks] = True
        beam_lp = torch.tensor(keep_lp, dtype=torch.float64, device=device)
        with decode_threads(model, len(keep_tok)):  # a small step on one thread
            logits = model(toks.view(-1, 1), cache=cache, num_logits_to_keep=1).logits[:, -1]
        if stats is not None:
            stats.forward_calls += 1
            stats.note_cache(cache)
    if len(done) < n:  # budget exhausted: the live beams compete too
        for seq, lp in zip(seqs, beam_lp.tolist()):
            if lp != float("-inf") and seq:
                done.append(Hypothesis(seq, lp, _score(lp, len(seq), length_penalty), False))
    if stats is not None:
        stats.note_cache(cache)
        stats.decode_s += time.perf_counter() - t0
    done.sort(key=lambda h: h.score, reverse=True)
    return done[:n] or [Hypothesis([], 0.0, 0.0, False)]
