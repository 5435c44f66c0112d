"""Autoregressive generation with the KV cache (MLA models decode from the latent cache, absorbed).

Layers, bottom up:
- `stream_batch`: token ids in, one list of new tokens per step out (a Python iterator). Prompts of
  different lengths are left-padded; the attention mask hides the padding and gives each row its own
  RoPE positions, so every row generates what it would alone. Rows that finish are dropped from the
  batch (and the cache) so they cost nothing afterwards.
- `generate_tokens`: one prompt, streaming; greedy, sampling, or MTP self-speculative decoding.
- `TextStream`: incremental detokenising with stop strings, holding back text that may begin one.
- `complete`: text prompts in, `Completion`s out, in batches, with beam search, stop strings,
  speculative decoding and a per-piece callback for streaming.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from minimoe.errors import MinimoeError
from minimoe.infer.sampling import SamplingParams, pick_tokens


@dataclass
class GenerationStats:
    """What a generation cost. Fill one by passing it as `stats=`; several calls accumulate."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    forward_calls: int = 0
    cache_bytes_allocated: int = 0  # largest cache allocated (all layers, padding included)
    cache_bytes_used: int = 0  # largest part of it holding tokens
    drafted: int = 0  # speculative: tokens proposed by the MTP head
    accepted: int = 0  # ... and accepted by the main model

    @property
    def seconds(self) -> float:
        return self.prefill_s + self.decode_s

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of wall time, prefill included."""
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted / self.drafted if self.drafted else None

    def note_cache(self, cache) -> None:
        """Record the cache's allocated bytes and the bytes holding its `pos` tokens."""
        allocated = cache.nbytes()
        capacity = cache.layers[0].a.shape[1] if cache.layers else 1
        self.cache_bytes_allocated = max(self.cache_bytes_allocated, allocated)
        self.cache_bytes_used = max(self.cache_bytes_used, allocated * cache.pos // max(capacity, 1))


# Below this many FLOPs per decode step, CPU decoding runs on one intra-op thread. A decoded token is
# ~100 tiny kernels per layer; with two threads every parallel kernel first wakes the sleeping worker,
# which cost 10-25 us per kernel here (bmm / softmax of one token: 2-5 us on one thread, 13-27 us on
# two; 2-core AMD EPYC, OMP_WAIT_POLICY=PASSIVE), far more than a second core saves on matrix-vector
# products that are bound by memory bandwidth anyway (8.9 GiB/s on one thread, 9.2 on two). About
# 20 ms of single-core work: past it, the extra cores pay for their wake-ups.
SINGLE_THREAD_DECODE_FLOPS = 1e9


def _decode_flops(model, batch: int) -> float:
    """2 x activated matrix entries x rows: the FLOPs of one decode step (routed experts at top-k/E).

    The same count as `minimoe.lab.flops.matmul_params`, taken from the live parameters in well under
    a millisecond instead of building a meta-device model (~140 ms) on every generate call."""
    cfg = model.cfg
    share = cfg.num_experts_per_tok / cfg.n_routed_experts if cfg.n_routed_experts else 1.0
    n = 0
    # remove_duplicate=False: a tied LM head is listed under its own name too, and it is a matmul
    for name, p in model.named_parameters(remove_duplicate=False):
        if name.startswith("mtp.") or "embed_tokens" in name:  # MTP heads do not run; lookups are free
            continue
        if p.dim() == 3:  # stacked routed experts
            n += p.numel() * share
        elif p.dim() == 2:
            n += p.numel()
    return 2.0 * n * batch


@contextlib.contextmanager
def decode_threads(model, batch: int) -> Iterator[None]:
    """One intra-op thread while a small CPU model decodes a small batch; the old count comes back after."""
    saved = torch.get_num_threads()
    small = _decode_flops(model, batch) < SINGLE_THREAD_DECODE_FLOPS
    if model.embed_tokens.weight.device.type != "cpu" or saved == 1 or not small:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(saved)


def _check_max_new_tokens(n: int) -> None:
    if n < 0:
        raise MinimoeError(f"max_new_tokens must be >= 0, got {n}")


def _fit_prompt(ids: Sequence[int], max_len: int) -> list[int]:
    """Keep the last max_len - 1 tokens (room for at least one new token); an empty prompt becomes [0]."""
    return list(ids)[-(max_len - 1) :] or [0]


def _generators(n: int, seed: int | None, device) -> list[torch.Generator]:
    """One generator per row, all seeded with `seed` (a random seed each when None)."""
    gens = []
    for _ in range(n):
        g = torch.Generator(device=device)
        g.manual_seed(seed if seed is not None else torch.seed())
        gens.append(g)
    return gens


def _left_pad(prompts: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(B, L) ids left-padded with 0 and the (B, L) mask (None when no row needs padding)."""
    L = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), L, dtype=torch.long)
    mask = torch.zeros(len(prompts), L, dtype=torch.bool)
    for i, p in enumerate(prompts):
        ids[i, L - len(p) :] = torch.tensor(p)
        mask[i, L - len(p) :] = True
    if bool(mask.all()):
        return ids.to(device), None
    return ids.to(device), mask.to(device)


def _seen_mask(prompts: list[list[int]], vocab: int, device) -> torch.Tensor:
    """(B, V) bool: which tokens each prompt contains (for the repetition penalty)."""
    seen = torch.zeros(len(prompts), vocab, dtype=torch.bool)
    for i, p in enumerate(prompts):
        seen[i, torch.tensor(p, dtype=torch.long)] = True
    return seen.to(device)


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
        prompts: token id lists, any lengths (each is cut to its last max_seq_len - 1 tokens).
        max_new_tokens: at most this many new tokens per prompt; the batch also stops when the
            longest prompt reaches max_seq_len.
        params: sampling knobs (default SamplingParams()).
        seed: seeds every row's generator, so a row samples exactly what it would alone.
        stop_ids: tokens that end a row (not yielded).
        stats: filled in place when given.
        cancelled: a set the caller may add row indices to while iterating (e.g. a stop string was
            seen); those rows are dropped before the next step.
    Yields:
        a list of length len(prompts) per step: the new token of each row, None for finished rows.
    """
    _check_max_new_tokens(max_new_tokens)
    params = (params or SamplingParams()).validate()
    if not prompts:
        return
    device = model.embed_tokens.weight.device
    max_len = model.cfg.max_seq_len
    rows = [_fit_prompt(p, max_len) for p in prompts]
    B, L = len(rows), max(len(p) for p in rows)
    budget = min(max_new_tokens, max_len - L)
    if budget <= 0:
        return
    stop = set(stop_ids)
    cancelled = cancelled if cancelled is not None else set()
    t0 = time.perf_counter()
    ids, mask = _left_pad(rows, device)
    cache = model.make_cache(B, L + budget)
    seen = _seen_mask(rows, model.cfg.vocab_size, device) if params.repetition_penalty != 1.0 else None
    gens = None if params.greedy else _generators(B, seed, device)
    logits = model(ids, cache=cache, num_logits_to_keep=1, attention_mask=mask).logits[:, -1]  # (B, V)
    active = list(range(B))  # batch row -> prompt index
    if stats is not None:
        stats.prompt_tokens += sum(len(p) for p in rows)
        stats.forward_calls += 1
        stats.prefill_s += time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        with decode_threads(model, B):  # per-token kernels are too small for a thread pool
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
                logits = model(nxt.view(-1, 1), cache=cache, num_logits_to_keep=1, attention_mask=mask).logits
                logits = logits[:, -1]
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
        prompt_ids: the prompt (cut to its last max_seq_len - 1 tokens; empty means [0]).
        max_new_tokens: upper bound on yielded tokens (also bounded by max_seq_len).
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
    _check_max_new_tokens(max_new_tokens)
    if speculative:
        from minimoe.infer.speculative import speculative_tokens

        yield from speculative_tokens(model, prompt_ids, max_new_tokens, params, seed, stop_ids, stats)
        return
    for step in stream_batch(model, [prompt_ids], max_new_tokens, params, seed, stop_ids, stats):
        yield step[0]


# ------------------------------------------------------------------------------------- text level


class TextStream:
    """Turns one sequence's tokens into text pieces as they arrive, honouring stop strings.

    `push(token)` returns the text that is now safe to show: an incomplete UTF-8 character and any
    tail that could be the start of a stop string are held back. Once a stop string appears, the text
    is cut just before it and `stopped` turns True.
    """

    def __init__(self, tokenizer, stop: Sequence[str] = ()):
        self.tokenizer = tokenizer
        self.stop = [s for s in stop if s]
        self.ids: list[int] = []
        self.text = ""
        self.emitted = 0  # characters of self.text already returned
        self.stopped = False

    def push(self, token: int) -> str:
        if self.stopped:
            return ""
        self.ids.append(token)
        text = self.tokenizer.decode(self.ids)
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = text[: min(hits)], True
            return self._emit(len(self.text))
        self.text = text
        safe = len(text.rstrip("\ufffd"))  # wait for the rest of a multi-byte character
        hold = 0  # longest tail that may still grow into a stop string
        for s in self.stop:
            for k in range(min(len(s) - 1, safe), hold, -1):
                if text[safe - k : safe] == s[:k]:
                    hold = k
                    break
        return self._emit(safe - hold)

    def finish(self) -> str:
        """Whatever is still held back (call once the sequence has ended)."""
        return self._emit(len(self.text))

    def _emit(self, upto: int) -> str:
        piece = self.text[self.emitted : upto] if upto > self.emitted else ""
        self.emitted = max(self.emitted, upto)
        return piece


def stream_text(model, tokenizer, prompt: str, stop: Sequence[str] = (), **kw) -> Iterator[str]:
    """Yield the continuation of `prompt` in text pieces as it is generated.

    Args:
        stop: strings that end generation (the text is cut before them).
        **kw: generate_tokens arguments (stop_ids defaults to the tokenizer's EOS).
    """
    ids = tokenizer.encode(prompt) if prompt else [tokenizer.eos_id]
    kw.setdefault("stop_ids", (tokenizer.eos_id,))
    ts = TextStream(tokenizer, stop)
    for t in generate_tokens(model, ids, **kw):
        piece = ts.push(t)
        if piece:
            yield piece
        if ts.stopped:
            return
    tail = ts.finish()
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
    _check_max_new_tokens(max_new_tokens)
    params = SamplingParams(temperature, top_k, top_p, repetition_penalty).validate()
    if batch_size < 1:
        raise MinimoeError(f"batch_size must be >= 1, got {batch_size}")
    if num_beams < 1:
        raise MinimoeError(f"num_beams must be >= 1, got {num_beams}")
    if speculative and num_beams > 1:
        raise MinimoeError("speculative decoding and beam search cannot be combined")
    stop_ids = tuple(stop_ids) if stop_ids is not None else (tokenizer.eos_id,)
    encoded = [tokenizer.encode(p) if p else [tokenizer.eos_id] for p in prompts]
    results = [Completion(prompt=p) for p in prompts]
    emit = on_text or (lambda i, piece: None)

    if num_beams > 1:
        from minimoe.infer.beam import beam_search

        for i, ids in enumerate(encoded):
            best = beam_search(
                model, ids, num_beams, max_new_tokens, length_penalty, stop_ids, repetition_penalty, stats
            )[0]
            ts = TextStream(tokenizer, stop)
            for t in best.tokens:
                ts.push(t)
                if ts.stopped:
                    break
            ts.finish()
            res = results[i]
            res.token_ids, res.text, res.score = list(ts.ids), ts.text, best.score
            res.finish_reason = "stop" if best.finished or ts.stopped else "length"
            emit(i, res.text)
        return results

    order = sorted(range(len(prompts)), key=lambda i: len(encoded[i]))
    size = 1 if speculative else batch_size
    for b in range(0, len(order), size):
        group = order[b : b + size]
        max_len = model.cfg.max_seq_len
        budget = min(max_new_tokens, max_len - max(len(_fit_prompt(encoded[i], max_len)) for i in group))
        streams = {i: TextStream(tokenizer, stop) for i in group}
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
            tail = ts.finish()
            if tail:
                emit(i, tail)
            res.token_ids, res.text = list(ts.ids), ts.text
            res.finish_reason = "stop" if ts.stopped or len(ts.ids) < budget else "length"
    return results
