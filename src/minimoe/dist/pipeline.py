"""Pipeline parallelism: the transformer blocks split into P contiguous stages, one per rank, run
with a `torch.distributed.pipelining` schedule (1F1B or GPipe) over micro-batches.

Stage 0 holds the embedding, the last stage the final norm and LM head; every parameter keeps its
full-model name (`layers.5.mlp...`), so checkpoints are the one-process format. Each stage adds its
MoE layers' auxiliary and z losses to the backward pass where they arise (a gradient-injection node,
as Megatron-LM does), so they need not travel to the last stage; their values, the expert loads and
the loss are summed across stages for logging and for the aux-free bias.

Supported: dense and MoE layers, aux-free bias, aux/z losses, dropout, activation checkpointing.
Refused (one sentence each in `check_pipeline`): MTP, tied embeddings, combining with data or expert
parallelism, torch.compile.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from minimoe.config import RunConfig
from minimoe.dist.init import DistContext
from minimoe.errors import ConfigError


class _AttachLoss(torch.autograd.Function):
    """Identity on `x` whose backward also gives `loss` a gradient of 1: adds `loss` to the objective
    without carrying its value to the last stage."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
        ctx.loss_shape, ctx.loss_dtype = loss.shape, loss.dtype
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=grad.device)


def split_layers(num_hidden_layers: int, n_stages: int) -> list[range]:
    """Contiguous, balanced block ranges per stage; earlier stages get the extra blocks (the last stage
    also runs the LM head)."""
    base, extra = divmod(num_hidden_layers, n_stages)
    out, start = [], 0
    for s in range(n_stages):
        n = base + (s < extra)
        out.append(range(start, start + n))
        start += n
    return out


def check_pipeline(cfg: RunConfig, world_size: int) -> None:
    """Raise ConfigError (one sentence) for a pipeline setup this implementation does not run."""
    P, mc = cfg.dist.pipeline_parallel, cfg.model
    if P != world_size:
        raise ConfigError(
            f"dist.pipeline_parallel ({P}) must equal the number of processes ({world_size}): "
            "pipeline stages do not combine with data parallelism here"
        )
    if cfg.dist.expert_parallel > 1:
        raise ConfigError("dist.pipeline_parallel does not combine with dist.expert_parallel")
    if P > mc.num_hidden_layers:
        raise ConfigError(f"dist.pipeline_parallel ({P}) is larger than model.num_hidden_layers ({mc.num_hidden_layers})")
    if mc.mtp_depth:
        raise ConfigError("dist.pipeline_parallel does not support MTP; set model.mtp_depth=0")
    if mc.tie_word_embeddings:
        raise ConfigError(
            "dist.pipeline_parallel needs untied embeddings (first and last stage differ); "
            "set model.tie_word_embeddings=false"
        )
    if cfg.train.compile:
        raise ConfigError("dist.pipeline_parallel does not support train.compile")
    n_micro = cfg.dist.pp_microbatches or P
    if cfg.train.batch_size % n_micro:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) must be divisible by the "
            f"{n_micro} pipeline micro-batches (dist.pp_microbatches)"
        )
    if cfg.dist.pp_schedule == "1f1b" and n_micro < P:
        raise ConfigError(
            f"dist.pp_schedule=1f1b needs at least as many micro-batches as stages "
            f"(dist.pp_microbatches={n_micro} < {P})"
        )


class PipelineStageModule(nn.Module):
    """One stage of a Transformer: blocks `layer_ids`, plus the embedding (first stage) or the final norm
    and LM head (last stage). Built from a full model, sharing its modules and parameter names.

    forward: (B, T) token ids (first stage) or (B, T, D) hidden states -> (B, T, D) hidden states, or
    (B, T, V) logits on the last stage.
    """

    def __init__(self, model: nn.Module, layer_ids: range, first: bool, last: bool):
        super().__init__()
        self.cfg = model.cfg
        self.first, self.last = first, last
        self.embed_tokens = model.embed_tokens if first else None
        self.dropout = model.dropout
        self.layers = nn.ModuleDict({str(i): model.layers[i] for i in layer_ids})
        self.norm = model.norm if last else None
        self.lm_head = model.lm_head if last else None
        self.register_buffer("rope_cos", model.rope_cos, persistent=False)
        self.register_buffer("rope_sin", model.rope_sin, persistent=False)
        self.gradient_checkpointing = model.gradient_checkpointing
        self.loss_scale = 1.0  # set by the runner: 1 / (grad_accum * micro-batches) while training
        self.reset_stats()

    def reset_stats(self) -> None:
        """Clear the per-step sums of routing statistics."""
        self.loads: dict[int, torch.Tensor] = {}
        self.dropped: dict[int, torch.Tensor] = {}  # pairs a capacity dropped, per layer
        self.aux_sum: torch.Tensor | float = 0.0
        self.z_sum: torch.Tensor | float = 0.0
        self.router_z_sum: torch.Tensor | float = 0.0  # the unweighted z the spike alert watches

    def moe_layers(self) -> dict:
        return {int(i): b.mlp for i, b in self.layers.items() if b.is_moe}

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        x = self.dropout(self.embed_tokens(h)) if self.first else h  # (B, T, D)
        T = x.shape[1]
        cos, sin = self.rope_cos[:T], self.rope_sin[:T]
        for i, block in self.layers.items():
            if self.gradient_checkpointing and self.training:
                x, st = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x, st = block(x, cos, sin)
            if st is None:
                continue
            self.loads[int(i)] = self.loads.get(int(i), 0) + st.load
            self.dropped[int(i)] = self.dropped.get(int(i), 0) + st.dropped
            self.aux_sum = self.aux_sum + st.aux_loss.detach()
            self.z_sum = self.z_sum + st.z_loss.detach()
            if st.router_z is not None:
                self.router_z_sum = self.router_z_sum + st.router_z
            extra = st.aux_loss + st.z_loss
            if self.training and extra.requires_grad:
                x = _AttachLoss.apply(x, extra * self.loss_scale)
        if self.last:
            x = self.lm_head(self.norm(x))  # (B, T, V)
        return x


def _stage_shapes(cfg: RunConfig, first: bool, last: bool, micro: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Meta tensors shaped like a stage's input and output for one micro-batch of `micro` sequences.

    The residual stream stays fp32 under autocast (fp32 embeddings plus bf16 branches promote to fp32);
    the LM head's logits follow autocast.
    """
    T, D, V = cfg.train.seq_len, cfg.model.hidden_size, cfg.model.vocab_size
    meta = torch.device("meta")
    if first:
        x = torch.empty(micro, T, dtype=torch.long, device=meta)
    else:
        x = torch.empty(micro, T, D, dtype=torch.float32, device=meta, requires_grad=True)
    if last:
        dt = torch.bfloat16 if cfg.train.precision == "bf16" else torch.float32
        y = torch.empty(micro, T, V, dtype=dt, device=meta, requires_grad=True)
    else:
        y = torch.empty(micro, T, D, dtype=torch.float32, device=meta, requires_grad=True)
    return x, y


class PipelineRunner:
    """Owns this rank's stage and the schedule; runs training steps and evaluation batches.

    Args:
        model: the full Transformer, built identically on every rank (on the CPU is enough: only this
            rank's stage is moved to `ctx.device`).
        cfg: the run config (dist.pipeline_parallel = world size, checked by `check_pipeline`).
        ctx: the process group context; stage s runs on rank s.
    """

    def __init__(self, model: nn.Module, cfg: RunConfig, ctx: DistContext):
        from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

        check_pipeline(cfg, ctx.world_size)
        P = cfg.dist.pipeline_parallel
        self.ctx, self.n_stages, self.stage_idx = ctx, P, ctx.rank
        self.first, self.last = ctx.rank == 0, ctx.rank == P - 1
        ranges = split_layers(cfg.model.num_hidden_layers, P)
        self.module = PipelineStageModule(model, ranges[ctx.rank], self.first, self.last).to(ctx.device)
        self.n_micro = cfg.dist.pp_microbatches or P
        # Static shapes: without them the stage infers them by running an extra forward at the first
        # step, which would count that forward's routing statistics (and draw from the RNG).
        in_args, out_args = _stage_shapes(cfg, self.first, self.last, cfg.train.batch_size // self.n_micro)
        self.stage = PipelineStage(
            self.module, ctx.rank, P, ctx.device, input_args=in_args, output_args=out_args
        )
        schedule_cls = Schedule1F1B if cfg.dist.pp_schedule == "1f1b" else ScheduleGPipe
        # The loss is divided by the micro-batch count here rather than by the schedule: its
        # scale_grads divides every accumulated gradient at each step, which would also shrink the
        # gradients of earlier gradient-accumulation steps.
        self.schedule = schedule_cls(self.stage, self.n_micro, loss_fn=self._loss_fn, scale_grads=False)
        # every MoE layer of the full model, in a fixed order, so stages can sum their statistics
        self.moe_ids = [i for i in range(cfg.model.num_hidden_layers) if cfg.model.is_moe_layer(i)]
        self.n_experts = cfg.model.n_routed_experts

    def _loss_fn(self, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=-100)
        return ce * self.module.loss_scale

    def _stats(
        self, ce_sum: torch.Tensor, n_forwards: int
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Sum this stage's numbers over all stages: ([ce, aux, z, router_z] means per forward, loads per
        layer, pairs dropped by a capacity per layer)."""
        m, dev = self.module, self.ctx.device
        vals = (
            torch.stack(
                [
                    ce_sum.float(),
                    torch.as_tensor(m.aux_sum, device=dev).float(),
                    torch.as_tensor(m.z_sum, device=dev).float(),
                    torch.as_tensor(m.router_z_sum, device=dev).float(),
                ]
            )
            / n_forwards
        )
        E = max(self.n_experts, 1)
        L = len(self.moe_ids)
        loads_LE = torch.zeros(L, E, device=dev)
        dropped_L = torch.zeros(L, device=dev)
        for j, i in enumerate(self.moe_ids):
            if i in m.loads:
                loads_LE[j] = m.loads[i].float()
                dropped_L[j] = m.dropped[i].float()
        flat = torch.cat([vals, dropped_L, loads_LE.reshape(-1)])
        dist.all_reduce(flat)  # each number lives on exactly one stage; the sum gathers them
        n = len(vals)
        dropped = {i: flat[n + j].long() for j, i in enumerate(self.moe_ids)}
        loads = {i: flat[n + L + j * E : n + L + (j + 1) * E] for j, i in enumerate(self.moe_ids)}
        return flat[:n], loads, dropped

    def train_step(
        self, x: torch.Tensor, y: torch.Tensor, loss_scale: float
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor], dict[int, torch.Tensor]]:
        """Forward and backward of one batch through all stages; gradients accumulate in the stage.

        Args:
            x, y: (B, T) inputs and targets (the same batch on every rank; stages use what they need).
            loss_scale: factor on the loss (1 / grad_accum).
        Returns:
            ([ce, aux, z, router_z] of the batch, identical on every rank; loads {layer: (E,)} and the pairs a
            capacity dropped {layer: int64 scalar}, summed over micro-batches and stages).
        """
        m = self.module
        m.loss_scale = loss_scale / self.n_micro  # mean over micro-batches, as one batch in one process
        m.reset_stats()
        losses: list[torch.Tensor] = []
        x, y = x.to(self.ctx.device), y.to(self.ctx.device)
        if self.first:
            self.schedule.step(x)
        elif self.last:
            self.schedule.step(target=y, losses=losses)
        else:
            self.schedule.step()
        ce_sum = (
            torch.stack([loss.detach() for loss in losses]).sum() / m.loss_scale
            if self.last
            else torch.zeros((), device=self.ctx.device)
        )
        return self._stats(ce_sum, self.n_micro)

    @torch.no_grad()
    def eval_batch(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """Forward only, one stage after another with send/recv (no micro-batches, any batch size).

        Returns:
            ([ce, aux, z, router_z] of the batch on every rank, loads {layer: (E,)}).
        """
        m, dev = self.module, self.ctx.device
        m.reset_stats()
        B, T = x.shape
        if self.first:
            h = x.to(dev)
        else:
            h = torch.empty(B, T, self.module.cfg.hidden_size, dtype=torch.float32, device=dev)
            dist.recv(h, src=self.stage_idx - 1)
        out = m(h)
        if not self.last:
            dist.send(out.float().contiguous(), dst=self.stage_idx + 1)
            ce = torch.zeros((), device=dev)
        else:
            ce = F.cross_entropy(out.float().flatten(0, 1), y.to(dev).flatten(), ignore_index=-100)
        vals, loads, _ = self._stats(ce, 1)
        return vals, loads
