"""The auxiliary-loss-free balancing step (DeepSeek-V3): after each optimizer step, move every routed
layer's selection bias toward the experts that received fewer tokens in that step.

The forward passes only report loads (`MoEStats.load`); this is the one place that turns them into
bias updates, so every training loop (pretraining, pipeline stages, fine-tuning, benchmarks) runs the
same rule once per optimizer step.
"""

from __future__ import annotations

import torch
from torch import nn


def add_loads(total: dict[int, torch.Tensor], loads: dict[int, torch.Tensor]) -> dict[int, torch.Tensor]:
    """Sum `loads` ({layer: (E,) counts} of one micro-batch) into `total` in place; returns `total`."""
    for i, load in loads.items():
        total[i] = total[i] + load if i in total else load
    return total


@torch.no_grad()
def balance_step(model: nn.Module, loads: dict[int, torch.Tensor]) -> None:
    """Move the balancing biases by one step of the aux-free rule.

    Args:
        model: anything with `moe_layers()` -> {layer index: MoE} (a Transformer or a pipeline stage;
            layers it does not hold are ignored).
        loads: {layer index: (E,) token counts of this optimizer step}, summed over micro-batches and,
            when distributed, all-reduced across ranks so every rank takes the same step.
    """
    moes = model.moe_layers()
    for i, load in loads.items():
        if i in moes:
            moes[i].gate.update_bias(load)  # a no-op for routers without the bias


def bias_ranges(model) -> dict[str, list[float]]:
    """{layer: [min, max]} of each MoE layer's aux-free bias (layers without one are left out). A host
    sync: call it on logging steps only."""
    out = {}
    for i, moe in model.moe_layers().items():
        b = moe.gate.e_score_correction_bias
        if b is not None:
            out[str(i)] = [round(b.min().item(), 5), round(b.max().item(), 5)]
    return out
