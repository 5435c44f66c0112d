"""A fixed pool of per-sequence cache slots, and one decode step that advances every sequence in it.

The pool is one KVCache of `slots` rows x `max_len` positions (the MLA latent, or GQA keys and
values), allocated once, so its memory is known at start-up. Sequences being decoded occupy rows
[0, n): when one leaves, the last row moves into its place, so the batch is always a prefix of the
pool and attention reads a slice of it, never a gathered copy. Rows have their own lengths: the new
token of row i is written at position lengths[i], rotated by RoPE at that position, and attends to
positions <= lengths[i] only, so every row computes what it would alone.

Prompts are prefilled in a separate cache of a few rows, several prompts per forward and a chunk of
each per step (`Prefill`), then copied into the next free row (`SlotPool.add`), where they join the
decode batch.

For self-speculative decoding, `forward` feeds several tokens per row (the last one and a draft)
without committing them, `draft` runs the MTP module over the same positions in its own pooled
cache, and `advance` commits each row's accepted count: a rejected entry lies past the row's length,
masked, until the next step overwrites it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from minimoe.infer.sampling import token_logprobs
from minimoe.infer.speculative import make_mtp_cache
from minimoe.model.attention import LayerCache
from minimoe.model.transformer import KVCache


class _Rows:
    """A LayerCache stand-in for the attention modules during a pooled step: it writes the T new
    entries of row rows[i] at positions pos[i, :] and hands back those rows up to position S (rows
    [0, n) as a view; other rows, with `gather`, as a copy)."""

    def __init__(
        self, layer: LayerCache, rows: torch.Tensor, pos: torch.Tensor, n: int, S: int, gather: bool = False
    ) -> None:
        self.layer, self.rows, self.pos, self.n, self.S, self.gather = layer, rows, pos, n, S, gather

    def _read(self, t: torch.Tensor) -> torch.Tensor:
        """Rows' first S positions (a gather copies those only, not the whole context)."""
        return t[:, : self.S].index_select(0, self.rows[:, 0]) if self.gather else t[: self.n, : self.S]

    @property
    def buf(self) -> torch.Tensor | None:
        """MLA's joint [latent | rope key] of the rows (read after `update`)."""
        L = self.layer
        if L.buf is None:
            return None
        return self._read(L.buf)

    def update(self, a: torch.Tensor, b: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b: (n, T, ...) T new entries per row."""
        L = self.layer
        if L.buf is not None:
            # one write into the joint buffer, not one into each of its two views: compiled, a write
            # into a view of a buffer that another view also writes became a copy of the whole cache
            L.buf[self.rows, self.pos] = torch.cat([a.to(L.buf.dtype), b.to(L.buf.dtype)], dim=-1)
        else:
            L.a[self.rows, self.pos] = a.to(L.a.dtype)  # rows (n, 1), pos (n, T)
            L.b[self.rows, self.pos] = b.to(L.b.dtype)
        return self._read(L.a), self._read(L.b)


@dataclass
class _Step:
    """What one pooled step over T new tokens per row (n rows) needs, for every layer."""

    pos: torch.Tensor  # (n, T) positions of the new entries
    cos: torch.Tensor  # (n, T, d/2) RoPE at those positions
    sin: torch.Tensor
    mask: torch.Tensor | None  # (n, 1, T, S): query t of row i sees positions <= lengths[i] + t; None: causal
    rows: torch.Tensor  # (n, 1) row indices
    S: int  # positions attended: the longest row's length + T
    gather: bool = False  # rows are not [0, n)

    @property
    def start(self) -> int:
        return self.S - self.pos.shape[1]

    def cache(self, layer: LayerCache) -> _Rows:
        return _Rows(layer, self.rows, self.pos, self.rows.shape[0], self.S, self.gather)

    def blocks(self, model, tokens: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """The main layers over (n, T) tokens at these positions, writing `cache`; the hidden states
        before the final norm (n, T, D). With start = S - T > 0 MLA takes the absorbed path, as in any
        cached decode step."""
        x = model.embed_tokens(tokens)
        for block, layer in zip(model.layers, cache.layers):
            x, _ = block(x, self.cos, self.sin, self.cache(layer), self.start, self.mask)
        return x

    def mtp(
        self, model, hidden: torch.Tensor, next_ids: torch.Tensor, cache: KVCache, take: torch.Tensor
    ) -> torch.Tensor:
        """MTP module 0 at these positions, writing `cache`, as in training: position j combines the
        main hidden state h_j (n, T, D, before the final norm, which is applied here: model/mtp.py)
        with the embedding of token j + 1 (`next_ids`, (n, T)). Every
        position writes its cache entry; the block's FFN runs at one position per row, take (n,): its
        normed output (n, D)."""
        emb = model.embed_tokens(next_ids)
        cache_rows = self.cache(cache.layers[0])
        _, h_normed, _ = model.mtp[0](
            model.norm(hidden), emb, self.cos, self.sin, cache_rows, self.start, self.mask, keep=take[:, None]
        )
        return h_normed[:, 0]


def _step_at(
    model, lengths: Sequence[int], T: int, device, limit: int, rows: Sequence[int] | None = None
) -> _Step:
    """Where T new tokens per row go: row i's at positions lengths[i] + t (rows [0, n) by default), in
    a cache of `limit` positions. Positions past the last one are clamped to it: only padding entries
    reach them (a real token always has a position), and no real query attends to them."""
    last = limit - 1
    pos = torch.tensor(lengths, device=device)[:, None] + torch.arange(T, device=device)  # (n, T)
    pos = pos.clamp(max=last)
    S = min(max(lengths) + T, last + 1)
    # every row from position 0 (a prompt's first chunk): the mask is the causal one, and attention
    # without a mask takes SDPA's causal path (1.015-1.05x a prefill's speed on the CPU, BENCHMARKS.md)
    causal = not any(lengths) and T <= limit
    mask = None if causal else (torch.arange(S, device=device)[None, None, :] <= pos[:, :, None])[:, None]
    index = torch.arange(len(lengths), device=device) if rows is None else torch.tensor(rows, device=device)
    return _Step(
        pos=pos,
        cos=model.rope_cos[pos],  # (n, T, d/2)
        sin=model.rope_sin[pos],
        mask=mask,  # (n, 1, T, S) as padding_causal_mask gives it, or None
        rows=index[:, None],  # (n, 1)
        S=S,
        gather=rows is not None and list(rows) != list(range(len(rows))),
    )


def _check_fits(model, slots: int, max_len: int, mtp: bool, prefill_rows: int) -> None:
    """The pool is allocated whole at start-up: one too large for memory (`serve --max-active`) is one
    sentence, not an allocator failure."""
    from minimoe.memory import SKIP_ENV, check_fits

    w = model.embed_tokens.weight
    per_layer = model.cache_bytes_per_token(w.dtype) // len(model.layers)
    layers = len(model.layers) + (1 if mtp else 0)  # the MTP block's cache has the same rows
    need = per_layer * layers * max_len * (slots + prefill_rows)
    check_fits(
        need, w.device, f"a KV cache of {slots} slots x {max_len} tokens", f"set {SKIP_ENV}=1",
        remedy="decode fewer sequences at once (a lower --max-active)",
    )  # fmt: skip


class SlotPool:
    """`slots` preallocated cache rows of `max_len` positions for one model.

    With `mtp`, the pool also holds a cache for the model's first MTP module (same rows, same
    lengths), so sequences can draft their next token from it (`draft`) and verify the draft in the
    next step (self-speculative decoding in `minimoe.serve.engine`).

    Args:
        model: a Transformer in eval mode.
        slots: the most sequences decoded at once.
        max_len: positions per row (default: the model's context).
        mtp: also keep MTP module 0's cache (the model must have one).
        prefill_rows: prompts prefilled at once (`Prefill`), each in a row of its own (the serving
            engine uses up to 8).
    """

    def __init__(
        self, model, slots: int, max_len: int | None = None, mtp: bool = False, prefill_rows: int = 1
    ) -> None:
        self.model = model
        self.max_len = max_len or model.cfg.max_position_embeddings
        _check_fits(model, slots, self.max_len, mtp, prefill_rows)
        self.cache = model.make_cache(slots, self.max_len)
        self.scratch = model.make_cache(prefill_rows, self.max_len)  # where prompts are prefilled
        self.mtp_cache = make_mtp_cache(model, slots, self.max_len) if mtp else None
        self.mtp_scratch = make_mtp_cache(model, prefill_rows, self.max_len) if mtp else None
        self.lengths: list[int] = []  # tokens held by each occupied row, rows [0, n)

    @property
    def slots(self) -> int:
        return self.cache.layers[0].a.shape[0]

    @property
    def prefill_rows(self) -> int:
        return self.scratch.layers[0].a.shape[0]

    @property
    def n(self) -> int:
        return len(self.lengths)

    def _caches(self) -> list[tuple[KVCache, KVCache]]:
        pairs = [(self.cache, self.scratch)]
        if self.mtp_cache is not None:
            pairs.append((self.mtp_cache, self.mtp_scratch))
        return pairs

    def nbytes(self) -> int:
        """Bytes of every cache row and of the prefill rows (MTP caches included)."""
        return sum(a.nbytes() + b.nbytes() for a, b in self._caches())

    def add(self, length: int, src: int = 0) -> int:
        """Copy prefill row `src`'s first `length` positions into the next free row; its index."""
        row = self.n
        if row >= self.slots:
            raise RuntimeError("every cache slot is taken")
        for cache, scratch in self._caches():
            for dst, from_ in zip(cache.layers, scratch.layers):
                _copy_row(dst, row, from_, src, length)
        self.lengths.append(length)
        return row

    def remove(self, row: int) -> None:
        """Free `row`: the last row moves into it (callers mirror the move in their own lists)."""
        last = self.n - 1
        if row != last:
            for cache, _ in self._caches():
                for layer in cache.layers:
                    _copy_row(layer, row, layer, last, self.lengths[last])
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()

    def _step(self, T: int, device) -> _Step:
        """Where T new tokens per occupied row go: row i's at positions lengths[i] + t."""
        return _step_at(self.model, self.lengths, T, device, self.max_len)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Feed T new tokens to every occupied row at its own positions; lengths do not change
        (`advance` commits them, so a rejected draft's entry is simply overwritten later).

        Args:
            tokens: (n, T) the next tokens of each row (not in the cache yet).
        Returns:
            logits (n, T, V) and the hidden states before the final norm (n, T, D).
        """
        model = self.model
        x = self._step(tokens.shape[1], tokens.device).blocks(model, tokens, self.cache)  # (n, T, D)
        return model.lm_head(model.norm(x)), x

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step for every occupied row.

        Args:
            tokens: (n,) the next token of each row (not in the cache yet).
        Returns:
            (n, V) next-token logits; each row's length grows by one.
        """
        logits, _ = self.forward(tokens.view(-1, 1))
        self.advance([1] * self.n)
        return logits[:, -1]

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
        """Run MTP module 0 over the positions `forward` just fed (before `advance`), as in training:
        position j combines the main hidden state h_j with the embedding of token j + 1.

        Args:
            hidden: (n, T) main hidden states from `forward`.
            next_ids: (n, T) the token after each position (anything past a row's committed ones).
            take: (n,) long, the position of each row whose output drafts (its last committed one).
        Returns:
            (n, V) draft logits: the token after next of each row.
        """
        step = self._step(hidden.shape[1], hidden.device)
        return self.model.lm_head(step.mtp(self.model, hidden, next_ids, self.mtp_cache, take))  # (n, V)

    @torch.no_grad()
    def speculate(self, tokens: torch.Tensor) -> Speculation:
        """One greedy self-speculative step, uncommitted: `forward` over each row's [next token, draft],
        then `draft` over what greedy decoding commits (see `greedy_speculation`)."""
        return greedy_speculation(self.forward, self.draft, tokens)

    def advance(self, counts: Sequence[int]) -> None:
        """Commit counts[i] of the tokens `forward` fed to row i."""
        self.lengths = [length + c for length, c in zip(self.lengths, counts)]


class Speculation(NamedTuple):
    """One self-speculative step over n rows, as greedy decoding takes it (`greedy_speculation`)."""

    logits: torch.Tensor  # (n, 2, V) the main model's, at each row's next token and its draft
    hidden: torch.Tensor  # (n, 2, D) before the final norm: the MTP module's input
    best: torch.Tensor  # (n, 2) argmax of logits: the corrected token, then the bonus one
    draft_logits: torch.Tensor  # (n, V) the MTP module's, after the committed tokens


def greedy_speculation(forward, draft, tokens: torch.Tensor) -> Speculation:
    """Verify each row's draft and draft the next one, greedily, with no host sync in between.

    A row whose draft (tokens[:, 1]) is the main model's argmax after its next token commits
    [draft, bonus] and its next draft comes from the MTP module at the bonus position; otherwise it
    commits the corrected token alone and drafts from there (its second position is padding). A
    batch with rows that sample calls `forward` and `draft` itself, deciding on the host between them.

    Args:
        forward: (n, T) tokens -> logits (n, T, V), hidden (n, T, D) (`SlotPool.forward`).
        draft: hidden, next_ids (n, T), take (n,) -> (n, V) (`SlotPool.draft`).
        tokens: (n, 2) each row's next token and its draft.
    """
    logits, hidden = forward(tokens)
    best = logits.argmax(-1)  # (n, 2)
    accepted = best[:, 0] == tokens[:, 1]
    next_ids = torch.where(accepted[:, None], best, best[:, :1].expand_as(best))
    return Speculation(logits, hidden, best, draft(hidden, next_ids, accepted.long()))


def _copy_row(dst: LayerCache, i: int, src: LayerCache, j: int, length: int) -> None:
    if dst.buf is not None:
        dst.buf[i, :length] = src.buf[j, :length]
    else:
        dst.a[i, :length] = src.a[j, :length]
        dst.b[i, :length] = src.b[j, :length]


class Prefill:
    """Prompts prefilled together in the pool's prefill rows, one forward per step, before they join
    the decode batch.

    `add(ids)` gives a prompt a free prefill row. `step(budget)` feeds every row its next chunk in one
    forward over [rows, T] tokens at the rows' own positions (as `SlotPool.forward` feeds decode rows):
    T is at most budget // rows (and at least 1), so a step costs at most `budget` token positions (or
    one per row), padding included, and a long prompt takes several steps. It returns, by row, the
    (1, V) logits after the last token of each prompt that is now complete; `SlotPool.add(len(ids),
    src=row)` then copies the row into the decode batch and `release(row)` frees it. A prompt added
    with `score=k` also gets the log-probability of each of its tokens after the first and its k most
    likely alternatives (`scores(row)`), from the logits of the chunk that predicted it. With an MTP
    pool, the MTP module's cache is filled over the same positions (position j with token j + 1), and
    `first_draft` drafts each finished prompt's token after its first new one. Only one Prefill may
    use a pool at a time.
    """

    def __init__(self, pool: SlotPool) -> None:
        self.pool = pool
        self.rows = pool.prefill_rows
        self.ids: dict[int, list[int]] = {}  # row -> its prompt
        self.done: dict[int, int] = {}  # row -> tokens already fed
        self._last_hidden: dict[int, torch.Tensor] = {}  # finished row -> (D,) at its last prompt token
        self._score: dict[int, int] = {}  # row -> alternatives to list, for prompts added with a score
        self._scores: dict[int, list] = {}  # row -> (logprob, top) of its prompt tokens 1.. so far

    @property
    def free(self) -> int:
        return self.rows - len(self.ids)

    def add(self, ids: Sequence[int], score: int | None = None) -> int:
        """Take a free row for the prompt `ids` (1 to max_len - 1 tokens: room for one new token); its
        row. `score`: see the class docstring."""
        if not 0 < len(ids) < self.pool.max_len:
            raise ValueError(f"a prompt needs 1 to {self.pool.max_len - 1} tokens, got {len(ids)}")
        row = next((r for r in range(self.rows) if r not in self.ids), None)
        if row is None:
            raise RuntimeError("every prefill row is taken")
        self.ids[row], self.done[row] = list(ids), 0
        if score is not None:
            self._score[row], self._scores[row] = score, []
        return row

    def release(self, row: int) -> None:
        self.ids.pop(row, None)
        self.done.pop(row, None)
        self._last_hidden.pop(row, None)
        self._score.pop(row, None)
        self._scores.pop(row, None)

    def scores(self, row: int) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
        """A finished scored prompt's (logprob, top) for each of its tokens after the first."""
        return self._scores[row]

    def left(self, row: int) -> int:
        return len(self.ids[row]) - self.done[row]

    @torch.no_grad()
    def step(self, budget: int) -> dict[int, torch.Tensor]:
        pool, model = self.pool, self.pool.model
        rows = sorted(r for r in self.ids if self.left(r) > 0)
        if not rows:
            return {}
        device = model.embed_tokens.weight.device
        T = max(1, min(max(self.left(r) for r in rows), budget // len(rows)))
        takes = [min(self.left(r), T) for r in rows]
        chunks = [self.ids[r][self.done[r] : self.done[r] + k] + [0] * (T - k) for r, k in zip(rows, takes)]
        tokens = torch.tensor(chunks, device=device)  # (k, T), padded
        step = _step_at(model, [self.done[r] for r in rows], T, device, pool.max_len, rows)
        x = step.blocks(model, tokens, pool.scratch)
        if pool.mtp_scratch is not None:
            # MTP position j needs token j + 1: the prompt has it for every position but its last (that
            # one is written by first_draft, with the first new token); padding writes are masked
            nxt = [self.ids[r][self.done[r] + 1 : self.done[r] + 1 + T] for r in rows]
            next_ids = torch.tensor([n + [0] * (T - len(n)) for n in nxt], device=device)
            step.mtp(model, x, next_ids, pool.mtp_scratch, torch.zeros_like(next_ids[:, 0]))  # cache only
        finished = []
        for i, (r, k) in enumerate(zip(rows, takes)):
            if r in self._score:  # position t predicts prompt token done + t + 1, up to the last
                targets = self.ids[r][self.done[r] + 1 : self.done[r] + 1 + k]
                logits = model.lm_head(model.norm(x[i, : len(targets)]))
                self._scores[r] += token_logprobs(logits, targets, self._score[r]) if targets else []
            self.done[r] += k
            if self.left(r) == 0:
                finished.append((i, r))
        if not finished:
            return {}
        index = torch.tensor([i for i, _ in finished], device=device)
        last = torch.tensor([takes[i] - 1 for i, _ in finished], device=device)
        hidden = x[index, last]  # (f, D) at each finished prompt's last token
        logits = model.lm_head(model.norm(hidden))  # (f, V)
        out = {}
        for j, (_, r) in enumerate(finished):
            out[r] = logits[j : j + 1]
            self._last_hidden[r] = hidden[j]
        return out

    @torch.no_grad()
    def first_draft(self, rows: Sequence[int], tokens: Sequence[int]) -> torch.Tensor:
        """With an MTP pool, for prompts `step` just finished: feed each one's last position and its
        first new token to the MTP module; (len(rows), V) draft logits for the token after it."""
        pool, model = self.pool, self.pool.model
        device = model.embed_tokens.weight.device
        hidden = torch.stack([self._last_hidden[r] for r in rows])[:, None]  # (f, 1, D)
        step = _step_at(model, [len(self.ids[r]) - 1 for r in rows], 1, device, pool.max_len, rows)
        next_ids = torch.tensor(list(tokens), device=device)[:, None]  # (f, 1)
        take = torch.zeros_like(next_ids[:, 0])  # (f,) its only position
        return model.lm_head(step.mtp(model, hidden, next_ids, pool.mtp_scratch, take))  # (f, V)
