"""Expert health from per-layer token counts: load fractions, MaxVio, dead and dominant experts."""

from __future__ import annotations

import torch

from minimoe.model.moe import max_vio


def expert_health(
    loads: dict[int, torch.Tensor],
    dominant_factor: float = 4.0,
    step_vio: dict[int, torch.Tensor] | None = None,
) -> dict:
    """Summarise token counts per expert, accumulated over a logging window.

    Args:
        loads: {layer: (E,) token counts} summed over the window.
        dominant_factor: an expert over this multiple of its fair share is dominant.
        step_vio: {layer: mean over the window's steps of each step's MaxVio} (MaxVio_batch, which
            the window's summed loads understate: imbalances of different steps cancel out); None: the
            MaxVio of `loads` (a window of one batch).
    Returns a JSON-ready dict: per-layer load fractions and MaxVio, the mean MaxVio over layers, and
    lists of (layer, expert) that got no tokens (dead) or more than `dominant_factor` x their fair share.
    """
    if not loads:
        return {}
    layers = sorted(loads)
    stacked = torch.stack([loads[i].float().cpu() for i in layers])  # (L, E); one host sync per log step
    frac = stacked / stacked.sum(-1, keepdim=True).clamp_min(1)
    if step_vio:
        vio = torch.stack([step_vio[i].float().cpu() for i in layers])  # (L,)
    else:
        vio = max_vio(stacked)  # (L,)
    n_exp = stacked.shape[-1]
    dead = [[layers[li], e] for li, e in (stacked == 0).nonzero().tolist()]
    dominant = [[layers[li], e] for li, e in (frac > dominant_factor / n_exp).nonzero().tolist()]
    return {
        "max_vio": {str(i): round(v, 4) for i, v in zip(layers, vio.tolist())},
        "max_vio_mean": round(vio.mean().item(), 4),
        "load_frac": {str(i): [round(x, 4) for x in row] for i, row in zip(layers, frac.tolist())},
        "dead_experts": dead,
        "dominant_experts": dominant,
    }
