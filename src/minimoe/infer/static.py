"""A decode step with fixed shapes, for `torch.compile` (gpt-fast's static cache, over the slot pool).

The eager pooled step (`SlotPool.decode`) reads rows [0, n) up to the longest length, so its shapes
change every step and a compiled version recompiles as the cache grows. This step always runs every
row of the pool (free rows are padding: they decode token 0 at position 0, which `SlotPool.add`
overwrites before the row is used) over all `max_len` positions, masked per row, so one compiled
graph serves every step. The MoE layers keep fixed shapes too (`fixed_shape_moe`): with few rows each
row gathers its selected experts' weights (reading rows x top-k experts), otherwise every expert runs
on every row weighted by the routing (zero for unselected experts, reading each expert once); both
are the routed dispatch's sum with no data-dependent shapes or host syncs. `SlotPool.decode` stays the
reference; tests compare the two.

Shape suffixes: T tokens (rows), D hidden, E experts, I expert intermediate.
"""

from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from minimoe.errors import MinimoeError
from minimoe.infer.slots import Prefill, SlotPool, _Rows
from minimoe.model.experts import GroupedExperts, _activate
from minimoe.model.router import route, router_scores


def fixed_shape_moe(moe, x_TD: torch.Tensor, gather: bool) -> torch.Tensor:
    """A MoE layer's output with no data-dependent shapes, two ways:

    - gather=False: every routed expert runs on every token, its output weighted by the routing
      (zero for experts not selected); a step reads each expert's weights once.
    - gather=True: each token's selected experts' weights are gathered for it, (T, K, ...); a step
      reads T * K experts instead of all E, which is what decoding a few rows is bound by (batch 1,
      top-2 of 8: a quarter of the routed weights).

    Args:
        moe: a minimoe MoE module with plain (not quantized) GroupedExperts.
        x_TD: (T, D) hidden states.
        gather: which of the two.
    Returns:
        (T, D) routed + shared output, equal to `moe(x)` up to the order of the sums.
    """
    gate, ex = moe.gate, moe.experts
    dt = torch.promote_types(x_TD.dtype, torch.float32)  # router math in fp32, as Router does
    scores_TE = router_scores(F.linear(x_TD.to(dt), gate.weight.to(dt)), gate.cfg.scoring_func)
    idx_TK, w_TK = route(scores_TE, gate.e_score_correction_bias, gate.cfg)
    if gather:  # X = K: the token's selected experts
        w_TX = w_TK.to(x_TD.dtype)
        up, gp, down = ex.up_proj[idx_TK], ex.gate_proj, ex.down_proj[idx_TK]
        gp = gp[idx_TK] if gp is not None else None
        proj, back = "td,txid->txi", "txi,txdi->td"
    else:  # X = E: every expert, weight 0 where not selected
        w_TX = torch.zeros_like(scores_TE).scatter(1, idx_TK, w_TK.to(dt)).to(x_TD.dtype)
        up, gp, down = ex.up_proj, ex.gate_proj, ex.down_proj
        proj, back = "td,xid->txi", "txi,xdi->td"
    up_TXI = torch.einsum(proj, x_TD, up)
    g_TXI = torch.einsum(proj, x_TD, gp) if gp is not None else None
    h_TXI = _activate(g_TXI, up_TXI) * w_TX[..., None]
    y_TD = torch.einsum(back, h_TXI, down).to(dt)
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
        # gather the selected experts while that reads fewer weights than running all of them
        cfg = model.cfg
        self.gather = pool.slots * cfg.num_experts_per_tok < cfg.n_routed_experts
        self.compile_s = 0.0  # seconds the first call took (compilation included)
        self._calls = 0
        # dynamic=False: every input has one shape for the whole run, so there is one graph
        self._fn = (
            torch.compile(self._step, dynamic=False, fullgraph=True, backend=backend)
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
                x = x + fixed_shape_moe(block.mlp, h.view(B, -1), self.gather).view(B, 1, -1)
            else:
                x = x + block.mlp(h)
        return model.lm_head(model.norm(x))[:, 0]  # (B, V)

    @torch.no_grad()
    def warm_up(self) -> float:
        """Run the step once on an empty pool (so only free rows are written); seconds it took."""
        if self.pool.n:
            raise RuntimeError("warm_up needs an empty pool")
        device = self.pool.cache.layers[0].a.device
        zeros = torch.zeros(self.pool.slots, dtype=torch.long, device=device)
        t0 = time.perf_counter()
        with torch.no_grad():
            self._fn(zeros, zeros)
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
