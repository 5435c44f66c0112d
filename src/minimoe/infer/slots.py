"""A fixed pool of per-sequence cache slots, and one decode step that advances every sequence in it.

The pool is one KVCache of `slots` rows x `max_len` positions (the MLA latent, or GQA keys and
values), allocated once, so its memory is known at start-up. Sequences being decoded occupy rows
[0, n): when one leaves, the last row moves into its place, so the batch is always a prefix of the
pool and attention reads a slice of it, never a gathered copy. Rows have their own lengths: the new
token of row i is written at position lengths[i], rotated by RoPE at that position, and attends to
positions <= lengths[i] only, so every row computes what it would alone.

A prompt is prefilled in a separate one-row cache, one chunk at a time (`Prefill`), then copied into
the next free row (`SlotPool.add`), where it joins the decode batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from minimoe.model.attention import LayerCache


class _Rows:
    """A LayerCache stand-in for the attention modules during a pooled decode step: it writes the
    new entry of row i at position pos[i] and hands back rows [0, n) up to the longest length."""

    def __init__(self, layer: LayerCache, rows: torch.Tensor, pos: torch.Tensor, n: int, S: int) -> None:
        self.layer, self.rows, self.pos, self.n, self.S = layer, rows, pos, n, S
        self.buf = layer.buf[:n] if layer.buf is not None else None  # MLA reads [latent | rope key]

    def update(self, a: torch.Tensor, b: torch.Tensor, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """a, b: (n, 1, ...) one new entry per row."""
        L = self.layer
        L.a[self.rows, self.pos] = a[:, 0].to(L.a.dtype)
        L.b[self.rows, self.pos] = b[:, 0].to(L.b.dtype)
        return L.a[: self.n, : self.S], L.b[: self.n, : self.S]


class SlotPool:
    """`slots` preallocated cache rows of `max_len` positions for one model.

    Args:
        model: a Transformer in eval mode.
        slots: the most sequences decoded at once.
        max_len: positions per row (default: the model's context).
    """

    def __init__(self, model, slots: int, max_len: int | None = None) -> None:
        self.model = model
        self.max_len = max_len or model.cfg.max_seq_len
        self.cache = model.make_cache(slots, self.max_len)
        self.scratch = model.make_cache(1, self.max_len)  # where prompts are prefilled
        self.lengths: list[int] = []  # tokens held by each occupied row, rows [0, n)

    @property
    def slots(self) -> int:
        return self.cache.layers[0].a.shape[0]

    @property
    def n(self) -> int:
        return len(self.lengths)

    def nbytes(self) -> int:
        """Bytes of every cache row and of the prefill row."""
        return self.cache.nbytes() + self.scratch.nbytes()

    def add(self, length: int) -> int:
        """Copy the prefill row's first `length` positions into the next free row; its index."""
        row = self.n
        if row >= self.slots:
            raise RuntimeError("every cache slot is taken")
        for dst, src in zip(self.cache.layers, self.scratch.layers):
            _copy_row(dst, row, src, 0, length)
        self.lengths.append(length)
        return row

    def remove(self, row: int) -> None:
        """Free `row`: the last row moves into it (callers mirror the move in their own lists)."""
        last = self.n - 1
        if row != last:
            for layer in self.cache.layers:
                _copy_row(layer, row, layer, last, self.lengths[last])
            self.lengths[row] = self.lengths[last]
        self.lengths.pop()

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step for every occupied row.

        Args:
            tokens: (n,) the next token of each row (not in the cache yet).
        Returns:
            (n, V) next-token logits; each row's length grows by one.
        """
        model, n = self.model, self.n
        device = tokens.device
        pos = torch.tensor(self.lengths, device=device)  # (n,) where each new token goes
        S = max(self.lengths) + 1
        mask = torch.arange(S, device=device)[None, :] <= pos[:, None]  # (n, S)
        mask = mask[:, None, None, :]  # (n, 1, 1, S) as padding_causal_mask gives it
        cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]  # (n, 1, d/2)
        rows = torch.arange(n, device=device)
        x = model.embed_tokens(tokens.view(n, 1))  # (n, 1, D)
        for block, layer in zip(model.layers, self.cache.layers):
            # start = S - 1 > 0: MLA takes the absorbed path, as in any cached decode step
            x, _ = block(x, cos, sin, _Rows(layer, rows, pos, n, S), S - 1, mask)
        logits = model.lm_head(model.norm(x))[:, -1]  # (n, V)
        self.lengths = [length + 1 for length in self.lengths]
        return logits


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
        pool.scratch.pos = 0

    @property
    def left(self) -> int:
        return len(self.ids) - self.done

    @torch.no_grad()
    def step(self, budget: int) -> torch.Tensor | None:
        model, cache = self.pool.model, self.pool.scratch
        chunk = self.ids[self.done : self.done + max(budget, 1)]
        x = torch.tensor([chunk], device=model.embed_tokens.weight.device)
        logits = model(x, cache=cache, num_logits_to_keep=1).logits[:, -1]  # (1, V)
        self.done += len(chunk)
        return logits if self.left == 0 else None
