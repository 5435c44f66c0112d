"""Process-group setup from `torchrun`'s environment, and the few collectives the trainer needs.

`torchrun --nproc-per-node N -m minimoe train ...` sets RANK, WORLD_SIZE and LOCAL_RANK (plus
MASTER_ADDR/MASTER_PORT). Without them, or with WORLD_SIZE=1, everything runs in one process and no
process group is created. The backend follows the device: NCCL on CUDA, gloo on the CPU.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from minimoe.errors import MinimoeError


@dataclass
class DistContext:
    """Where this process sits in the launch.

    Attributes:
        rank, world_size, local_rank: from torchrun (0, 1, 0 in a single process).
        device: this process's device (cuda:LOCAL_RANK on a GPU node).
        backend: "nccl", "gloo", or None when there is no process group.
        owns_group: True when init_distributed created the process group (and shutdown destroys it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    backend: str | None = None
    owns_group: bool = False

    @property
    def is_main(self) -> bool:
        """Rank 0 writes config, metrics, checkpoints and shows the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def env_world_size() -> int:
    """WORLD_SIZE from the environment (1 when not launched by torchrun)."""
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise MinimoeError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def resolve_device(name: str, local_rank: int = 0, what: str = "train.device") -> torch.device:
    """'auto' -> cuda:LOCAL_RANK when a GPU is visible, else cpu; other names are checked.

    Args:
        name: train.device ("auto", "cpu", "cuda", "cuda:1", ...).
        local_rank: this process's index on its node; picks the GPU for "auto" and "cuda".
        what: how error messages name the setting (e.g. "--device" for a command-line flag).
    """
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise MinimoeError(f"{what} '{name}' is not a valid torch device") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MinimoeError(f"{what} is cuda but no CUDA GPU is available")
        if dev.index is None:
            dev = torch.device("cuda", local_rank % torch.cuda.device_count())
        elif dev.index >= torch.cuda.device_count():
            raise MinimoeError(
                f"{what} '{name}' names GPU {dev.index}, but {torch.cuda.device_count()} are visible"
            )
    return dev


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistContext:
    """Join the process group that torchrun describes, or return a single-process context.

    Args:
        device: train.device; decides the backend (NCCL for CUDA, gloo otherwise).
        timeout_minutes: how long a collective may wait for a slow rank before failing.
    Returns:
        A DistContext. If a process group already exists (a caller set it up), it is reused and
        `owns_group` is False.
    """
    world = env_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world <= 1 and not dist.is_initialized():
        return DistContext(device=dev)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    owns = False
    if not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        for key in ("RANK", "MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise MinimoeError(f"WORLD_SIZE is {world} but {key} is not set; launch with torchrun")
        dist.init_process_group(backend, timeout=timedelta(minutes=timeout_minutes))
        owns = True
    return DistContext(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        device=dev,
        backend=dist.get_backend(),
        owns_group=owns,
    )


def shutdown(ctx: DistContext) -> None:
    """Destroy the process group if init_distributed created it."""
    if ctx.owns_group and dist.is_initialized():
        dist.destroy_process_group()
        ctx.owns_group = False


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        dist.barrier()


def broadcast_object(obj, ctx: DistContext, src: int = 0):
    """Rank `src`'s picklable `obj` on every rank (rank 0's value in one process)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


@dataclass(frozen=True)
class _TensorSlot:
    """Where a tensor stood in a state that `broadcast_state` sends: the order it is sent in, its shape
    and dtype."""

    index: int
    shape: tuple[int, ...]
    dtype: torch.dtype


def broadcast_state(state, ctx: DistContext, src: int = 0):
    """Rank `src`'s state (nested dicts, lists and tuples of tensors and plain values, such as a model's
    and an optimizer's full state dicts) on every rank; others pass anything (None).

    The structure goes as one small pickle; the tensors one at a time with `dist.broadcast`, on the GPU
    under NCCL, and arrive on the CPU. `broadcast_object` would pickle the whole state, put that copy
    on every rank's GPU under NCCL and unpickle it there: several times the state's size per rank.
    """
    if not ctx.distributed:
        return state
    tensors: list[torch.Tensor] = []

    def strip(x):
        if torch.is_tensor(x):
            tensors.append(x)
            return _TensorSlot(len(tensors) - 1, tuple(x.shape), x.dtype)
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items()}
        if type(x) in (list, tuple):
            return type(x)(strip(v) for v in x)
        return x

    skeleton = broadcast_object(strip(state) if ctx.rank == src else None, ctx, src)
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")

    def fill(x):
        if isinstance(x, _TensorSlot):
            if ctx.rank == src:
                dist.broadcast(tensors[x.index].to(device).contiguous(), src)
                return tensors[x.index]
            t = torch.empty(x.shape, dtype=x.dtype, device=device)
            dist.broadcast(t, src)
            return t.cpu()
        if isinstance(x, dict):
            return {k: fill(v) for k, v in x.items()}
        if type(x) in (list, tuple):
            return type(x)(fill(v) for v in x)
        return x

    return fill(skeleton)


def all_gather_object(obj, ctx: DistContext) -> list:
    """Every rank's `obj`, in rank order."""
    if not ctx.distributed:
        return [obj]
    out: list = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def main_first(fn, ctx: DistContext):
    """Run `fn()` on rank 0, then on the other ranks (for work that fills a shared cache, such as
    tokenizing the data). A MinimoeError on rank 0 is raised on every rank instead of leaving the
    others waiting.
    """
    if not ctx.distributed:
        return fn()
    result, error = None, None
    if ctx.is_main:
        try:
            result = fn()
        except MinimoeError as e:
            error = str(e)
    error = broadcast_object(error, ctx)
    if error is not None:
        raise MinimoeError(error)
    if not ctx.is_main:
        result = fn()
    return result


def on_main(fn, ctx: DistContext) -> None:
    """Run `fn()` on rank 0 only; its MinimoeError is raised on every rank."""
    error = None
    if ctx.is_main:
        try:
            fn()
        except MinimoeError as e:
            error = str(e)
    error = broadcast_object(error, ctx)
    if error is not None:
        raise MinimoeError(error)
