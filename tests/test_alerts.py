"""Routing alerts (seed "Optimal MoE": starved experts, z-loss spikes) and capacity-dropped counts
(seed "MyMoE"): the monitor's rules with hand-made loads, and the fields a real training run writes."""

from __future__ import annotations

import json
import logging

import pytest
import torch

from minimoe.model.moe import MoE, MoEStats, capacity_keep, expert_capacity
from minimoe.train.alerts import Z_BASELINE_MOMENTUM, RoutingMonitor
from minimoe.train.run import train_from_config
from minimoe.train.trainer import Trainer
from tiny import TINY_TRAIN

NO_REDUCE = lambda t: t  # noqa: E731 - one process


def _loads(*rows):
    return {i: torch.tensor(r, dtype=torch.float32) for i, r in zip((1, 2), rows)}


def _low(report):
    return [(a["layer"], a["expert"], a["steps"]) for a in report[0]["alerts"] if a["kind"] == "low_load"]


def test_starved_expert_alerts_after_window_consecutive_steps_and_warns_once():
    m = RoutingMonitor(low_load=0.4, window=3, z_spike=0, capacity=False)
    fair = [25.0] * 8  # share 12.5% each
    starved = [4.9] + [95.1 / 7] * 7  # expert 0 at 4.9%: under 5% = 0.4 x 1/8
    edge = [5.1] + [94.9 / 7] * 7  # 5.1%: not starved
    z = torch.tensor(0.0)
    for _ in range(2):
        m.observe(_loads(starved, edge), z)
    assert _low(m.report(NO_REDUCE)) == []  # 2 steps < window
    m.observe(_loads(starved, edge), z)
    rep = m.report(NO_REDUCE)
    assert _low(rep) == [(1, 0, 3)] and len(rep[1]) == 1 and "layer 1 expert 0" in rep[1][0]
    (alert,) = rep[0]["alerts"]
    assert alert["share"] == round(4.9 / 100, 4)
    m.observe(_loads(starved, edge), z)
    rep = m.report(NO_REDUCE)
    assert _low(rep) == [(1, 0, 4)] and rep[1] == []  # still starved: in the metrics, warned once
    m.observe(_loads(fair, edge), z)  # one fair step ends the streak
    for _ in range(2):
        m.observe(_loads(starved, edge), z)
    assert _low(m.report(NO_REDUCE)) == []  # 2 starved steps since: a window total would say 4 of 5


def test_starvation_threshold_is_a_fraction_of_the_fair_share():
    # 64 experts: fair share 1.56%, so 1.2% is not starved (an absolute 5% would flag every expert)
    m = RoutingMonitor(low_load=0.4, window=1, z_spike=0, capacity=False)
    load = [1.2] + [98.8 / 63] * 63
    m.observe({3: torch.tensor(load)}, torch.tensor(0.0))
    assert _low(m.report(NO_REDUCE)) == []
    m.observe({3: torch.tensor([0.5] + [99.5 / 63] * 63)}, torch.tensor(0.0))
    assert _low(m.report(NO_REDUCE)) == [(3, 0, 1)]


def test_starvation_edges_a_share_at_the_threshold_a_second_episode_and_window_zero():
    """A share exactly at the threshold is not starved; an expert that recovers and starves again is
    warned about again; alert_window=0 turns the alert off (as alert_low_load=0 does)."""
    m = RoutingMonitor(low_load=0.5, window=1, z_spike=0, capacity=False)
    at = {1: torch.tensor([1.0, 3.0, 2.0, 2.0])}  # expert 0 at 1/8 = 0.5 x the fair share 1/4
    m.observe(at, torch.tensor(0.0))
    assert _low(m.report(NO_REDUCE)) == []
    low, fair = {1: torch.tensor([0.0, 4.0, 2.0, 2.0])}, {1: torch.tensor([2.0, 2.0, 2.0, 2.0])}
    warned = []
    for loads in (low, low, fair, low):
        m.observe(loads, torch.tensor(0.0))
        warned.append(len(m.report(NO_REDUCE)[1]))
    assert warned == [1, 0, 0, 1]
    off = RoutingMonitor(low_load=0.5, window=0, z_spike=0, capacity=False)
    off.observe(low, torch.tensor(0.0))
    assert off.report(NO_REDUCE)[0]["alerts"] == []


def test_no_z_spike_against_a_zero_baseline():
    m = RoutingMonitor(low_load=0, window=0, z_spike=2.0, capacity=False)
    m.observe({}, torch.tensor(0.0))
    m.report(NO_REDUCE)
    m.observe({}, torch.tensor(1e-9))
    assert m.report(NO_REDUCE)[0]["alerts"] == []


def test_z_loss_spike_against_the_running_mean_of_earlier_windows():
    m = RoutingMonitor(low_load=0, window=0, z_spike=2.0, capacity=False)
    for z in (0.010, 0.012):  # first window: the baseline, no alert possible
        m.observe({}, torch.tensor(z))
    assert m.report(NO_REDUCE)[0]["alerts"] == []
    base = 0.011
    for z in (0.012, 0.020):  # 0.020 < 2 x 0.011
        m.observe({}, torch.tensor(z))
    assert m.report(NO_REDUCE)[0]["alerts"] == []
    base = Z_BASELINE_MOMENTUM * base + (1 - Z_BASELINE_MOMENTUM) * 0.016
    m.observe({}, torch.tensor(0.010))
    m.observe({}, torch.tensor(0.030))  # a spike inside a window is not averaged away
    fields, warnings = m.report(NO_REDUCE)
    (alert,) = fields["alerts"]
    assert alert["kind"] == "z_spike"
    assert alert["z"] == pytest.approx(0.030) and alert["baseline"] == pytest.approx(base)
    assert len(warnings) == 1 and "router z spiked" in warnings[0]


def test_a_z_spike_is_reported_in_its_own_window_only():
    m = RoutingMonitor(low_load=0, window=0, z_spike=2.0, capacity=False)
    kinds = []
    for z in (1.0, 5.0, 1.0):  # the baseline, a spike over 2 x 1.0, then back under 2 x 2.2
        m.observe({}, torch.tensor(z))
        kinds.append([a["kind"] for a in m.report(NO_REDUCE)[0]["alerts"]])
    assert kinds == [[], ["z_spike"], []]


def test_a_restored_window_averages_the_router_z_of_its_steps_before_the_checkpoint():
    """A checkpoint inside a logging window keeps its z sum and its step count: the resumed monitor's first
    window mean (its fresh baseline) counts the steps before the checkpoint too."""
    m = RoutingMonitor(low_load=0, window=0, z_spike=2.0, capacity=False)
    for _ in range(2):
        m.observe({}, torch.tensor(1.0))
    back = RoutingMonitor(low_load=0, window=0, z_spike=2.0, capacity=False)
    back.load_state_dict(m.state_dict(NO_REDUCE), torch.device("cpu"))
    back.observe({}, torch.tensor(1.0))
    assert back.report(NO_REDUCE)[0]["alerts"] == []  # the baseline: 1.0, the mean of 3 steps
    back.observe({}, torch.tensor(2.5))
    (alert,) = back.report(NO_REDUCE)[0]["alerts"]
    assert alert["kind"] == "z_spike" and alert["baseline"] == pytest.approx(1.0)


def test_dropped_pairs_are_summed_over_micro_batches_layers_and_ranks():
    m = RoutingMonitor(low_load=0, window=0, z_spike=0, capacity=True)
    zero = torch.zeros(())
    for d1, d2 in ((3, 0), (5, 7)):  # two micro-batches
        stats = {i: MoEStats(zero, zero, torch.ones(4), torch.tensor(d)) for i, d in ((2, d2), (1, d1))}
        m.count_dropped(stats)
    m.observe({1: torch.full((4,), 10.0), 2: torch.full((4,), 10.0)}, zero)  # 80 pairs routed
    fields, _ = m.report(lambda t: t * 2)  # two ranks that dropped the same
    assert fields["dropped"] == {"1": 16, "2": 14}
    assert fields["dropped_frac"] == pytest.approx(30 / 80)
    assert "dropped" not in RoutingMonitor(0, 0, 0, capacity=False).report(NO_REDUCE)[0]


def test_a_restored_window_counts_the_dropped_pairs_on_one_rank_only():
    """The saved dropped counts are already summed over ranks: restored on every rank, only one keeps
    them, so the next report's sum over ranks counts them once."""
    zero = torch.zeros(())
    m = RoutingMonitor(low_load=0, window=0, z_spike=0, capacity=True)
    m.count_dropped({1: MoEStats(zero, zero, torch.ones(4), torch.tensor(6))})
    state = m.state_dict(lambda t: t * 2)  # two ranks: 12 dropped in all
    ranks = []
    for holds in (True, False):
        r = RoutingMonitor(low_load=0, window=0, z_spike=0, capacity=True)
        r.load_state_dict(state, torch.device("cpu"), holds_dropped=holds)
        r.observe({1: torch.full((4,), 10.0)}, zero)
        ranks.append(r)
    per_rank = [r.report(NO_REDUCE)[0]["dropped"]["1"] for r in ranks]  # what report's all-reduce adds
    assert per_rank == [12, 0]


def test_dropped_pairs_count_the_tokens_the_loads_count():
    """A padded batch (a fine-tuning one): `dropped` counts the pairs of the tokens that reach a target,
    the ones `load` counts, so dropped / routed stays a fraction (padding's dropped pairs made it 2)."""
    from minimoe.config import ModelConfig

    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                      max_position_embeddings=64, first_k_dense_replace=1, intermediate_size=64,
                      n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
                      capacity_factor=1.0)  # fmt: skip
    moe = MoE(cfg).train()
    with torch.no_grad():
        moe.gate.weight[0] += 1.0  # most tokens pick expert 0, over its capacity
    x = torch.randn(2, 16, 32) + 1.0
    valid = torch.zeros(2, 16, dtype=torch.bool)
    valid[:, :2] = True  # two real tokens per row, then padding
    _, full = moe(x)
    _, stats = moe(x, valid)
    assert int(full.dropped) > int(stats.dropped)  # the padding's pairs are dropped too, not counted
    # recount the real tokens' pairs over capacity from the routing (padding takes slots as well)
    r = moe.gate(x)
    order = torch.sort(r.topk_idx.reshape(-1), stable=True)
    cap = expert_capacity(1.0, 32, 2, 4)
    keep = capacity_keep(order.values, r.counts, cap)
    tok = order.indices // 2
    assert int(stats.dropped) == int((~keep & valid.reshape(-1)[tok]).sum())
    assert 0 <= int(stats.dropped) <= stats.load.sum()


def test_per_step_work_makes_no_host_sync(monkeypatch):
    m = RoutingMonitor(low_load=0.4, window=2, z_spike=2.0, capacity=True)
    zero = torch.zeros(())

    def sync(*a, **k):
        raise AssertionError("host sync in the per-step path")

    for name in ("item", "tolist", "cpu", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for _ in range(3):
        m.count_dropped({1: MoEStats(zero, zero, torch.ones(4), torch.tensor(2))})
        m.observe({1: torch.tensor([0.0, 4.0, 4.0, 4.0])}, torch.tensor(0.5))
    monkeypatch.undo()
    assert _low(m.report(NO_REDUCE)) == [(1, 0, 3)]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_per_step_work_makes_no_cuda_sync():
    m = RoutingMonitor(low_load=0.4, window=2, z_spike=2.0, capacity=True)
    dev = torch.device("cuda")
    zero, two, z = (torch.tensor(v, device=dev) for v in (0.0, 2, 0.5))
    stats = {1: MoEStats(zero, zero, zero, two)}
    loads = {1: torch.tensor([0.0, 4.0, 4.0, 4.0], device=dev)}
    torch.cuda.set_sync_debug_mode("error")  # any synchronizing call raises
    try:
        for _ in range(3):
            m.count_dropped(stats)
            m.observe(loads, z)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert _low(m.report(NO_REDUCE)) == [(1, 0, 3)]


# ---------------------------------------------------------------- a real run


@pytest.fixture()
def corpus(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    words = "the cat sat on a mat and the dog ran to the red ball while a bird sang".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(400)]
    p = tmp_path / "corpus.txt"
    p.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return p


def test_training_writes_alerts_and_dropped_counts(tmp_path, corpus, monkeypatch, caplog):
    """A tiny run (MoE layer 1 and the MTP layer 2) with expert 0 shut out by its selection bias
    (starved), router weights scaled 20x before step 5 (a z-loss spike) and capacity factor 1 (drops):
    metrics.jsonl says so, with the counts the MoE layers reported."""
    seen: list[tuple[int, float]] = []  # (dropped, pairs routed) of each training forward, layer order
    orig_forward, orig_fit, orig_step = MoE.forward, Trainer.fit, Trainer._train_step

    def forward(self, x, valid=None):
        y, stats = orig_forward(self, x, valid)
        if self.training:
            seen.append((int(stats.dropped), float(stats.load.sum())))
        return y, stats

    def fit(self, *a, **k):
        with torch.no_grad():
            for moe in self.model.moe_layers().values():
                moe.gate.e_score_correction_bias[0] = -1e3
        return orig_fit(self, *a, **k)

    def train_step(self):
        if self.step == 4:
            with torch.no_grad():
                for moe in self.model.moe_layers().values():
                    moe.gate.weight.mul_(20)
        return orig_step(self)

    monkeypatch.setattr(MoE, "forward", forward)
    monkeypatch.setattr(Trainer, "fit", fit)
    monkeypatch.setattr(Trainer, "_train_step", train_step)
    with caplog.at_level(logging.WARNING, logger="minimoe.train"):
        train_from_config(
            overrides=[*TINY_TRAIN, f"data.path={corpus}", "train.max_steps=6", "train.eval_every=100",
                       "train.alert_window=3", "model.capacity_factor=1.0",
                       "train.lr=1e-4"],
            run_dir=tmp_path / "run", progress=False,
        )  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    low = [
        sorted((a["layer"], a["expert"], a["steps"]) for a in r["alerts"] if a["kind"] == "low_load")
        for r in rows
    ]
    assert low == [[], []] + [[(1, 0, s), (2, 0, s)] for s in (3, 4, 5, 6)]
    # router z: a spike where a step's unweighted z-loss (one step per window) is over 2 x the running
    # mean before it, at the default z_loss_coef of 0 (the model does not train with it)
    assert all(r["z"] == 0 and r["router_z"] > 0 for r in rows)
    spikes, want, base = {}, [], None
    for r in rows:
        z = r["router_z"]
        if base is not None and z > 2.0 * base:
            want.append((r["step"], base))
        base = z if base is None else Z_BASELINE_MOMENTUM * base + (1 - Z_BASELINE_MOMENTUM) * z
        for a in r["alerts"]:
            if a["kind"] == "z_spike":
                spikes[r["step"]] = a
    assert sorted(spikes) == [s for s, _ in want] and want[0][0] == 5  # nothing before the 20x scaling
    for step, b in want:
        assert spikes[step]["baseline"] == pytest.approx(b) and spikes[step]["z"] == pytest.approx(
            rows[step - 1]["router_z"]
        )
    # one micro-batch per step, two MoE layers: each row holds what the layers dropped in its step
    per_step = [seen[i : i + 2] for i in range(0, len(seen), 2)]
    assert [r["dropped"] for r in rows] == [{"1": a[0], "2": b[0]} for a, b in per_step]
    assert [r["dropped_frac"] for r in rows] == pytest.approx(
        [(a[0] + b[0]) / (a[1] + b[1]) for a, b in per_step]
    )
    assert min(d for d, _ in seen) >= 4 * 31 * 2 // 4  # three experts hold the pairs of four slots
    warned = [r.getMessage() for r in caplog.records]
    assert sum("expert 0 has received under 0.4" in w for w in warned) == 2  # once per layer
    assert sum("router z spiked" in w for w in warned) == len(want)


def test_a_logging_step_warns_of_at_most_three_experts_without_tokens(tmp_path, corpus, monkeypatch, caplog):
    """Experts 0 and 1 of both MoE layers shut out by their selection bias: the row lists the four dead
    experts and the log names the first three."""
    orig_fit = Trainer.fit

    def fit(self, *a, **k):
        with torch.no_grad():
            for moe in self.model.moe_layers().values():
                moe.gate.e_score_correction_bias[:2] = -1e3
        return orig_fit(self, *a, **k)

    monkeypatch.setattr(Trainer, "fit", fit)
    with caplog.at_level(logging.WARNING, logger="minimoe.train"):
        train_from_config(
            overrides=[*TINY_TRAIN, f"data.path={corpus}", "train.max_steps=2", "train.eval_every=100",
                       "train.log_every=2"],
            run_dir=tmp_path / "run", progress=False,
        )  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["dead_experts"] for r in rows if "loss" in r] == [[[1, 0], [1, 1], [2, 0], [2, 1]]]
    dead = [r.getMessage() for r in caplog.records if "received no tokens" in r.getMessage()]
    assert dead == [
        f"layer {li} expert {e} received no tokens in the last 2 steps" for li, e in ((1, 0), (1, 1), (2, 0))
    ]


@pytest.mark.parametrize("key", ["alert_low_load", "alert_window", "alert_z_spike"])
def test_negative_alert_settings_are_refused(key):
    from minimoe.config_yaml import build_run_config
    from minimoe.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        build_run_config("tiny", overrides=[f"train.{key}=-1"])
    assert str(e.value) == f"train.{key} must be >= 0, got -1" + (".0" if key != "alert_window" else "")
