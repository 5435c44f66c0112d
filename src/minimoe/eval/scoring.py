"""Batched log-likelihood of continuations: the one scoring path behind perplexity, multiple choice,
minimal pairs and the lm-eval adapter.

A request is a pair of token lists `(context, continuation)`. The model reads `context +
continuation[:-1]` and the score is the sum of log p(continuation token | everything before it).
Tokenisation follows lm-evaluation-harness (`TemplateLM._encode_pair`): whitespace at the end of the
context moves to the start of the continuation, the pair is encoded whole and the continuation is
what follows the context's own tokens; an empty context becomes the end-of-text token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F

from minimoe.errors import MinimoeError

# Log-softmax is taken over at most this many logits at once (rows * vocab): 64M floats = 256 MB.
LOGITS_PER_CHUNK = 1 << 26


class Score(NamedTuple):
    """Score of one continuation."""

    logprob: float  # sum of log-probabilities of the continuation tokens (nats)
    greedy: bool  # every continuation token is the argmax of its distribution
    n_tokens: int  # continuation tokens scored


def prefix_id(tokenizer) -> int:
    """The token an empty context becomes: end-of-text, which precedes every document in training."""
    return tokenizer.eos_id


def split_whitespace(context: str, continuation: str) -> tuple[str, str]:
    """Move whitespace at the end of `context` to the start of `continuation` (lm-eval's rule): BPE
    vocabularies attach the space to the following word, so " Paris" is one token, not " " + "Paris"."""
    n = len(context) - len(context.rstrip())
    if n:
        return context[:-n], context[-n:] + continuation
    return context, continuation


def encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    """Token ids of a (context, continuation) pair the way lm-evaluation-harness splits them.

    Args:
        tokenizer: a minimoe Tokenizer.
        context: conditioning text; empty (or whitespace only) means "start of a document".
        continuation: the text to score.
    Returns:
        (context ids, continuation ids). The whole string is encoded once and the continuation is
        what follows the context's own token count, so a token merged across the boundary belongs
        to the continuation's side as in lm-eval. An empty context is `[eos]`.
    """
    context, continuation = split_whitespace(context, continuation)
    if not context:
        cont = tokenizer.encode(continuation)
        p = prefix_id(tokenizer)
        # lm-eval: a continuation that already starts with the prefix token supplies it itself
        return (cont[:1], cont[1:]) if cont and cont[0] == p else ([p], cont)
    whole = tokenizer.encode(context + continuation)
    ctx = tokenizer.encode(context)
    return ctx, whole[len(ctx) :]


def model_context(model) -> int:
    """The longest input the model accepts (its RoPE table length)."""
    return int(model.cfg.max_position_embeddings)


def head_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """(N, D) last hidden states (before the final norm) -> (N, V) float32 log-probabilities.

    The same final norm and LM head as `Transformer.forward`, applied only to the rows we need, so a
    long window never materialises (B, T, V) logits.
    """
    return F.log_softmax(model.lm_head(model.norm(hidden)).float(), dim=-1)


@torch.no_grad()
def score_pairs(
    model,
    pairs: Sequence[tuple[Sequence[int], Sequence[int]]],
    batch_size: int = 16,
    max_len: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> list[Score]:
    """Log-likelihood of each continuation given its context, in batches.

    Args:
        model: a Transformer (eval mode is the caller's business).
        pairs: (context ids, continuation ids); a non-empty continuation needs a non-empty context
            (`encode_pair` supplies the end-of-text token).
        batch_size: sequences per forward pass. Requests are sorted longest first and right-padded:
            with causal attention the padding, which sits after every real token, cannot change them.
        max_len: input tokens per sequence (default: the model context). Contexts are cut from the
            left to fit; a continuation longer than this raises MinimoeError.
        on_batch: called with the number of requests finished after each batch (progress bars).
    Returns:
        One Score per pair, in input order.
    """
    if batch_size <= 0:
        raise MinimoeError(f"batch size must be positive, got {batch_size}")
    max_len = max_len or model_context(model)
    device = model.embed_tokens.weight.device
    seqs: list[list[int]] = []
    n_cont: list[int] = []
    for ctx, cont in pairs:
        if len(cont) > max_len:
            raise MinimoeError(
                f"a continuation of {len(cont)} tokens does not fit the model context of {max_len} tokens"
            )
        if cont and not ctx:
            raise ValueError("a continuation needs at least one context token (use encode_pair)")
        full = (list(ctx) + list(cont))[-(max_len + 1) :]
        seqs.append(full)
        n_cont.append(len(cont))
    out: list[Score | None] = [None] * len(pairs)
    for i, n in enumerate(n_cont):
        if n == 0:  # nothing to score: log 1
            out[i] = Score(0.0, True, 0)
    order = sorted((i for i in range(len(pairs)) if n_cont[i]), key=lambda i: -len(seqs[i]))
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        for i, s in zip(idx, _score_batch(model, [seqs[i] for i in idx], [n_cont[i] for i in idx], device)):
            out[i] = s
        if on_batch is not None:
            on_batch(len(idx))
    return out  # type: ignore[return-value]


def _score_batch(model, seqs: list[list[int]], n_cont: list[int], device) -> list[Score]:
    """Score one batch: `seqs[b]` holds input + final target, the last `n_cont[b]` targets count."""
    B, T = len(seqs), max(len(s) for s in seqs) - 1
    buf = torch.zeros(B, T + 1, dtype=torch.long)  # right padding with id 0: never read by real tokens
    rows_l, cols_l = [], []
    for b, (s, n) in enumerate(zip(seqs, n_cont)):
        buf[b, : len(s)] = torch.tensor(s, dtype=torch.long)
        L = len(s) - 1  # inputs in this row
        rows_l.append(torch.full((n,), b, dtype=torch.long))
        cols_l.append(torch.arange(L - n, L))  # hidden positions whose next token is a continuation token
    buf = buf.to(device)
    rows, cols = torch.cat(rows_l).to(device), torch.cat(cols_l).to(device)  # (N,), (N,)
    hidden = model(buf[:, :-1], num_logits_to_keep=1).hidden  # (B, T, D)
    targets = buf[rows, cols + 1]  # (N,)
    chunk = max(1, LOGITS_PER_CHUNK // model.lm_head.weight.shape[0])
    tok_lp, is_max = [], []
    for c in range(0, len(rows), chunk):
        lp = head_logprobs(model, hidden[rows[c : c + chunk], cols[c : c + chunk]])  # (n, V)
        t = targets[c : c + chunk]
        tok_lp.append(lp.gather(1, t[:, None]).squeeze(1))
        is_max.append(lp.argmax(-1) == t)
    tok_lp_N, is_max_N = torch.cat(tok_lp).double(), torch.cat(is_max)
    sums = torch.zeros(B, dtype=torch.float64, device=device).index_add_(0, rows, tok_lp_N)  # (B,)
    misses = torch.zeros(B, dtype=torch.long, device=device).index_add_(0, rows, (~is_max_N).long())
    # one host sync per batch
    return [Score(lp, m == 0, n) for lp, m, n in zip(sums.tolist(), misses.tolist(), n_cont)]


@torch.no_grad()
def token_logprobs(model, ids: Sequence[int]) -> torch.Tensor:
    """Log-probability of every token of `ids` after the first, from one plain forward pass.

    The slow, obviously correct path the tests compare `score_pairs` against.

    Returns:
        (len(ids) - 1,) float64 tensor: entry t is log p(ids[t + 1] | ids[: t + 1]).
    """
    x = torch.tensor([list(ids)], dtype=torch.long, device=model.embed_tokens.weight.device)
    logits = model(x[:, :-1]).logits[0].double()  # (T-1, V)
    return logits.log_softmax(-1).gather(1, x[0, 1:, None]).squeeze(1)
