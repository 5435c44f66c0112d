"""Optimizers: AdamW with weight decay on matrices only (nanoGPT's rule: p.dim() >= 2), optionally 8-bit;
and Muon for the hidden matrices with AdamW for everything else (Moonlight's split).

Muon (momentum, then an approximate orthogonalisation of the update by a Newton-Schulz iteration) is
used for the hidden weight matrices: attention and FFN projections, shared and routed experts (an
(E, out, in) expert tensor is E matrices, orthogonalised one by one in a batch) and the MTP projection.
The token embedding, the LM head, the router, norms and biases stay on AdamW. The update is scaled by
0.2 * sqrt(max(out, in)) (Moonlight's rule), which gives it about the RMS of an AdamW update, so Muon
can share AdamW's learning rate; `train.muon_lr` sets its own.

The Newton-Schulz iteration here is batched: over an expert tensor's leading dimension (torch.optim.Muon
takes 2-D matrices only, so not expert tensors) and over all matrices of one shape, whatever parameter
they belong to (`newton_schulz_many`). It runs in bf16 when training does (bf16 autocast), as
torch.optim.Muon's always does, and in fp32 otherwise. tests/test_train.py checks steps against it.
"""

from __future__ import annotations

import math

import torch
import torch.optim.adamw as _adamw
from torch import nn

from minimoe.config import TrainConfig
from minimoe.errors import MinimoeError
from minimoe.params import muon_param_names

# the quintic Newton-Schulz coefficients of Keller Jordan's Muon (also torch.optim.Muon's defaults)
NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():  # tied weights appear once
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def by_matrix_shape(tensors: list[torch.Tensor]) -> list[list[int]]:
    """Indices of `tensors` grouped by the shape of their matrices, tall ones as their transposes: the
    tensors whose matrices one batched Newton-Schulz iteration can take together."""
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, t in enumerate(tensors):
        groups.setdefault(tuple(sorted(t.shape[-2:])), []).append(i)
    return list(groups.values())


def newton_schulz(
    g: torch.Tensor, steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Approximately orthogonalise each matrix of g (..., m, n): the quintic iteration of Muon, which maps
    the singular values into about [0.7, 1.2] and keeps the singular vectors. Batched over leading dims,
    computed in `dtype` (default g's; torch.optim.Muon and the reference Muon use bf16) and returned in
    g's dtype."""
    return newton_schulz_many([g], steps, eps, dtype)[0]


def newton_schulz_many(
    tensors: list[torch.Tensor], steps: int = 5, eps: float = 1e-7, dtype: torch.dtype | None = None
) -> list[torch.Tensor]:
    """`newton_schulz` of each tensor, with the matrices of every tensor that share a shape (tall ones
    transposed) stacked into one batched iteration: a model's many small matrices (`tiny` has 100, mostly
    experts' 128 x 192) then make a few large batched products, which two CPU threads share out, instead
    of a hundred small ones that a second thread barely speeds up (1.5-1.8x faster at `tiny`'s matrices on
    two threads; benchmarks/train_small.py --muon). Each matrix is still orthogonalised on its own."""
    a, b, c = NS_COEFFICIENTS
    mats = [g.reshape(-1, *g.shape[-2:]) for g in tensors]
    mats = [m.mT if m.size(-2) > m.size(-1) else m for m in mats]
    out: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for idx in by_matrix_shape(tensors):
        x = [mats[i].to(dtype or mats[i].dtype) for i in idx]
        x = torch.cat(x) if len(x) > 1 else x[0]  # never written in place: the steps below make new tensors
        x = x / x.norm(dim=(-2, -1), keepdim=True).clamp(min=eps)
        for _ in range(steps):
            gram = x @ x.mT
            x = torch.baddbmm(x, torch.baddbmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
        for i, part in zip(idx, x.split([mats[i].size(0) for i in idx])):
            g = tensors[i]
            out[i] = (part.mT if g.size(-2) > g.size(-1) else part).reshape(g.shape).to(g.dtype)
    return out


class MuonAdamW(torch.optim.Optimizer):
    """One optimizer with two kinds of parameter group: `use_muon=True` groups take Muon steps, the others
    AdamW steps. One object, so the trainer's LR schedule, gradient scaler, checkpoints and resume treat it
    like any optimizer. Each group keeps its own peak `base_lr`; the trainer sets lr = base_lr x schedule.

    Muon step for a matrix W with gradient G (momentum buffer B, nesterov):
        B <- mu B + G;  U <- G + mu B;  W <- W (1 - lr wd) - lr * 0.2 sqrt(max(out, in)) * NS(U)
    """

    def __init__(
        self,
        muon_params: list[torch.Tensor],
        adamw_groups: list[dict],
        lr: float,
        muon_lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        momentum: float = 0.95,
        muon_weight_decay: float = 0.1,
        ns_steps: int = 5,
        ns_dtype: torch.dtype | None = None,
    ):
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=0.0, momentum=momentum, ns_steps=ns_steps)
        self.ns_dtype = ns_dtype  # the Newton-Schulz iteration's dtype; None: the parameter's
        groups = [
            {"params": muon_params, "use_muon": True, "lr": muon_lr, "base_lr": muon_lr,
             "weight_decay": muon_weight_decay}
        ]  # fmt: skip
        for g in adamw_groups:
            groups.append({**g, "use_muon": False, "lr": lr, "base_lr": lr})
        super().__init__([g for g in groups if g["params"]], defaults)

    def load_state_dict(self, state_dict: dict) -> None:
        """torch's, then the AdamW step counters on their parameters' device as fp32, as the fused kernel
        takes them: torch leaves "step" where the state was read (the CPU) unless the saved group says
        fused, which this optimizer's groups, old checkpoints' included, do not."""
        super().load_state_dict(state_dict)
        for p, state in self.state.items():
            if "step" in state:
                state["step"] = state["step"].to(device=p.device, dtype=torch.float32)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            if group["use_muon"]:
                self._muon_group(group)
            else:
                self._adamw_group(group)
        return loss

    def _muon_group(self, group: dict) -> None:
        lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        bufs = []
        for p in params:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(state["momentum_buffer"])
        torch._foreach_mul_(bufs, mu)
        torch._foreach_add_(bufs, grads)
        # one shape at a time, so the copies the iteration needs are those of one shape's matrices, not all
        for idx in by_matrix_shape(params):
            ps = [params[i] for i in idx]
            nesterov = torch._foreach_add([grads[i] for i in idx], [bufs[i] for i in idx], alpha=mu)
            updates = newton_schulz_many(nesterov, group["ns_steps"], dtype=self.ns_dtype)
            torch._foreach_mul_(updates, [-lr * 0.2 * math.sqrt(max(p.size(-2), p.size(-1))) for p in ps])
            torch._foreach_mul_(ps, 1 - lr * wd)
            torch._foreach_add_(ps, updates)

    def _adamw_group(self, group: dict) -> None:
        params, grads, exp_avgs, exp_avg_sqs, steps = [], [], [], [], []
        for p in group["params"]:
            if p.grad is None:
                continue
            state = self.state[p]
            if not state:
                state["step"] = torch.zeros(
                    (), dtype=torch.float32, device=p.device
                )  # fused kernels: on p's device
                state["exp_avg"] = torch.zeros_like(p)
                state["exp_avg_sq"] = torch.zeros_like(p)
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            steps.append(state["step"])
        if not params:
            return
        p = params[0]
        beta1, beta2 = group["betas"]
        _adamw.adamw(
            params, grads, exp_avgs, exp_avg_sqs, [], steps, amsgrad=False, beta1=beta1, beta2=beta2,
            lr=group["lr"], weight_decay=group["weight_decay"], eps=group["eps"], maximize=False,
            fused=p.device.type in ("cpu", "cuda"),
        )  # fmt: skip


def build_optimizer(model: nn.Module, tc: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    betas = (tc.beta1, tc.beta2)
    if tc.optimizer == "muon":
        if any(type(p).__name__ == "DTensor" for p in model.parameters()):
            raise MinimoeError(
                "train.optimizer=muon needs whole matrices; it runs in one process, under DDP, expert or "
                "pipeline parallelism, not with FSDP's sharded parameters (use adamw there)"
            )
        names = muon_param_names(model)
        if not tc.muon_experts:  # the routed experts' stacks (not the shared experts) go to AdamW
            names = {n for n in names if ".mlp.experts." not in n}
        muon, rest = [], []
        seen = set()
        for n, p in model.named_parameters():
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (muon if n in names else rest).append(p)
        decay = [p for p in rest if p.dim() >= 2]  # the embedding / LM head and routers
        no_decay = [p for p in rest if p.dim() < 2]
        adamw_groups = [
            {"params": decay, "weight_decay": tc.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        return MuonAdamW(
            muon, adamw_groups, lr=tc.lr, muon_lr=tc.muon_lr if tc.muon_lr is not None else tc.lr,
            betas=betas, muon_weight_decay=tc.weight_decay, ns_steps=tc.muon_ns_steps,
            # under bf16 autocast the iteration runs in bf16 too, as the reference Muon's does: 2.0x faster
            # at `tiny`'s matrices on two CPU threads (benchmarks/train_small.py --muon); fp32 and fp16 runs
            # keep it in fp32
            ns_dtype=torch.bfloat16 if tc.precision == "bf16" else None,
        )  # fmt: skip
    groups = param_groups(model, tc.weight_decay)
    if tc.optimizer == "adamw8bit":
        try:
            import bitsandbytes as bnb  # type: ignore[import-not-found]
        except ImportError:
            raise MinimoeError(
                "train.optimizer=adamw8bit needs bitsandbytes (pip install bitsandbytes); use adamw instead"
            ) from None
        if device.type != "cuda":
            raise MinimoeError("train.optimizer=adamw8bit runs only on a CUDA GPU; use adamw on this device")
        return bnb.optim.AdamW8bit(groups, lr=tc.lr, betas=betas)
    # torch's fused AdamW kernel runs on CPU too: one pass per tensor instead of ~10 elementwise ops
    # (BENCHMARKS.md has the timing against the default single-tensor loop).
    fused = device.type in ("cuda", "cpu")
    return torch.optim.AdamW(groups, lr=tc.lr, betas=betas, fused=fused)
