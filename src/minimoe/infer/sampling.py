"""Turning next-token logits into a token: repetition penalty, temperature, top-k, top-p, greedy
(pure functions, plus the small `SamplingParams` record that carries the knobs)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from minimoe.errors import MinimoeError

# fp64 sums of up to ~10^6 probabilities stay well within this of their exact value
TOP_P_SLACK = 1e-9


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token. temperature 0 = greedy; top_k 0 and top_p 1 switch filtering off;
    repetition_penalty 1 switches the penalty off."""

    temperature: float = 0.8
    top_k: int = 0
    top_p: float = 1.0
    repetition_penalty: float = 1.0

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0

    def validate(self) -> SamplingParams:
        """Raise MinimoeError naming the first bad field."""
        # written as `not (ok)` so that NaN, which fails every comparison, is refused too
        if not 0 <= self.temperature < math.inf:
            raise MinimoeError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise MinimoeError(f"top_k must be >= 0, got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise MinimoeError(f"top_p must be in (0, 1], got {self.top_p}")
        if not 0 < self.repetition_penalty < math.inf:
            raise MinimoeError(
                f"repetition_penalty must be a finite number > 0, got {self.repetition_penalty}"
            )
        return self


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Mask (B, V) logits outside the top-k and outside the smallest set with cumulative prob >= top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        probs = sorted_logits.double().softmax(-1)
        # drop a token when the mass strictly before it already reaches top_p (always keeps the first).
        # The sums run in fp64 and count as reaching top_p within TOP_P_SLACK: a set whose mass is top_p
        # exactly (six of ten equal tokens for 0.6) sums to a hair either side of it in floating point
        before = F.pad(probs.cumsum(-1)[..., :-1], (1, 0))
        drop_sorted = before >= top_p - TOP_P_SLACK
        drop_sorted[..., 0] = False  # a top_p within TOP_P_SLACK of 0 would drop it too
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL-style penalty (Keskar et al. 2019, as HF applies it) on tokens already in the context.

    A seen token's logit is divided by `penalty` when positive and multiplied by it when negative, so
    penalty > 1 always makes it less likely.

    Args:
        logits: (B, V) next-token logits.
        seen: (B, V) bool, True for tokens present in the prompt or generated so far.
        penalty: > 0; 1 leaves the logits unchanged.
    Returns:
        (B, V) logits.
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def process_logits(
    logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None = None
) -> torch.Tensor:
    """(B, V) raw logits -> (B, V) fp32 logits to take the argmax of (greedy) or to sample from: the
    repetition penalty, then temperature, top-k and top-p (filtered entries are -inf)."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits
    # from each row's largest logit down, so that a tiny temperature sends the others to -inf rather
    # than every logit to +-inf (whose softmax is NaN): its limit, the argmax, is what it samples. A
    # temperature below the dtype's smallest normal number would round to 0 and is taken as that number.
    finfo = torch.finfo(logits.dtype)
    top = logits.amax(-1, keepdim=True).clamp(min=finfo.min)
    return filter_logits((logits - top) / max(params.temperature, finfo.tiny), params.top_k, params.top_p)


def pick_tokens(
    logits: torch.Tensor,
    params: SamplingParams,
    seen: torch.Tensor | None,
    generators: list[torch.Generator] | None,
) -> torch.Tensor:
    """Choose one token per row.

    Each row samples with its own generator, so a row of a batch draws exactly what it would draw
    alone with the same seed.

    Args:
        logits: (B, V) raw next-token logits.
        params: the sampling knobs.
        seen: (B, V) bool tokens already in each row's context (repetition penalty), or None.
        generators: one per row (ignored when greedy).
    Returns:
        (B,) int64 token ids.
    """
    x = process_logits(logits, params, seen)
    if params.greedy:
        return x.argmax(-1)
    probs = x.softmax(-1)
    assert generators is not None and len(generators) == probs.shape[0]
    return torch.cat([torch.multinomial(p, 1, generator=g) for p, g in zip(probs, generators)])


def token_logprobs(
    logits: torch.Tensor, tokens: list[int], k: int
) -> list[tuple[float, tuple[tuple[int, float], ...]]]:
    """The model's own log-probabilities of chosen tokens: log-softmax of the raw logits, before the
    repetition penalty, temperature, top-k and top-p that chose them (as OpenAI reports them).

    Args:
        logits: (B, V) raw next-token logits.
        tokens: the token chosen in each row.
        k: how many of each row's most likely tokens to list too.
    Returns:
        per row (logprob of its token, ((token, logprob), ...) of the k most likely, most likely first).
    """
    lp = torch.log_softmax(logits.float(), -1)  # (B, V)
    chosen = lp.gather(-1, torch.tensor(tokens, device=lp.device).unsqueeze(-1)).squeeze(-1).tolist()
    if k:
        values, ids = lp.topk(min(k, lp.shape[-1]), dim=-1)
        tops = [tuple(zip(i, v)) for i, v in zip(ids.tolist(), values.tolist())]
    else:
        tops = [()] * len(tokens)
    return list(zip(chosen, tops))
