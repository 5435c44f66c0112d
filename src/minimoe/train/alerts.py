"""Routing alerts the seeds ask for: an expert starved of tokens for a window of steps and a router
z-loss spike (seed "Optimal MoE": "any expert utilized <5%", "rapidly increasing z-loss"), and the
(token, slot) pairs a capacity factor dropped (seed "MyMoE").

Each training step only adds to a few small device tensors, so the hot path has no host sync;
`report()` reads them once, on logging steps. The streaks and the z-loss baseline start afresh when
a run is resumed; the sums of the logging window in progress come back with the checkpoint.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

# A step's z-loss counts as a spike against a running mean of the earlier logging windows' z-loss;
# this is how fast that mean follows a new window.
Z_BASELINE_MOMENTUM = 0.7


class RoutingMonitor:
    """Args:
    low_load: an expert is starved while its share of a step's (token, slot) pairs is under
        `low_load / E` (a fraction of the fair share; 0.4 is the seed's 5% at 8 experts); 0 = off.
    window: consecutive starved steps that raise the alert.
    z_spike: alert when a step's z-loss exceeds this multiple of the running mean; 0 = off.
    capacity: whether the model drops pairs over a capacity (then `report` counts them).
    """

    def __init__(self, low_load: float, window: int, z_spike: float, capacity: bool):
        self.low_load, self.window, self.z_spike, self.capacity = low_load, window, z_spike, capacity
        self._streak: torch.Tensor | None = None  # (L, E) consecutive starved steps
        self._load: torch.Tensor | None = None  # (L, E) pairs routed this logging window
        self._dropped: torch.Tensor | None = None  # (L,) pairs dropped this logging window
        self._z_max: torch.Tensor | None = None
        self._z_sum: torch.Tensor | None = None
        self._steps = 0
        self._layers: list[int] = []
        self._z_baseline: float | None = None
        self._warned: set[tuple[int, int]] = set()  # starved experts already reported in a warning

    @classmethod
    def from_config(cls, cfg) -> RoutingMonitor:
        t = cfg.train
        return cls(t.alert_low_load, t.alert_window, t.alert_z_spike, cfg.model.capacity_factor is not None)

    def count_dropped(self, moe_stats: dict) -> None:
        """Add one micro-batch's dropped pairs ({layer: MoEStats}); a no-op without a capacity."""
        if not self.capacity or not moe_stats:
            return
        d = torch.stack([moe_stats[i].dropped for i in sorted(moe_stats)])
        self._dropped = d if self._dropped is None else self._dropped + d

    def observe(self, loads: dict[int, torch.Tensor], z: torch.Tensor) -> None:
        """One optimizer step: {layer: (E,) pairs per expert} summed over micro-batches and ranks, and
        the step's router z (the unweighted z-loss, so the alert works whatever z_loss_coef is)."""
        self._steps += 1
        z = z.detach().float()
        self._z_max = z if self._z_max is None else torch.maximum(self._z_max, z)
        self._z_sum = z if self._z_sum is None else self._z_sum + z
        if not loads:
            return
        self._layers = sorted(loads)
        load = torch.stack([loads[i].float() for i in self._layers])  # (L, E)
        self._load = load if self._load is None else self._load + load
        if self.low_load > 0 and self.window > 0:
            share = load / load.sum(-1, keepdim=True).clamp_min(1)
            starved = share < self.low_load / load.shape[-1]
            streak = torch.zeros_like(load) if self._streak is None else self._streak
            self._streak = (streak + 1) * starved

    def state_dict(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> dict:
        """The logging window's sums so far, for a checkpoint (every rank must call it: the dropped
        counts are summed over data-parallel ranks here)."""

        def cpu(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.detach().cpu()

        dropped = reduce_sum(self._dropped.clone()) if self._dropped is not None else None
        return {
            "load": cpu(self._load), "dropped": cpu(dropped), "z_max": cpu(self._z_max),
            "z_sum": cpu(self._z_sum), "steps": self._steps, "layers": list(self._layers),
        }  # fmt: skip

    def load_state_dict(self, state: dict, device: torch.device, holds_dropped: bool = True) -> None:
        """Restore the window of `state_dict`. holds_dropped: False on every rank but one, since the
        saved dropped counts are already the sum over ranks."""

        def dev(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        self._load, self._z_max, self._z_sum = dev(state["load"]), dev(state["z_max"]), dev(state["z_sum"])
        dropped = dev(state["dropped"])
        self._dropped = dropped if dropped is None or holds_dropped else torch.zeros_like(dropped)
        self._steps, self._layers = state["steps"], list(state["layers"])

    def report(self, reduce_sum: Callable[[torch.Tensor], torch.Tensor]) -> tuple[dict, list[str]]:
        """Fields for this logging step's metrics row and the warnings to log; resets the window.

        Args:
            reduce_sum: sums a tensor over data-parallel ranks (the dropped counts are per rank).
        Returns:
            ({"alerts": [...], "dropped": {layer: pairs}, "dropped_frac": ...}, warning lines).
        """
        alerts, warnings = [], []
        if self._streak is not None and self._load is not None:  # one host sync, on a logging step
            streak = self._streak.cpu()
            share = (self._load / self._load.sum(-1, keepdim=True).clamp_min(1)).cpu()
            for li, e in (streak >= self.window).nonzero().tolist():
                layer = self._layers[li]
                steps, frac = int(streak[li, e]), round(float(share[li, e]), 4)
                alerts.append(
                    {"kind": "low_load", "layer": layer, "expert": e, "share": frac, "steps": steps}
                )
                if (layer, e) not in self._warned:
                    warnings.append(
                        f"layer {layer} expert {e} has received under {self.low_load:g} x its fair share of "
                        f"tokens for {steps} steps (share {frac:.2%} in the last window): routing collapse?"
                    )
            self._warned = {(a["layer"], a["expert"]) for a in alerts}
        if self._steps:
            z_max, z_mean = self._z_max.item(), self._z_sum.item() / self._steps
            base = self._z_baseline
            if self.z_spike > 0 and base is not None and base > 0 and z_max > self.z_spike * base:
                alerts.append({"kind": "z_spike", "z": z_max, "baseline": base})
                warnings.append(
                    f"router z spiked to {z_max:.4g}, {z_max / base:.1f} x its running mean {base:.4g}: "
                    "routing instability?"
                )
            m = Z_BASELINE_MOMENTUM
            self._z_baseline = z_mean if base is None else m * base + (1 - m) * z_mean
        out: dict = {"alerts": alerts}
        if self.capacity and self._dropped is not None:
            dropped = reduce_sum(self._dropped.clone()).tolist()
            pairs = self._load.sum().item() if self._load is not None else 0
            out["dropped"] = {str(i): int(d) for i, d in zip(sorted(self._layers), dropped)}
            out["dropped_frac"] = sum(dropped) / pairs if pairs else 0.0
        self._load = self._dropped = self._z_max = self._z_sum = None
        self._steps = 0
        return out, warnings
