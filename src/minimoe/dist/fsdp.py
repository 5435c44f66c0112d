"""FSDP2: parameters, gradients and optimizer state sharded over all ranks with `fully_shard`.

One FSDP unit per transformer block (and per MTP module), then the root (embedding, final norm, LM head),
as torchtitan does: a block's weights are all-gathered just before it runs and freed after, so peak
memory holds one block's full weights plus the shards.
"""

from __future__ import annotations

import torch
from torch import nn

from minimoe.dist.init import DistContext


def apply_fsdp(model: nn.Module, ctx: DistContext, bf16_params: bool = False) -> nn.Module:
    """Shard a Transformer in place with FSDP2.

    Args:
        model: a Transformer built identically on every rank (same seed), on ctx.device.
        ctx: the process group context; the mesh spans all ranks.
        bf16_params: compute in bf16 with fp32 gradient reduction (MixedPrecisionPolicy); meant for
            GPUs with train.precision=bf16. The sharded master weights stay fp32.
    Returns:
        The same module, now an FSDPModule (its parameters are DTensors).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(ctx.device.type, (ctx.world_size,), mesh_dim_names=("dp",))
    mp = (
        MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if bf16_params
        else MixedPrecisionPolicy()
    )
    units = list(model.layers) + list(model.mtp)
    for i, unit in enumerate(units):
        # the last unit's weights are needed again right away by backward: keep them gathered
        fully_shard(unit, mesh=mesh, mp_policy=mp, reshard_after_forward=i < len(units) - 1)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return model
