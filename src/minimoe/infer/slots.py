"""A fixed pool of per-sequence cache slots, and one decode step that advances every sequence in it.

The pool is one KVCache of `slots` rows x `max_len` positions (the MLA latent, or GQA keys and
values), allocated once, so its memory is known at start-up. Sequences being decoded occupy rows
[0, n): when one leaves, the last row moves into its place, so the batch is always a prefix of the
pool and attention reads a slice of it, never a gathered copy. Rows have their own lengths: the new
token of row i is written at position lengths[i], rotated by RoPE at that position, and attends to
positions <= lengths[i] only, so every row computes what it would alone.

A prompt is prefilled in a separate one-row cache, one chunk at a time (`Prefill`), then copied into
the next free row (`SlotPool.add`), where it joins the decode batch.

For self-speculative decoding, `forward` feeds several tokens per row (the last one and a draft)
without committing them, `draft` runs the MTP module over the same positions in its own pooled
cache, and `advance` commits each row's accepted count: a rejected entry lies past the row's length,
masked, until the next step overwrites it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from minimoe.infer.speculative import make_mtp_cache, mtp_step
from minimoe.model.attention import LayerCache
from minimoe.model.transformer import KVCache


class _Rows:
    """A LayerCache stand-in for the attention modules during a pooled step: it writes the T new
    entries of row i at positions pos[i, :] and hands back rows [0, n) up to position S."""

    def __init__(self, layer: LayerCache, rows: torch.Tensor, pos: torch.Tensor, n: int, S: int) -> None:
        self.layer, self.rows, self.pos, self.n, self.S = layer, rows, pos, n, S
        self.buf = layer.buf[:n] if layer.buf is not None else None  # MLA reads [latent | rope key]

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
        return L.a[: self.n, : self.S], L.b[: self.n, : self.S]


@dataclass
class _Step:
    """What one pooled step over T new tokens per occupied row (n rows) needs, for every layer."""

    pos: torch.Tensor  # (n, T) positions of the new entries
    cos: torch.Tensor  # (n, T, d/2) RoPE at those positions
    sin: torch.Tensor
    mask: torch.Tensor  # (n, 1, T, S): query t of row i sees positions <= lengths[i] + t
    rows: torch.Tensor  # (n, 1) row indices
    S: int  # positions attended: the longest row's length + T

    @property
    def start(self) -> int:
        return self.S - self.pos.shape[1]

    def cache(self, layer: LayerCache) -> _Rows:
        return _Rows(layer, self.rows, self.pos, self.rows.shape[0], self.S)


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
    """

    def __init__(self, model, slots: int, max_len: int | None = None, mtp: bool = False) -> None:
        self.model = model
        self.max_len = max_len or model.cfg.max_position_embeddings
        self.cache = model.make_cache(slots, self.max_len)
        self.scratch = model.make_cache(1, self.max_len)  # where prompts are prefilled
        self.mtp_cache = make_mtp_cache(model, slots, self.max_len) if mtp else None
        self.mtp_scratch = make_mtp_cache(model, 1, self.max_len) if mtp else None
        self.lengths: list[int] = []  # tokens held by each occupied row, rows [0, n)

    @property
    def slots(self) -> int:
        return self.cache.layers[0].a.shape[0]

    @property
    def n(self) -> int:
        return len(self.lengths)

    def _caches(self) -> list[tuple[KVCache, KVCache]]:
        pairs = [(self.cache, self.scratch)]
        if self.mtp_cache is not None:
            pairs.append((self.mtp_cache, self.mtp_scratch))
        return pairs

    def nbytes(self) -> int:
        """Bytes of every cache row and of the prefill row (MTP caches included)."""
        return sum(a.nbytes() + b.nbytes() for a, b in self._caches())

    def add(self, length: int) -> int:
        """Copy the prefill row's first `length` positions into the next free row; its index."""
        row = self.n
        if row >= self.slots:
            raise RuntimeError("every cache slot is taken")
        for cache, scratch in self._caches():
            for dst, src in zip(cache.layers, scratch.layers):
                _copy_row(dst, row, src, 0, length)
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
        n, model = self.n, self.model
        pos = torch.tensor(self.lengths, device=device)[:, None] + torch.arange(T, device=device)  # (n, T)
        S = max(self.lengths) + T
        mask = torch.arange(S, device=device)[None, None, :] <= pos[:, :, None]  # (n, T, S)
        return _Step(
            pos=pos,
            cos=model.rope_cos[pos],  # (n, T, d/2)
            sin=model.rope_sin[pos],
            mask=mask[:, None],  # (n, 1, T, S) as padding_causal_mask gives it
            rows=torch.arange(n, device=device)[:, None],  # (n, 1)
            S=S,
        )

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
        step = self._step(tokens.shape[1], tokens.device)
        x = model.embed_tokens(tokens)  # (n, T, D)
        for block, layer in zip(model.layers, self.cache.layers):
            # start = S - T > 0: MLA takes the absorbed path, as in any cached decode step
            x, _ = block(x, step.cos, step.sin, step.cache(layer), step.start, step.mask)
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
        model = self.model
        step = self._step(hidden.shape[1], hidden.device)
        emb = model.embed_tokens(next_ids)  # (n, T, D)
        cache = step.cache(self.mtp_cache.layers[0])
        # h_normed: (n, T, D)
        _, h_normed, _ = model.mtp[0](hidden, emb, step.cos, step.sin, cache, step.start, step.mask)
        return model.lm_head(h_normed[step.rows[:, 0], take])  # (n, V)

    def advance(self, counts: Sequence[int]) -> None:
        """Commit counts[i] of the tokens `forward` fed to row i."""
        self.lengths = [length + c for length, c in zip(self.lengths, counts)]


def _copy_row(dst: LayerCache, i: int, src: LayerCache, j: int, length: int) -> None:
    if dst.buf is not None:
        dst.buf[i, :length] = src.buf[j, :length]
    else:
        dst.a[i, :length] = src.a[j, :length]
        dst.b[i, :length] = src.b[j, :length]


class Prefill:
    """A prompt fed through the pool's prefill row a chunk at a time.

    `step(budget)` runs up to `budget` more prompt tokens; it returns the (1, V) logits after the
    last prompt token once the prompt is done (then `SlotPool.add(len(ids))` takes the row over),
    else None. Only one Prefill may use a pool at a time.
    """

    def __init__(self, pool: SlotPool, ids: Sequence[int]) -> None:
        self.pool, self.ids = pool, list(ids)
        self.done = 0
        self._last_hidden: torch.Tensor | None = None  # (1, 1, D) at the last prompt position
        pool.scratch.pos = 0
        if pool.mtp_scratch is not None:
            pool.mtp_scratch.pos = 0

    @property
    def left(self) -> int:
        return len(self.ids) - self.done

    @torch.no_grad()
    def step(self, budget: int) -> torch.Tensor | None:
        model, cache = self.pool.model, self.pool.scratch
        chunk = self.ids[self.done : self.done + max(budget, 1)]
        x = torch.tensor([chunk], device=model.embed_tokens.weight.device)
        out = model(x, cache=cache, num_logits_to_keep=1)
        mtp = self.pool.mtp_scratch
        if mtp is not None:
            # MTP position j needs token j + 1: every chunk position but the prompt's last has it now
            start, P = self.done, len(self.ids)
            k = min(start + len(chunk), P - 1) - start
            if k > 0:
                next_ids = torch.tensor([self.ids[start + 1 : start + 1 + k]], device=x.device)
                mtp_step(model, mtp, out.hidden[:, :k], next_ids)
            self._last_hidden = out.hidden[:, -1:]
        self.done += len(chunk)
        return out.logits[:, -1] if self.left == 0 else None  # (1, V)

    @torch.no_grad()
    def first_draft(self, token: int) -> torch.Tensor:
        """With an MTP pool, after the last chunk: feed the prompt's last position and the first new
        `token` to the MTP module; returns (1, V) draft logits for the token after it."""
        device = self._last_hidden.device
        return mtp_step(
            self.pool.model, self.pool.mtp_scratch, self._last_hidden, torch.tensor([[token]], device=device)
        )
