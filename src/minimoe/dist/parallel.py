"""One object that tells the trainer how this launch splits the work: `parallelize(model, cfg, ctx)`.

| launch | dense weights | routed experts | data |
| --- | --- | --- | --- |
| one process | local | local | the whole batch |
| `dist.strategy=ddp` | replicated, gradients all-reduced (DDP) | replicated | a 1/W slice |
| `dist.strategy=fsdp` | sharded (FSDP2 per block) | sharded with their block | a 1/W slice |
| `dist.expert_parallel=E` | replicated (DDP) | 1/E per rank, all-to-all dispatch | a 1/W slice |
| `dist.pipeline_parallel=P` | blocks split into P stages | with their block | the whole batch, in micro-batches |

The trainer calls the same methods whatever the launch (`micro_step`, `reduce_step`, `eval_batch`,
`reduce_eval`, `finish_grads`, `clip_grad_norm`, `reduce_sum`, `gather_state`, `load_state`), so one
process runs exactly the code it ran before and the loop never branches on the kind of parallelism.
Checkpoints are always the one-process format: full tensors keyed by parameter name, for the weights
and for the optimizer state, written by rank 0; any launch can resume any checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from minimoe.config import DistConfig, RunConfig
from minimoe.dist.init import DistContext, all_gather_object, broadcast_state
from minimoe.errors import ConfigError
from minimoe.model.moe import MoEStats

log = logging.getLogger("minimoe.dist")

LOSS_PARTS = ("ce", "aux", "z", "mtp")  # the parts of the training loss, after the total
# what a step logs after its total loss: those parts, then the unweighted router z (summed over the
# MoE layers) that the z-spike alert watches whatever model.z_loss_coef is
LOGGED = (*LOSS_PARTS, "router_z")


@dataclass
class Parallel:
    """How this rank trains. Build it with `parallelize`.

    Attributes:
        kind: "single", "ddp", "fsdp", "ep" (expert parallel + DDP) or "pipeline".
        model: the module that owns this rank's parameters (the Transformer, sharded in place under
            FSDP/EP, or the pipeline stage); the optimizer and checkpoints use it.
        forward: what a training step calls (the DDP wrapper, or `model`).
        dp_rank, dp_size: this rank's slice of each global batch.
    """

    ctx: DistContext
    kind: str
    model: nn.Module
    forward: Any
    dp_rank: int = 0
    dp_size: int = 1
    expert_params: dict[str, nn.Parameter] = field(default_factory=dict)
    ep_group: Any = None
    replica_group: Any = None
    pipeline: Any = None  # PipelineRunner
    step_forward: Any = None  # what micro_step calls: `forward`, or a compiled version of it

    def __post_init__(self) -> None:
        if self.step_forward is None:
            self.step_forward = self.forward

    # ------------------------------------------------------------------ steps
    def micro_step(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        target_share: float,
        n_micro: int,
        last_micro: bool,
        autocast: Callable[[], contextlib.AbstractContextManager],
        scaler: torch.amp.GradScaler,
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict]:
        """Forward and backward of one micro-batch, whatever the parallelism; gradients accumulate.

        Args:
            x, y: (B, T) inputs and targets on this rank's device.
            target_share: the micro-batch's share of the step's target tokens (1 / n_micro when every
                micro-batch holds as many): the weight of its cross-entropy and MTP loss, each a mean over
                its targets, so the step's gradient is that of one batch holding every micro-batch.
            n_micro: micro-batches per optimizer step (grad_accum): the aux and z losses, means over
                the micro-batch's rows or routed tokens, are divided by it.
            last_micro: the last micro-batch of the step (the data-parallel gradient sync happens here).
            autocast: returns the precision context the forward runs in.
            scaler: the fp16 GradScaler (disabled otherwise).
        Returns:
            ((5,) [loss, ce, aux, z, mtp] of the micro-batch, weighted as in the backward and detached
            (summed over the step's micro-batches they give the step's losses); loads {layer: (E,)};
            the forward's per-layer MoEStats (under pipeline parallelism: every layer's loads and
            dropped pairs, summed over the stages; its losses are zero)).
        """
        if self.pipeline is not None:  # already summed over stages
            # one weight for all the losses: pipelines train on full windows (target_share = 1 / n_micro)
            with autocast():
                (ce, aux, z, router_z), loads, dropped = self.pipeline.train_step(x, y, target_share)
            vals = torch.stack([ce + aux + z, ce, aux, z, torch.zeros_like(ce), router_z]) * target_share
            zero = torch.zeros_like(ce)
            return vals, loads, {i: MoEStats(zero, zero, loads[i], dropped[i]) for i in loads}
        with self.no_sync(last_micro=last_micro):
            with autocast():
                out = self.step_forward(x, targets=y, return_logits=False)
            router = out.losses["aux"] + out.losses["z"]
            loss = (out.loss - router) * target_share + router / n_micro
            scaler.scale(loss).backward()
        weight = {"ce": target_share, "aux": 1 / n_micro, "z": 1 / n_micro, "mtp": target_share}
        parts = [out.losses[k].detach() * weight[k] for k in LOSS_PARTS]
        parts = torch.stack([*parts, out.router_z / n_micro])  # no host-to-device copy
        vals = torch.cat([loss.detach()[None], parts])
        return vals, {i: s.load for i, s in out.moe_stats.items()}, out.moe_stats

    def reduce_step(
        self, vals: torch.Tensor, loads: dict[int, torch.Tensor]
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """A step's losses averaged and its expert loads summed over the data-parallel ranks, in one
        all-reduce (pipeline stages already agree: unchanged)."""
        if not self.ctx.distributed or self.pipeline is not None:
            return vals, loads
        keys = sorted(loads)
        flat = torch.cat([vals] + [loads[i].float().reshape(-1) for i in keys])
        self.reduce_sum(flat)
        vals = flat[: vals.numel()] / self.dp_size
        return vals, (dict(zip(keys, flat[vals.numel() :].view(len(keys), -1))) if keys else {})

    def eval_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Forward only (call under no_grad and autocast): (mean cross-entropy, loads {layer: (E,)})."""
        if self.pipeline is not None:
            vals, loads = self.pipeline.eval_batch(x, y)
            return vals[0], loads
        out = self.model(x, targets=y, return_logits=False)
        return out.losses["ce"], {i: s.load for i, s in out.moe_stats.items()}

    def reduce_eval(
        self, total: float, count: int, loads: dict[int, torch.Tensor]
    ) -> tuple[float, int, dict[int, torch.Tensor]]:
        """Evaluation sums over the data-parallel ranks (pipeline stages already agree: unchanged)."""
        if not self.ctx.distributed or self.pipeline is not None:
            return total, count, loads
        sums = self.reduce_sum(torch.tensor([total, count], dtype=torch.float64, device=self.ctx.device))
        if loads:
            keys = sorted(loads)
            flat = self.reduce_sum(torch.stack([loads[i].float() for i in keys]))
            loads = dict(zip(keys, flat))
        return sums[0].item(), int(sums[1].item()), loads

    def merge_layers(self, per_layer: dict[str, Any]) -> dict[str, Any]:
        """{layer: value} of the whole model: pipeline stages each hold their own layers' (every rank
        must call it then); other launches hold every layer already."""
        if self.pipeline is None:
            return per_layer
        merged = {k: v for part in all_gather_object(per_layer, self.ctx) for k, v in part.items()}
        return dict(sorted(merged.items(), key=lambda kv: int(kv[0])))

    def no_sync(self, last_micro: bool):
        """Skip the gradient all-reduce on all but the last micro-batch of an accumulation."""
        if last_micro:
            return contextlib.nullcontext()
        if self.kind in ("ddp", "ep"):
            return self.forward.no_sync()
        if self.kind == "fsdp":
            return _fsdp_no_sync(self.model)
        return contextlib.nullcontext()

    def finish_grads(self) -> None:
        """After the last backward of a step: complete the expert gradients under EP."""
        if self.kind == "ep":
            from minimoe.dist.ep import sync_expert_grads

            sync_expert_grads(list(self.expert_params.values()), self.replica_group, self.ctx.world_size)

    def clip_grad_norm(self, max_norm: float) -> torch.Tensor:
        """Clip by the global gradient norm (over every rank's shard); returns that norm."""
        if self.kind in ("single", "ddp"):
            return torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        if self.kind == "fsdp":
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
            return norm.full_tensor() if hasattr(norm, "full_tensor") else norm
        expert_ids = {id(p) for p in self.expert_params.values()}
        params = [p for p in self.model.parameters() if p.grad is not None]
        local = [p for p in params if id(p) not in expert_ids]  # replicated (EP) or stage-local (PP)
        sharded = [p for p in params if id(p) in expert_ids]
        dev = self.ctx.device
        sq_local = _sq_norm([p.grad for p in local], dev)
        sq_sharded = _sq_norm([p.grad for p in sharded], dev)
        if self.kind == "pipeline":
            total_sq = sq_local + sq_sharded
            dist.all_reduce(total_sq)  # stages hold disjoint parameters
        else:
            dist.all_reduce(sq_sharded, group=self.ep_group)  # the EP group holds one copy of each expert
            total_sq = sq_local + sq_sharded
        norm = total_sq.sqrt()
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)  # torch's factor, from our norm
        return norm

    def reduce_sum(self, t: torch.Tensor) -> torch.Tensor:
        """Sum over the data-parallel ranks (in place); pipeline stages and one process: unchanged."""
        if self.ctx.distributed and self.kind != "pipeline":
            dist.all_reduce(t)
        return t

    # ------------------------------------------------------------------ checkpoints
    def gather_state(self, optimizer: torch.optim.Optimizer) -> tuple[dict | None, dict | None]:
        """Full model and optimizer state dicts (CPU tensors keyed by parameter name) on rank 0.

        Every rank must call it (it gathers). Returns (None, None) on the other ranks.
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
            get_optimizer_state_dict,
        )

        if self.kind == "pipeline":
            opts = StateDictOptions()  # stage-local tensors, merged on rank 0 below
            model_sd = _to_cpu(get_model_state_dict(self.model, options=opts))
            optim_sd = _to_cpu(get_optimizer_state_dict(self.model, optimizer, options=opts))
            parts = [None] * self.ctx.world_size if self.ctx.is_main else None
            dist.gather_object((model_sd, optim_sd), parts, dst=0)
            return _merge_stages(parts) if self.ctx.is_main else (None, None)

        opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
        model_sd = get_model_state_dict(self.model, options=opts)
        optim_sd = get_optimizer_state_dict(self.model, optimizer, options=opts)
        if self.kind == "ep":
            from minimoe.dist.ep import gather_experts

            for name, p in self.expert_params.items():
                full = gather_experts(p.detach(), self.ep_group)
                if self.ctx.is_main:
                    model_sd[name] = full.cpu()
                for key, t in sorted(optimizer.state.get(p, {}).items()):
                    if torch.is_tensor(t) and t.shape == p.shape:
                        full = gather_experts(t, self.ep_group)
                        if self.ctx.is_main:
                            optim_sd["state"][name][key] = full.cpu()
        if not self.ctx.is_main:
            return None, None
        return model_sd, optim_sd

    def load_state(
        self, optimizer: torch.optim.Optimizer | None, model_sd: dict | None, optim_sd: dict | None
    ) -> None:
        """Load full state dicts that rank 0 holds (other ranks pass None) into every rank's shard.

        Every rank must call it. Rank 0's dicts are broadcast; each rank keeps what it holds (its
        experts' slice under EP, its stage's parameters under pipeline parallelism).
        """
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            set_model_state_dict,
            set_optimizer_state_dict,
        )

        model_sd, optim_sd = broadcast_state((model_sd, optim_sd), self.ctx)
        if self.kind == "pipeline":
            own = set(_param_and_buffer_names(self.model))
            model_sd = {k: v for k, v in model_sd.items() if k in own}
            optim_sd = _filter_optim(optim_sd, own) if optim_sd is not None else None
        if self.kind == "ep":
            from minimoe.dist.ep import local_slice

            for name in self.expert_params:
                model_sd[name] = local_slice(model_sd[name], self.ep_group).clone()
                if optim_sd is not None and name in optim_sd["state"]:
                    st = optim_sd["state"][name]
                    for key, t in st.items():
                        if torch.is_tensor(t) and t.dim() > 0:
                            st[key] = local_slice(t, self.ep_group).clone()
        opts = StateDictOptions(full_state_dict=True)
        set_model_state_dict(self.model, model_sd, options=opts)
        if optimizer is not None and optim_sd is not None:
            set_optimizer_state_dict(self.model, optimizer, optim_sd, options=opts)


# ---------------------------------------------------------------------------------------- build


def check_launch(cfg: RunConfig, world_size: int) -> int:
    """Raise ConfigError (one sentence) for a dist config this launch cannot run.

    Returns:
        The data-parallel degree (ranks that read different data).
    """
    d, tc = cfg.dist, cfg.train
    if world_size <= 1:
        return 1
    if d.pipeline_parallel > 1:
        from minimoe.dist.pipeline import check_pipeline

        check_pipeline(cfg, world_size)
        dp = 1
    else:
        if d.expert_parallel > 1:
            if world_size % d.expert_parallel:
                raise ConfigError(
                    f"dist.expert_parallel ({d.expert_parallel}) must divide the number of processes ({world_size})"
                )
            if d.strategy == "fsdp":
                raise ConfigError(
                    "dist.expert_parallel works with dist.strategy=ddp (the dense weights are replicated)"
                )
            if cfg.model.n_routed_experts == 0:
                raise ConfigError("dist.expert_parallel needs a model with routed experts")
        dp = world_size
    if tc.batch_size % dp:
        raise ConfigError(
            f"train.batch_size ({tc.batch_size}) is the global batch and must be divisible by the "
            f"{dp} data-parallel processes"
        )
    if tc.precision == "fp16" and (d.strategy != "ddp" or d.expert_parallel > 1 or d.pipeline_parallel > 1):
        raise ConfigError("train.precision=fp16 runs distributed only with plain DDP; use bf16")
    return dp


def build_model(factory: Callable[[], nn.Module], cfg: RunConfig, ctx: DistContext) -> nn.Module:
    """The model this launch trains, built by `factory` from the same seed on every rank.

    Under FSDP only rank 0 builds the weights; the other ranks build the model on the meta device (no
    memory), and `parallelize` fills their shards from rank 0's, so no rank but 0 ever holds it whole.
    """
    d = cfg.dist
    if (
        ctx.distributed
        and not ctx.is_main
        and d.strategy == "fsdp"
        and d.pipeline_parallel == 1
        and d.expert_parallel == 1
    ):
        with torch.device("meta"):
            return factory()
    return factory()


def parallelize(model: nn.Module, cfg: RunConfig, ctx: DistContext) -> Parallel:
    """Wrap or shard a freshly built Transformer for this launch, on ctx.device.

    Every rank must build `model` identically (same seed; `build_model`) before calling. In one process
    the model is only moved to the device, and dist.* settings that need several processes are ignored
    with a warning (so a distributed run resumes in one process as it is).

    Args:
        model: the Transformer, anywhere (a pipeline moves only its stage, FSDP each rank's shards).
        cfg: the run config (dist section).
        ctx: from init_distributed.
    Returns:
        A Parallel describing what the trainer calls.
    """
    d = cfg.dist
    if not ctx.distributed:
        default = DistConfig()
        ignored = [k for k in ("strategy", "expert_parallel", "pipeline_parallel") if getattr(d, k) != getattr(default, k)]
        if ignored:
            log.warning(
                "%s need%s several processes (a torchrun launch); this one process runs all of it",
                ", ".join(f"dist.{k}={getattr(d, k)}" for k in ignored),
                "s" if len(ignored) == 1 else "",
            )
        model = model.to(ctx.device)
        return Parallel(ctx=ctx, kind="single", model=model, forward=model)
    dp = check_launch(cfg, ctx.world_size)
    if d.pipeline_parallel > 1:
        from minimoe.dist.pipeline import PipelineRunner

        runner = PipelineRunner(model, cfg, ctx)
        return Parallel(ctx=ctx, kind="pipeline", model=runner.module, forward=None, pipeline=runner)
    if d.strategy == "fsdp":
        from minimoe.dist.fsdp import apply_fsdp

        bf16 = ctx.device.type == "cuda" and cfg.train.precision == "bf16"
        apply_fsdp(model, ctx, bf16_params=bf16)
        return Parallel(ctx=ctx, kind="fsdp", model=model, forward=model, dp_rank=ctx.rank, dp_size=dp)
    from torch.nn.parallel import DistributedDataParallel as DDP

    model = model.to(ctx.device)
    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    if d.expert_parallel > 1:
        from torch.distributed.device_mesh import init_device_mesh

        from minimoe.dist.ep import shard_experts

        E = d.expert_parallel
        mesh = init_device_mesh(ctx.device.type, (ctx.world_size // E, E), mesh_dim_names=("dp", "ep"))
        ep_group = mesh.get_group("ep")
        replica_group = mesh.get_group("dp") if ctx.world_size > E else None
        expert_params = shard_experts(model, ep_group)
        # DDP averages the dense gradients; the expert shards are synced by finish_grads
        DDP._set_params_and_buffers_to_ignore_for_model(model, list(expert_params))
        wrapped = DDP(model, device_ids=device_ids, **_no_buffer_sync())
        return Parallel(
            ctx=ctx, kind="ep", model=model, forward=wrapped, dp_rank=ctx.rank, dp_size=dp,
            expert_params=expert_params, ep_group=ep_group, replica_group=replica_group,
        )  # fmt: skip
    # Buffers (the balancing bias) stay equal on every rank by construction: no per-step broadcast.
    # Every parameter takes part in every step (an expert without tokens still gets a zero gradient
    # through the stacked weights), so find_unused_parameters stays off.
    wrapped = DDP(model, device_ids=device_ids, **_no_buffer_sync())
    return Parallel(ctx=ctx, kind="ddp", model=model, forward=wrapped, dp_rank=ctx.rank, dp_size=dp)


# ---------------------------------------------------------------------------------------- helpers


def _no_buffer_sync() -> dict:
    """DDP keyword that turns off the per-forward buffer broadcast (renamed in newer torch)."""
    from torch.nn.parallel import DistributedDataParallel as DDP

    if "forward_sync_buffers" in inspect.signature(DDP.__init__).parameters:
        return {"forward_sync_buffers": False}
    return {"broadcast_buffers": False}


@contextlib.contextmanager
def _fsdp_no_sync(model):
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def _sq_norm(grads: list[torch.Tensor], device) -> torch.Tensor:
    if not grads:
        return torch.zeros((), device=device, dtype=torch.float32)
    return torch.stack([g.detach().float().pow(2).sum() for g in grads]).sum()


def _to_cpu(obj):
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_to_cpu(v) for v in obj)
    return obj


def _param_and_buffer_names(model: nn.Module) -> list[str]:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return list(get_model_state_dict(model).keys())


def _merge_stages(parts: list) -> tuple[dict, dict]:
    """Pipeline stages' (model, optimizer) dicts -> one full pair: states joined, each stage's
    param-group names added, in stage order, to the group with the same settings. A group's position
    is no guide: a stage may lack a group (MuonAdamW leaves out empty ones, such as the AdamW matrices
    of a stage without embedding, head or router)."""
    model_sd: dict = {}
    optim_sd: dict = {"state": {}, "param_groups": []}
    merged = optim_sd["param_groups"]
    for m_sd, o_sd in parts:
        model_sd.update(m_sd)
        optim_sd["state"].update(o_sd["state"])
        taken: set[int] = set()  # a stage's groups go to different groups (equal settings: in order)
        for group in o_sd["param_groups"]:
            settings = _group_settings(group)
            gi = next(
                (i for i, g in enumerate(merged) if i not in taken and _group_settings(g) == settings),
                len(merged),
            )
            if gi == len(merged):
                merged.append({**group, "params": []})
            merged[gi]["params"].extend(group["params"])
            taken.add(gi)
    return model_sd, optim_sd


def _group_settings(group: dict) -> dict:
    return {k: v for k, v in group.items() if k != "params"}


def _filter_optim(optim_sd: dict, names: set[str]) -> dict:
    """The part of a full optimizer state dict that belongs to parameters in `names`."""
    return {
        "state": {k: v for k, v in optim_sd["state"].items() if k in names},
        "param_groups": [
            {**g, "params": [p for p in g["params"] if p in names]} for g in optim_sd["param_groups"]
        ],
    }
