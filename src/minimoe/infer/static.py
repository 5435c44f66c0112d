"""A decode step with fixed shapes, for `torch.compile` (gpt-fast's static cache, over the slot pool).

The eager pooled step (`SlotPool.decode`) reads rows [0, n) up to the longest length, so its shapes
change every step and a compiled version recompiles as the cache grows. This step always runs every
row of the pool (free rows are padding: they decode token 0 at position 0, which `SlotPool.add`
overwrites before the row is used) over all `max_len` positions, masked per row, so one compiled
graph serves every step. The MoE layers keep fixed shapes too (`fixed_shape_moe`): the routed experts
run inside one custom operator (`selected_experts`, opaque to the compiler) that reads only the
selected experts' weights and returns (rows x top-k, D) whatever the routing. `SlotPool.decode` stays
the reference; tests compare the two.

Shape suffixes: T tokens (rows), D hidden, E experts, I expert intermediate.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from minimoe.errors import MinimoeError
from minimoe.infer.slots import Prefill, SlotPool, _Rows
from minimoe.model.experts import GroupedExperts, loop_experts
from minimoe.model.router import route, router_scores


@torch.library.custom_op("minimoe::selected_experts", mutates_args=())
def selected_experts(
    x_ND: torch.Tensor,
    counts_E: torch.Tensor,
    gate_EID: torch.Tensor | None,
    up_EID: torch.Tensor,
    down_EDI: torch.Tensor,
    scale_N: torch.Tensor,
) -> torch.Tensor:
    """`loop_experts` as one opaque operator for torch.compile: inside it the experts with rows run as
    matrix-vector products on views of their weights (no copy, experts without rows not read); the
    compiled graph around it keeps fixed shapes, since the output is (N, D) whatever the routing."""
    return loop_experts(x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N)


@selected_experts.register_fake
def _(x_ND, counts_E, gate_EID, up_EID, down_EDI, scale_N):
    return x_ND.new_empty(x_ND.shape[0], down_EDI.shape[1])


def fixed_shape_moe(moe, x_TD: torch.Tensor) -> torch.Tensor:
    """A MoE layer's output with no data-dependent shapes: the (token, expert) pairs, sorted by
    expert, go through `selected_experts`, which reads only the selected experts' weights (batch 1,
    top-2 of 8: a quarter of the routed weights; decoding a few rows is bound by that reading).

    Args:
        moe: a minimoe MoE module with plain (not quantized) GroupedExperts.
        x_TD: (T, D) hidden states.
    Returns:
        (T, D) routed + shared output, equal to `moe(x)` up to the order of the sums.
    """
    gate, ex = moe.gate, moe.experts
    dt = torch.promote_types(x_TD.dtype, torch.float32)  # router math in fp32, as Router does
    scores_TE = router_scores(F.linear(x_TD.to(dt), gate.weight.to(dt)), gate.cfg.scoring_func)
    idx_TK, w_TK = route(scores_TE, gate.e_score_correction_bias, gate.cfg)
    K, E = idx_TK.shape[1], scores_TE.shape[1]
    expert_sorted_N, order_N = torch.sort(idx_TK.reshape(-1), stable=True)
    # counts by scatter-add, not bincount, whose output size would depend on the data
    ones_N = torch.ones_like(expert_sorted_N)
    counts_E = torch.zeros(E, dtype=torch.long, device=x_TD.device).scatter_add(0, expert_sorted_N, ones_N)
    token_N = order_N // K
    w_N = w_TK.reshape(-1).index_select(0, order_N).to(x_TD.dtype)
    x_ND = x_TD.index_select(0, token_N)
    y_ND = selected_experts(x_ND, counts_E, ex.gate_proj, ex.up_proj, ex.down_proj, w_N)
    y_TD = torch.zeros_like(x_TD, dtype=dt).index_add(0, token_N, y_ND.to(dt))
    if moe.shared_experts is not None:
        y_TD = y_TD + moe.shared_experts(x_TD).to(dt)
    return y_TD.to(x_TD.dtype)


class StaticDecode:
    """The pool's decode step at fixed shapes, compiled once.

    Args:
        pool: the SlotPool whose cache it writes (no MTP caches are used).
        compile: wrap the step in `torch.compile` (else it runs eagerly: the fixed-shape reference).
        backend: torch.compile's backend ("inductor" fuses kernels; "eager" only traces, for tests).
    """

    def __init__(self, pool: SlotPool, compile: bool = True, backend: str = "inductor") -> None:
        model = pool.model
        for block in list(model.layers):
            if block.is_moe and not isinstance(block.mlp.experts, GroupedExperts):
                raise MinimoeError("the compiled decode step needs plain (not quantized) experts")
        self.pool = pool
        self.compile_s = 0.0  # seconds the first call took (compilation included)
        self._calls = 0
        # dynamic=False: every input has one shape for the whole run, so there is one graph. On CPU
        # inductor's C++ wrapper calls the kernels without a Python line per kernel (+2-19% tokens/s
        # at batch 1 on the bench's reference config, for ~10 s more compiling)
        cpu = pool.cache.layers[0].a.device.type == "cpu"
        options = {"cpp_wrapper": True} if backend == "inductor" and cpu else None
        self._fn = (
            torch.compile(self._step, dynamic=False, fullgraph=True, backend=backend, options=options)
            if compile
            else self._step
        )

    def _step(self, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """tokens, pos: (slots,) -> (slots, V) logits; writes each row's entry at pos."""
        pool, model = self.pool, self.pool.model
        B, L = pool.slots, pool.max_len
        device = tokens.device
        mask = (torch.arange(L, device=device)[None, :] <= pos[:, None])[:, None, None, :]  # (B, 1, 1, L)
        cos, sin = model.rope_cos[pos][:, None], model.rope_sin[pos][:, None]  # (B, 1, d/2)
        rows = torch.arange(B, device=device)[:, None]  # (B, 1)
        x = model.embed_tokens(tokens[:, None])  # (B, 1, D)
        for block, layer in zip(model.layers, pool.cache.layers):
            cache = _Rows(layer, rows, pos[:, None], B, L)
            x = x + block.self_attn(block.input_layernorm(x), cos, sin, cache, L - 1, attn_mask=mask)
            h = block.post_attention_layernorm(x)
            if block.is_moe:
                x = x + fixed_shape_moe(block.mlp, h.view(B, -1)).view(B, 1, -1)
            else:
                x = x + block.mlp(h)
        return model.lm_head(model.norm(x))[:, 0]  # (B, V)

    @torch.no_grad()
    def warm_up(self) -> float:
        """Run the step once on an empty pool (so only free rows are written); seconds it took."""
        if self.pool.n:
            raise RuntimeError("warm_up needs an empty pool")
        device = self.pool.cache.layers[0].a.device
        # two tensors, not one passed twice: the graph would guard on `tokens is pos` and compile
        # again at the first real step
        tokens, pos = (torch.zeros(self.pool.slots, dtype=torch.long, device=device) for _ in range(2))
        t0 = time.perf_counter()
        with torch.no_grad():
            self._fn(tokens, pos)
        self.compile_s = time.perf_counter() - t0
        self._calls += 1
        return self.compile_s

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """What `SlotPool.decode` does, at fixed shapes: (n,) tokens -> (n, V) logits."""
        pool = self.pool
        n = pool.n
        padded = torch.zeros(pool.slots, dtype=torch.long, device=tokens.device)
        padded[:n] = tokens
        pos = torch.zeros(pool.slots, dtype=torch.long, device=tokens.device)
        pos[:n] = torch.tensor(pool.lengths, device=tokens.device)
        t0 = time.perf_counter()
        logits = self._fn(padded, pos)[:n]
        if self._calls == 0:
            self.compile_s = time.perf_counter() - t0
        self._calls += 1
        pool.advance([1] * n)
        return logits


@torch.no_grad()
def static_greedy(static: StaticDecode, prompts: list[list[int]], new_tokens: int) -> torch.Tensor:
    """Greedy continuations through the fixed-shape step: each prompt prefilled whole into its own
    row, then `new_tokens - 1` steps of `static.decode` (the first token comes from the prefill).

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
    for ids in prompts:
        logits = Prefill(pool, ids).step(len(ids))  # (1, V)
        pool.add(len(ids))
        first.append(logits.argmax(-1))
    tokens = [torch.cat(first)]  # each (n,)
    for _ in range(new_tokens - 1):
        tokens.append(static.decode(tokens[-1]).argmax(-1))
    while pool.n:
        pool.remove(pool.n - 1)
    return torch.stack(tokens, dim=1)
