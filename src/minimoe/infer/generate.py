"""Autoregressive generation with the KV cache (MLA models decode from the latent cache, absorbed).

Layers, bottom up:
- `stream_batch`: token ids in, one list of new tokens per step out (a Python iterator). Prompts of
  different lengths are left-padded; the attention mask hides the padding and gives each row its own
  RoPE positions, so every row generates what it would alone. Rows that finish are dropped from the
  batch (and the cache) so they cost nothing afterwards.
- `generate_tokens`: one prompt, streaming; greedy, sampling, or MTP self-speculative decoding.
- `stream_text` / `generate_text`: text in, text out, through `minimoe.infer.text.TextStream`
  (incremental detokenising with stop strings).
- `complete`: text prompts in, `Completion`s out, in batches, with beam search, stop strings,
  speculative decoding and a per-piece callback for streaming.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from minimoe.errors import MinimoeError
from minimoe.infer.beam import beam_search
from minimoe.infer.common import (
    GenerationStats,
    check_max_new_tokens,
    decode_threads,
    fit_prompt,
    left_pad,
    make_generators,
    seen_mask,
)
from minimoe.infer.sampling import SamplingParams, pick_tokens
from minimoe.infer.speculative import speculative_tokens
from minimoe.infer.text import TextStream

__all__ = [
    "Completion",
    "GenerationStats",
    "complete",
    "generate_text",
    "generate_tokens",
    "stream_batch",
    "stream_text",
]


@torch.no_grad()
def stream_batch(
    model,
    prompts: Sequence[Sequence[int]],
    max_new_tokens: int = 100,
    params: SamplingParams | None = None,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    stats: GenerationStats | None = None,
    cancelled: set[int] | None = None,
) -> Iterator[list[int | None]]:
    """Generate for several prompts at once, one step per iteration.

    Args:
        model: a Transformer in eval mode.
        prompts: token id lists, any lengths (each is cut to its last max_position_embeddings - 1 tokens).
        max_new_tokens: at most this many new tokens per prompt; the batch also stops when the
            longest prompt reaches max_position_embeddings.
        params: sampling knobs (default SamplingParams()).
        seed: seeds every row's generator, so a row samples exactly what it would alone.
        stop_ids: tokens that end a row (not yielded).
        stats: filled in place when given.
        cancelled: a set the caller may add row indices to while iterating (e.g. a stop string was
            seen); those rows are dropped before the next step.
    Yields:
        a list of length len(prompts) per step: the new token of each row, None for finished rows.
    """
    check_max_new_tokens(max_new_tokens)
    params = (params or SamplingParams()).validate()
    if not prompts:
        return
    device = model.embed_tokens.weight.device
    max_len = model.cfg.max_position_embeddings
    rows = [fit_prompt(p, max_len) for p in prompts]
    B, L = len(rows), max(len(p) for p in rows)
    budget = min(max_new_tokens, max_len - L)
    if budget <= 0:
        return
    stop = set(stop_ids)
    cancelled = cancelled if cancelled is not None else set()
    t0 = time.perf_counter()
    ids, mask = left_pad(rows, device)
    cache = model.make_cache(B, L + budget)
    seen = seen_mask(rows, model.cfg.vocab_size, device) if params.repetition_penalty != 1.0 else None
    gens = None if params.greedy else make_generators(B, seed, device)
    logits = model(ids, cache=cache, num_logits_to_keep=1, attention_mask=mask).logits[:, -1]  # (B, V)
    active = list(range(B))  # batch row -> prompt index
    if stats is not None:
        stats.prompt_tokens += sum(len(p) for p in rows)
        stats.forward_calls += 1
        stats.prefill_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        for step in range(budget):
            nxt = pick_tokens(logits, params, seen, gens)  # (B_active,)
            toks = nxt.tolist()  # host sync per step: the caller streams the tokens
            out: list[int | None] = [None] * B
            keep = []
            for r, (i, t) in enumerate(zip(active, toks)):
                if t in stop:
                    continue
                out[i] = t
                keep.append(r)
            if stats is not None:
                stats.new_tokens += len(keep)
            if keep:
                yield out
            keep = [r for r in keep if active[r] not in cancelled]
            if not keep or step == budget - 1:
                break
            if len(keep) < len(active):  # drop finished rows from everything batched
                index = torch.tensor(keep, device=device)
                cache.reorder(index)
                nxt = nxt.index_select(0, index)
                mask = mask.index_select(0, index) if mask is not None else None
                seen = seen.index_select(0, index) if seen is not None else None
                gens = [gens[r] for r in keep] if gens is not None else None
                active = [active[r] for r in keep]
            if seen is not None:
                seen[torch.arange(len(active), device=device), nxt] = True
            if mask is not None:
                mask = torch.cat([mask, mask.new_ones(len(active), 1)], dim=1)  # (B, S + 1)
            # the thread choice covers the forward only: the caller's code between steps runs unchanged
            with decode_threads(model, len(active)):
                step_out = model(nxt.view(-1, 1), cache=cache, num_logits_to_keep=1, attention_mask=mask)
            logits = step_out.logits[:, -1]
            if stats is not None:
                stats.forward_calls += 1
                stats.note_cache(cache)
    finally:
        if stats is not None:
            stats.note_cache(cache)
            stats.decode_s += time.perf_counter() - t0


def generate_tokens(
    model,
    prompt_ids: Sequence[int],
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    stop_ids: Sequence[int] = (),
    *,
    repetition_penalty: float = 1.0,
    speculative: bool = False,
    stats: GenerationStats | None = None,
) -> Iterator[int]:
    """Yield new token ids one at a time for a single prompt (streaming).

    Args:
        model: a Transformer in eval mode.
        prompt_ids: the prompt (cut to its last max_position_embeddings - 1 tokens; empty means [0]).
        max_new_tokens: upper bound on yielded tokens (also bounded by max_position_embeddings).
        temperature, top_k, top_p, repetition_penalty: see SamplingParams (temperature 0 = greedy).
        seed: random seed for sampling.
        stop_ids: tokens that end generation (not yielded).
        speculative: draft with the model's first MTP module and verify with the main model
            (greedy output is identical to plain greedy decoding).
        stats: filled in place when given.
    Yields:
        token ids.
    """
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty).validate()
    check_max_new_tokens(max_new_tokens)
    if speculative:
        yield from speculative_tokens(model, prompt_ids, max_new_tokens, params, seed, stop_ids, stats)
        return
    for step in stream_batch(model, [prompt_ids], max_new_tokens, params, seed, stop_ids, stats):
        yield step[0]


# ------------------------------------------------------------------------------------- text level


def stream_text(model, tokenizer, prompt: str, stop: Sequence[str] = (), **kw) -> Iterator[str]:
    """Yield the continuation of `prompt` in text pieces as it is generated.

    Args:
        stop: strings that end generation (the text is cut before them).
        **kw: generate_tokens arguments (stop_ids defaults to the tokenizer's EOS).
    """
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    kw.setdefault("stop_ids", (tokenizer.eos_id,))
    ts = TextStream(tokenizer.decode, stop, context=ids if prompt else ())  # continues the prompt
    for t in generate_tokens(model, ids, **kw):
        piece = ts.push(t)
        if piece:
            yield piece
        if ts.stopped:
            return
    tail = ts.flush()
    if tail:
        yield tail


def generate_text(model, tokenizer, prompt: str, **kw) -> str:
    """Generate a continuation of `prompt` and return it decoded (without the prompt)."""
    return "".join(stream_text(model, tokenizer, prompt, **kw))


@dataclass
class Completion:
    """One prompt's result."""

    prompt: str
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "length"  # "stop" (stop token or string) or "length"
    score: float | None = None  # beam search: length-normalised log-probability


def complete(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int = 100,
    temperature: float = 0.8,
    top_k: int = 0,
    top_p: float = 1.0,
    repetition_penalty: float = 1.0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    stop_ids: Sequence[int] | None = None,
    num_beams: int = 1,
    length_penalty: float = 1.0,
    speculative: bool = False,
    batch_size: int = 8,
    on_text: Callable[[int, str], None] | None = None,
    stats: GenerationStats | None = None,
) -> list[Completion]:
    """Complete text prompts: batched sampling/greedy, beam search or speculative decoding.

    Prompts are grouped into batches of similar length (less padding); results come back in the
    prompts' order. Beam search and speculative decoding run one prompt at a time.

    Args:
        prompts: the prompt texts ("" starts from the EOS token).
        stop: stop strings; stop_ids: stop tokens (default: the tokenizer's EOS).
        num_beams: > 1 for beam search (deterministic; sampling knobs other than the repetition
            penalty are ignored), with scores divided by length ** length_penalty.
        batch_size: prompts decoded together.
        on_text: called as on_text(prompt index, text piece) while text is produced (streaming).
        other arguments: see generate_tokens.
    Returns:
        one Completion per prompt.
    """
    check_max_new_tokens(max_new_tokens)
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty).validate()
    if batch_size < 1:
        raise MinimoeError(f"batch_size must be >= 1, got {batch_size}")
    if num_beams < 1:
        raise MinimoeError(f"num_beams must be >= 1, got {num_beams}")
    if speculative and num_beams > 1:
        raise MinimoeError("speculative decoding and beam search cannot be combined")
    stop_ids = tuple(stop_ids) if stop_ids is not None else (tokenizer.eos_id,)
    encoded = [tokenizer.encode(p) if p else [tokenizer.eos_id] for p in prompts]
    # each text continues its prompt's (a SentencePiece decoder gives the space between them from it)
    contexts = [ids if p else () for p, ids in zip(prompts, encoded)]
    results = [Completion(prompt=p) for p in prompts]
    emit = on_text or (lambda i, piece: None)

    if num_beams > 1:
        for i, ids in enumerate(encoded):
            best = beam_search(
                model, ids, num_beams, max_new_tokens, length_penalty, stop_ids, repetition_penalty, stats
            )[0]
            ts = TextStream(tokenizer.decode, stop, contexts[i])
            for t in best.tokens:
                ts.push(t)
                if ts.stopped:
                    break
            ts.flush()
            res = results[i]
            res.token_ids, res.text, res.score = list(ts.ids), ts.text, best.score
            res.finish_reason = "stop" if best.finished or ts.stopped else "length"
            emit(i, res.text)
        return results

    # batches of similar length whose prompts have the same budget: a batch stops when its longest prompt
    # fills the context, which must not cut a shorter prompt's tokens short
    max_len = model.cfg.max_position_embeddings
    own = [min(max_new_tokens, max_len - len(fit_prompt(ids, max_len))) for ids in encoded]
    groups: list[list[int]] = []
    for i in sorted(range(len(prompts)), key=lambda i: len(encoded[i])):
        if groups and len(groups[-1]) < (1 if speculative else batch_size) and own[groups[-1][0]] == own[i]:
            groups[-1].append(i)
        else:
            groups.append([i])
    for group in groups:
        budget = own[group[0]]
        streams = {i: TextStream(tokenizer.decode, stop, contexts[i]) for i in group}
        cancelled: set[int] = set()
        if speculative:
            steps = ([t] for t in generate_tokens(
                model, encoded[group[0]], max_new_tokens, temperature, top_k, top_p, seed, stop_ids,
                repetition_penalty=repetition_penalty, speculative=True, stats=stats,
            ))  # fmt: skip
        else:
            steps = stream_batch(
                model, [encoded[i] for i in group], max_new_tokens, params, seed, stop_ids, stats, cancelled
            )
        for step in steps:
            for r, t in enumerate(step):
                if t is None:
                    continue
                i = group[r]
                piece = streams[i].push(t)
                if piece:
                    emit(i, piece)
                if streams[i].stopped:
                    cancelled.add(r)
            if speculative and streams[group[0]].stopped:
                break
        for i in group:
            ts, res = streams[i], results[i]
            tail = ts.flush()
            if tail:
                emit(i, tail)
            res.token_ids, res.text = list(ts.ids), ts.text
            res.finish_reason = "stop" if ts.stopped or len(ts.ids) < budget else "length"
    return results
