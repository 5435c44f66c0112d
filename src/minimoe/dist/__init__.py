"""Distributed training on torch.distributed: DDP, FSDP2, expert parallelism (all-to-all dispatch) and
pipeline parallelism, launched with `torchrun`; gloo on the CPU, NCCL on GPUs."""

from minimoe.dist.init import DistContext, init_distributed, shutdown
from minimoe.dist.parallel import Parallel, parallelize

__all__ = ["DistContext", "Parallel", "init_distributed", "parallelize", "shutdown"]
