"""Per-row work on a batch's logits for the serving engine: each sequence's next token with its own
sampling parameters and generator (`pick`), and the rows whose logits are not numbers
(`quarantine`), whose sequences fail alone rather than failing the whole batch's sampling."""

from __future__ import annotations

import torch

from minimoe.errors import MinimoeError
from minimoe.infer.sampling import SamplingParams, pick_tokens


def pick(logits: torch.Tensor, seqs) -> list[int]:
    """One token per row of (n, V) logits, each with its sequence's own `sampling` and generator `gen`.
    Rows with the same parameters are filtered together; each sampled row draws from its own
    generator, so it draws what it would alone."""
    out = [0] * len(seqs)
    groups: dict[SamplingParams, list[int]] = {}
    for i, seq in enumerate(seqs):
        groups.setdefault(seq.sampling, []).append(i)
    for params, rows in groups.items():
        x = logits.index_select(0, torch.tensor(rows, device=logits.device))
        gens = None if params.greedy else [seqs[r].gen for r in rows]
        # a host sync per group and step: the tokens are streamed
        for r, t in zip(rows, pick_tokens(x, params, None, gens).tolist()):
            out[r] = t
    return out


def quarantine(
    logits: torch.Tensor | tuple[torch.Tensor, ...], seqs, broken: frozenset[int] = frozenset()
) -> frozenset[int]:
    """Fail the sequences whose rows of `logits` ((n, V) or (n, k, V), or a tuple of such tensors with n
    rows each, checked together) hold a NaN or +inf (or are all -inf): no token can be sampled from
    them. Their rows are zeroed in place, so that the batch's sampling and logprobs go on for the
    others. `broken` rows were failed before (not again).

    Returns:
        The indices of every failed row: `broken` and the new ones. One host sync.
    """
    parts = logits if isinstance(logits, tuple) else (logits,)
    # NaN propagates through amax; +inf, or -inf for a row of -inf only
    bad = torch.stack([(~torch.isfinite(x.amax(-1))).reshape(len(x), -1).any(-1) for x in parts]).any(0)
    if not bool(bad.any()):
        return broken
    rows = bad.nonzero().flatten().tolist()
    for x in parts:
        x[rows] = 0
    error = MinimoeError("the model's output for this sequence is not a number (NaN or inf)")
    for r in rows:
        if r not in broken:
            seqs[r].job.fail(error)
    return broken | frozenset(rows)
