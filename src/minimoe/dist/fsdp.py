"""FSDP2: parameters, gradients and optimizer state sharded over all ranks with `fully_shard`.

One FSDP unit per transformer block (and per MTP module), then the root (embedding, final norm, LM head),
as torchtitan does: a block's weights are all-gathered just before it runs and freed after, so peak
memory holds one block's full weights plus the shards. Only rank 0 builds the full model (on the CPU);
the other ranks build it on the meta device, and every rank's shard is filled from rank 0's weights.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from minimoe.dist.init import DistContext


def apply_fsdp(model: nn.Module, ctx: DistContext, bf16_params: bool = False) -> nn.Module:
    """Shard a Transformer in place with FSDP2, every rank's shard taken from rank 0's weights.

    Args:
        model: on rank 0 the built Transformer (on the CPU or ctx.device: each unit reaches ctx.device as
            it is sharded); on the other ranks the same Transformer, built on the meta device (no memory)
            or built in full.
        ctx: the process group context; the mesh spans all ranks.
        bf16_params: compute in bf16 with fp32 gradient reduction (MixedPrecisionPolicy); meant for
            GPUs with train.precision=bf16. The sharded master weights stay fp32.
    Returns:
        The same module, now an FSDPModule (its parameters are DTensors).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    full = model.state_dict() if ctx.is_main else {}  # its tensors outlive the sharding below

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
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model.to_empty(device=ctx.device)  # room for this rank's shards, filled below
    opts = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(model, full, options=opts)  # rank 0 sends each tensor, each rank keeps its shard
    for buf in model.buffers():  # not sharded; the RoPE tables are not in the state dict
        dist.broadcast(buf, src=0)
    return model
