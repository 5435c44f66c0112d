"""A decode step with fixed shapes, for `torch.compile` (gpt-fast's static cache, over the slot pool).

The eager pooled step (`SlotPool.decode`) reads rows [0, n) up to the longest length, so its shapes
change every step and a compiled version recompiles as the cache grows. This step runs a fixed number
of rows, the smallest of a few buckets (1, 8 and every slot) that holds the occupied rows (rows past
them are padding: they decode token 0 at position 0, which `SlotPool.add` overwrites before the row
is used), over a fixed number of positions, masked per row: the smallest of a few buckets (max_len,
max_len / 4, ...) that holds every row, so a handful of compiled graphs, all built at `warm_up`, serve
every step. The MoE layers keep fixed shapes too: traced without gradients,
the MoE layer hands its pairs unsorted to `GroupedExperts.pairs` (each pair's expert weights read inside
one product-and-sum the compiler fuses; up to a few rows per expert, and always on CUDA) or, with more
rows on the CPU, inside one custom operator opaque to the compiler (`selected_experts`); both read only
the selected experts' weights and return (rows x top-k, D) whatever the routing. On a CUDA device each graph is also
captured as a CUDA graph (inductor's cudagraph trees: one launch replays every kernel of the step),
with the cache tensors marked as static addresses, which the step writes in place. On the CPU the
matrix products of up to eight rows (every linear layer up to batch 8) are generated as reductions
over the weight's rows instead of BLAS calls (minimoe.infer.inductor_cpu). `SlotPool.decode` stays
the reference; tests compare the two.

Shape suffixes: T tokens (rows), D hidden, E experts, I expert intermediate.
"""

from __future__ import annotations

import functools
import time

import torch
from torch.utils._pytree import tree_map

from minimoe.errors import MinimoeError
from minimoe.infer.common import decode_thread_count, num_threads
from minimoe.infer.inductor_cpu import FEW_ROWS, cpu_inductor
from minimoe.infer.slots import Prefill, SlotPool, Speculation, _Step, greedy_speculation
from minimoe.model.experts import GroupedExperts


def _allow_graphs(n: int) -> None:
    """Dynamo's recompile limits raised to at least n graphs per function, in the calling thread: dynamo's
    config is per thread (a value set on one thread is not seen on another), and the serving engine
    compiles on its worker thread."""
    config = torch._dynamo.config
    if config.recompile_limit < n:
        config.recompile_limit = n
    if config.accumulated_recompile_limit < n:
        config.accumulated_recompile_limit = n


class StaticDecode:
    """The pool's decode step at fixed shapes, compiled once per shape.

    The calls mirror the pool's: `decode` (one token per row, committed), and for self-speculative
    decoding `speculate` (greedy rows: the verify forward over each row's last token and draft, and
    the MTP draft, in one graph), or `forward` (T tokens per row, not committed) and then `draft` (the
    MTP module over the same positions) when a row samples and decides on the host. Each runs the
    rows of one row bucket (`row_buckets`) over the positions of one position bucket (`buckets`), so
    each call has one compiled graph per pair of buckets (and per token count T), built by `warm_up`.

    Args:
        pool: the SlotPool whose caches it writes (its MTP cache too, for `draft`).
        compile: wrap the steps in `torch.compile` (else they run eagerly: the fixed-shape reference).
        backend: torch.compile's backend ("inductor" fuses kernels; "eager" only traces, for tests).
        cuda_graphs: with inductor on a CUDA device, replay each compiled step as a CUDA graph (None: on
            whenever that applies).
        few_rows: with inductor on the CPU, matrix products of at most this many rows become
            reductions (`inductor_cpu.few_row_mm`; 0: every product is a BLAS call).
    """

    _graphs = 0  # the graphs every compiling StaticDecode of this process may build, per function

    def __init__(
        self,
        pool: SlotPool,
        compile: bool = True,
        backend: str = "inductor",
        cuda_graphs: bool | None = None,
        few_rows: int = FEW_ROWS,
    ) -> None:
        model = pool.model
        blocks = list(model.layers) + ([model.mtp[0].block] if pool.mtp_cache is not None else [])
        for block in blocks:
            if block.is_moe and not isinstance(block.mlp.experts, GroupedExperts):
                raise MinimoeError("the compiled decode step needs plain (not quantized) experts")
        self.pool = pool
        self._threads_at_init = torch.get_num_threads()
        self.compile_s = 0.0  # seconds the first call took (compilation included)
        self._calls = 0
        # dynamic=False: every input has one shape for the whole run, so there is one graph per
        # call. On CPU inductor's C++ wrapper calls the kernels without a Python line per kernel
        # (+2-19% tokens/s at batch 1 on the bench's reference config, for ~10 s more compiling)
        device = pool.cache.layers[0].a.device.type
        inductor = compile and backend == "inductor"
        self.cuda_graphs = inductor and device == "cuda" and cuda_graphs is not False
        options = None
        if inductor and device == "cpu":
            backend = functools.partial(cpu_inductor, few_rows=few_rows)
        if self.cuda_graphs:
            # a CUDA graph replays fixed addresses: the caches it writes must never be copied in as
            # fresh inputs (parameters and buffers are static already)
            options = {"triton.cudagraphs": True}
            for t in _cache_tensors(pool):
                torch._dynamo.mark_static_address(t)

        def wrap(fn):
            if not compile:
                return fn
            return torch.compile(fn, dynamic=False, fullgraph=True, backend=backend, options=options)

        self._forward_fn, self._draft_fn = wrap(self._forward), wrap(self._draft)
        self._speculate_fn = wrap(self._speculate)
        # the positions a step attends over: the smallest bucket holding every row's new tokens, from
        # max_len down by quarters to 16 (each bucket its own graph): short contexts in a large pool
        # read a quarter or less of the cache, whose reading dominates the step with many slots
        self.buckets = [pool.max_len]
        while self.buckets[0] // 4 >= 16:
            self.buckets.insert(0, self.buckets[0] // 4)
        # the rows a step runs: one request alone should not pay for every slot of a large pool
        self.row_buckets = sorted({1, min(8, pool.slots), pool.slots})
        if compile:
            # dynamo counts the graphs of one function over every instance (a bench holds several
            # pools), and with fullgraph=True reaching its limit is an error: room for this one's
            StaticDecode._graphs += 3 * len(self.buckets) * len(self.row_buckets)  # forward, speculate, draft

    def _where(self, pos: torch.Tensor, T: int, L: int) -> _Step:
        """Where T new tokens per row go, from each row's length `pos` (B,), attending over the first
        L positions: the pooled step of rows [0, B) (positions, RoPE tables, mask), at fixed shapes."""
        model, B = self.pool.model, pos.shape[0]
        device = pos.device
        P = pos[:, None] + torch.arange(T, device=device)  # (B, T)
        mask = (torch.arange(L, device=device)[None, None, :] <= P[:, :, None])[:, None]  # (B, 1, T, L)
        rows = torch.arange(B, device=device)[:, None]
        return _Step(pos=P, cos=model.rope_cos[P], sin=model.rope_sin[P], mask=mask, rows=rows, S=L)

    def _forward(self, tokens: torch.Tensor, pos: torch.Tensor, L: int) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens (B, T) for rows [0, B), pos (B,), L the positions attended (a bucket) -> logits
        (B, T, V), hidden before the final norm (B, T, D); writes each row's entries at pos + t."""
        model = self.pool.model
        x = self._where(pos, tokens.shape[1], L).blocks(model, tokens, self.pool.cache)  # (B, T, D)
        return model.lm_head(model.norm(x)), x

    def _draft(self, hidden, next_ids, take, pos, L: int) -> torch.Tensor:
        """`SlotPool.draft` at fixed shapes, rows [0, B), over the first L positions: -> (B, V)."""
        model = self.pool.model
        step = self._where(pos, next_ids.shape[1], L)
        return model.lm_head(step.mtp(model, hidden, next_ids, self.pool.mtp_cache, take))  # (B, V)

    def _speculate(self, tokens, pos, L: int) -> Speculation:
        """`greedy_speculation` at fixed shapes, rows [0, B): the verify forward and the draft in one
        graph (one call per step, no host sync between them)."""
        return greedy_speculation(
            lambda t: self._forward(t, pos, L), lambda h, n, k: self._draft(h, n, k, pos, L), tokens
        )

    def _padded(self, t: torch.Tensor) -> torch.Tensor:
        """(n, ...) -> (R, ...) for the row bucket R that holds the n occupied rows, zeros past them."""
        R = next(R for R in self.row_buckets if R >= self.pool.n)
        out = t.new_zeros((R, *t.shape[1:]))
        out[: t.shape[0]] = t
        return out

    def _bucket(self, T: int) -> int:
        """The smallest bucket that holds T more tokens in every row."""
        need = max(self.pool.lengths, default=0) + T
        fits = [L for L in self.buckets if L >= need]
        if not fits:
            raise MinimoeError(f"a row would reach position {need}, past the pool's {self.pool.max_len}")
        return fits[0]

    def _lengths(self, device) -> torch.Tensor:
        return self._padded(torch.tensor(self.pool.lengths, dtype=torch.long, device=device))

    def _threads(self, rows: torch.Tensor):
        """The intra-op threads of a call over `rows` ((R, T, ...): R x T token rows): one count per
        graph, set when it is compiled and at every call whatever the caller holds (one thread for a
        small step under passive OpenMP waiting, else the threads the process had at construction).
        Dynamo guards each graph on the thread count it was traced at (inductor writes the count
        into the kernels it generates), so a call at another count would compile the graph again."""
        return num_threads(
            decode_thread_count(self.pool.model, rows.shape[0] * rows.shape[1], self._threads_at_init)
        )

    def _call(self, fn, *args):
        """One step's call of a compiled function, as one step of the CUDA graph trees where they run."""
        _allow_graphs(StaticDecode._graphs)
        if self.cuda_graphs:
            # a new step: the graphs' outputs from the last one are dead (their copies were returned)
            torch.compiler.cudagraph_mark_step_begin()
        with self._threads(args[0]):
            out = fn(*args)
        if self.cuda_graphs:
            # a graph's outputs live in its memory pool and the next replay overwrites them
            out = tree_map(torch.clone, out)
        return out

    def _timed(self, fn, *args):
        t0 = time.perf_counter()
        out = self._call(fn, *args)
        if self._calls == 0:
            self.compile_s = time.perf_counter() - t0
        self._calls += 1
        return out

    @torch.no_grad()
    def warm_up(self) -> float:
        """Compile now, on an empty pool (so only free rows are written), for every pair of row and
        position buckets: the one-token step, or with an MTP cache what speculative decoding runs
        (`speculate` when every row is greedy, else the two-token `forward` and `draft`); seconds.

        With CUDA graphs every call runs twice: inductor's graph trees run a function eagerly once
        before they record it, and record at the second call, so no step records after this. The
        trees belong to the calling thread: call this on the thread that will decode
        (`Engine.warm_up` does)."""
        pool = self.pool
        if pool.n:
            raise RuntimeError("warm_up needs an empty pool")
        device = pool.cache.layers[0].a.device
        T = 2 if pool.mtp_cache is not None else 1
        t0 = time.perf_counter()
        for R in self.row_buckets:
            # distinct tensors, not one passed twice: the graph would guard on `tokens is pos` and
            # compile again at the first real step
            tokens = torch.zeros(R, T, dtype=torch.long, device=device)
            pos = torch.zeros(R, dtype=torch.long, device=device)
            for L in self.buckets:
                for _ in range(2 if self.cuda_graphs else 1):
                    _, hidden = self._call(self._forward_fn, tokens, pos, L)
                    if T == 2:
                        self._call(self._speculate_fn, tokens, pos, L)
                        self._call(
                            self._draft_fn,
                            hidden.new_zeros(hidden.shape),  # contiguous, as `draft` passes it
                            torch.zeros_like(tokens),
                            torch.zeros_like(pos),
                            pos.clone(),
                            L,
                        )
        self.compile_s = time.perf_counter() - t0
        self._calls += 1
        return self.compile_s

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """What `SlotPool.forward` does, at fixed shapes: (n, T) tokens -> logits (n, T, V) and
        hidden states (n, T, D); lengths do not change."""
        n = self.pool.n
        pos, L = self._lengths(tokens.device), self._bucket(tokens.shape[1])
        logits, hidden = self._timed(self._forward_fn, self._padded(tokens), pos, L)
        return logits[:n], hidden[:n]

    @torch.no_grad()
    def speculate(self, tokens: torch.Tensor) -> Speculation:
        """What `SlotPool.speculate` does, at fixed shapes and in one compiled call."""
        n, pad = self.pool.n, self._padded
        out = self._timed(self._speculate_fn, pad(tokens), self._lengths(tokens.device), self._bucket(2))
        return Speculation(*(t[:n] for t in out))

    @torch.no_grad()
    def draft(self, hidden: torch.Tensor, next_ids: torch.Tensor, take: torch.Tensor) -> torch.Tensor:
        """What `SlotPool.draft` does, at fixed shapes: (n, V) draft logits."""
        pad, L = self._padded, self._bucket(next_ids.shape[1])
        logits = self._timed(
            self._draft_fn, pad(hidden), pad(next_ids), pad(take), self._lengths(hidden.device), L
        )
        return logits[: self.pool.n]

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """What `SlotPool.decode` does, at fixed shapes: (n,) tokens -> (n, V) logits."""
        logits, _ = self.forward(tokens.view(-1, 1))
        self.pool.advance([1] * self.pool.n)
        return logits[:, -1]


def _cache_tensors(pool: SlotPool):
    """Every tensor the step writes in place: each layer's cache (its joint buffer and both views)."""
    for cache in (pool.cache, pool.mtp_cache):
        for layer in cache.layers if cache is not None else ():
            yield from (t for t in (layer.buf, layer.a, layer.b) if t is not None)


@torch.no_grad()
def static_greedy(static: StaticDecode, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """Greedy continuations through the fixed-shape step: the prompts prefilled whole, as many at
    once as the pool has prefill rows (as the serving engine prefills requests that arrive together),
    each joining the decode batch in order, then `new_tokens - 1` steps of `static.decode` (the first
    token comes from the prefill).

    Args:
        static: a StaticDecode whose pool is empty and has a slot for every prompt, and room for
            the longest prompt plus `new_tokens` positions.
        prompts: token ids, one list per row.
        new_tokens: tokens generated per prompt (>= 1).
    Returns:
        (len(prompts), new_tokens) generated ids; the pool is empty again afterwards.
    """
    pool = static.pool
    if pool.n or len(prompts) > pool.slots or max(map(len, prompts)) + new_tokens > pool.max_len + 1:
        raise ValueError("the pool must be empty and hold every prompt and its new tokens")
    first = []
    group = pool.prefill_rows
    for start in range(0, len(prompts), group):
        prefill = Prefill(pool)
        batch = prompts[start : start + group]
        rows = [prefill.add(ids) for ids in batch]
        logits: dict[int, torch.Tensor] = {}
        while len(logits) < len(rows):  # one step unless the prompts' lengths differ
            logits.update(prefill.step(sum(map(len, batch))))
        for ids, row in zip(batch, rows):
            pool.add(len(ids), src=row)
            first.append(logits[row].argmax(-1))
    tokens = [torch.cat(first)]  # each (n,)
    for _ in range(new_tokens - 1):
        tokens.append(static.decode(tokens[-1]).argmax(-1))
    while pool.n:
        pool.remove(pool.n - 1)
    return torch.stack(tokens, dim=1)
