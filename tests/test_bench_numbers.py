"""The arithmetic behind BENCHMARKS.md's numbers: tokens counted, timings kept, ratios, MFU, the bandwidth
ceiling, the fair comparison's choices and medians, and the scripts' intervals and tables.

Correctness only: every clock and every measuring process here is a fake; no test asserts a timing."""

from __future__ import annotations

import importlib
import json
import math
import os
import statistics
import sys
import types
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from minimoe.bench import measure as M
from minimoe.model.transformer import Transformer

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
REFERENCE = BENCHMARKS / "configs" / "hf-reference.yaml"
SMALLER = ["model.hidden_size=64", "model.num_hidden_layers=2", "model.kv_lora_rank=32", "model.vocab_size=512",
           "model.moe_intermediate_size=64", "model.intermediate_size=128", "model.max_position_embeddings=640",
           "train.batch_size=2", "train.seq_len=32"]  # fmt: skip


@pytest.fixture
def script(monkeypatch):
    """Import benchmarks/NAME.py as a module, the folder on sys.path as the scripts import each other."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


class Clock:
    """A perf_counter that moves only when a fake workload says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def _rc(*extra: str):
    return M.bench_config(None, str(REFERENCE), [*SMALLER, *extra])


# ------------------------------------------------------------------------------------- measure.py


def test_median_rates_leave_the_warm_up_out_and_keep_the_median(monkeypatch):
    """Each fn's first call (compiling, allocating) is not timed, and of the timed calls the median rate is
    kept, not the mean: one slow repeat under a burst of load does not move it."""
    clock = Clock()
    monkeypatch.setattr(M.time, "perf_counter", clock)
    seconds = {"a": iter([100.0, 1.0, 4.0, 1.0]), "b": iter([100.0, 2.0, 2.0, 2.0])}

    def fn(name: str):
        def run() -> int:
            clock.now += next(seconds[name])
            return 8

        return run

    cpu = torch.device("cpu")
    mem = {k: M.PeakMemory(cpu) for k in seconds}
    rates = M._median_rates({k: fn(k) for k in seconds}, 3, cpu, mem)
    assert rates == {"a": 8.0, "b": 4.0}  # mean 6 for "a"; a timed warm-up: median 2
    assert all(next(it, None) is None for it in seconds.values())  # one warm-up call, then 3 timed


def test_median_rates_take_turns_within_every_repeat(monkeypatch):
    """After one warm-up call each, the subjects take turns: a, b, a, b, ... (repeat i of every subject is
    one round, timed under the same load), not every repeat of one before the other's."""
    clock = Clock()
    monkeypatch.setattr(M.time, "perf_counter", clock)
    calls = []

    def fn(name: str):
        def run() -> int:
            calls.append(name)
            clock.now += 1.0
            return 1

        return run

    cpu = torch.device("cpu")
    M._median_rates({k: fn(k) for k in "ab"}, 3, cpu, {k: M.PeakMemory(cpu) for k in "ab"})
    assert calls == ["a", "b"] + ["a", "b"] * 3


def test_best_rate_is_the_best_batch(monkeypatch):
    """The matmul peak and the bandwidth are the best of their timed batches (the others were slowed by
    something else), each batch `n` calls long, n from the second (untimed) call."""
    clock = Clock()
    monkeypatch.setattr(M.time, "perf_counter", clock)
    # warm-up 0.1 s, calibration 0.1 s -> n = 2 calls per batch; batches of 2 x 0.5, 2 x 0.25, 2 x 1.0 s
    seconds = iter([0.1, 0.1, 0.5, 0.5, 0.25, 0.25, 1.0, 1.0])

    def fn() -> None:
        clock.now += next(seconds)

    assert M._best_rate(fn, 3.0, 3, torch.device("cpu")) == pytest.approx(2 * 3.0 / 0.5)


def _unsynced_clock_reads(events: list[str]) -> int:
    """Clock reads that follow a call with no device sync between them (on a GPU those time the kernel
    launches only)."""
    bad, last = 0, None
    for e in events:
        if e in ("call", "sync"):
            last = e
        elif e == "clock":
            bad += last == "call"
            last = None
    return bad


def test_the_clock_is_read_after_the_device_is_synchronised(monkeypatch):
    """On a CUDA device every clock read that ends a timed call comes after a device sync (kernels run
    asynchronously): in the repeats of a measurement and in the matmul peak's and bandwidth's batches."""
    events: list[str] = []
    now = [0.0]

    def clock() -> float:
        events.append("clock")
        return now[0]

    def fn() -> int:
        events.append("call")
        now[0] += 0.1
        return 1

    cuda = torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device=None: events.append("sync"))
    monkeypatch.setattr(M.time, "perf_counter", clock)
    cpu = torch.device("cpu")
    M._median_rates({"a": fn, "b": fn}, 3, cuda, {k: M.PeakMemory(cpu) for k in "ab"})
    assert events.count("call") == 8 and events.count("clock") == 12
    assert _unsynced_clock_reads(events) == 0, events
    events.clear()
    M._best_rate(fn, 1.0, 3, cuda)
    assert events.count("clock") == 2 + 6 and _unsynced_clock_reads(events) == 0, events
    assert _unsynced_clock_reads(["call", "clock", "call", "sync", "clock"]) == 1  # what it catches


def test_every_subject_counts_the_tokens_it_processed():
    """Training and prefill count every token of the (B, T) batch, a decode the new tokens of every
    sequence (not the prompt's, not one row's), on both sides."""
    from minimoe.bench.hf import hf_twin

    rc = _rc()
    cpu = torch.device("cpu")
    torch.manual_seed(0)
    model = Transformer(rc.model)
    subjects = [M.MinimoeSubject(model, rc, cpu), M.HFSubject(hf_twin(model), rc, cpu)]
    x = torch.randint(0, rc.model.vocab_size, (2, 8))
    prompts = torch.randint(0, rc.model.vocab_size, (3, 5))
    for s in subjects:
        assert s.train_step(x, x) == 16, s.name
        assert s.prefill(x) == 16, s.name
        assert s.decode(prompts, 4) == 12, s.name


def test_mfu_is_training_flops_per_token_over_the_measured_peak():
    """MFU counts a training token as 3 forwards (forward + backward), each 2 FLOPs per activated matrix
    entry: at least 6N for N activated matrix entries."""
    from minimoe.lab.flops import flops_per_token

    rc = _rc()
    f = flops_per_token(rc.model, rc.train.seq_len)
    assert f.train_per_token >= 6 * f.matmul_params
    assert M.mfu(rc, 1000.0, 2.0) == pytest.approx(1000.0 * f.train_per_token / 2e9)


def test_matmul_peak_counts_two_flops_per_multiply_add(monkeypatch):
    seen = []

    def fake_rate(fn, work, repeats, device):
        seen.append((tuple(fn().shape), work))
        return 4e9

    monkeypatch.setattr(M, "_best_rate", fake_rate)
    assert M.matmul_peak_gflops(torch.device("cpu"), torch.float32, size=16) == 4.0
    assert seen == [((16, 16), 2.0 * 16**3)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_matvec_bandwidth_weight_is_the_asked_size_in_its_own_dtype(monkeypatch, dtype):
    works = []

    def fake_rate(fn, work, repeats, device):
        works.append(work)
        return 2**30

    monkeypatch.setattr(M, "_best_rate", fake_rate)
    assert M.matvec_bandwidth_gib_s(torch.device("cpu"), dtype, mib=2) == 1.0
    assert works == [2 * 2**20] * 2


def test_decode_ceiling_reads_the_weights_in_the_measured_dtype():
    """bf16 weights are 2 bytes: the ceiling doubles against fp32's; the embedding lookup is not read."""
    from minimoe.params import count_params

    activated = count_params(_rc().model).activated
    assert M.decode_ceiling_tok_s(_rc(), 1.0) == pytest.approx(2**30 / (4 * activated))
    assert M.decode_ceiling_tok_s(_rc("train.precision=bf16"), 1.0) == pytest.approx(2**30 / (2 * activated))


# ------------------------------------------------------------------------------------- run.py


class FakeSubject(M.Subject):
    """Counts tokens as a real subject does, instantly."""

    def __init__(self, name: str) -> None:
        self.name = name

    def train_step(self, x, y):
        return x.numel()

    def prefill(self, x):
        return x.numel()

    def decode(self, prompts, new_tokens):
        return prompts.shape[0] * new_tokens


def test_progress_steps_match_the_calls_of_a_run():
    from minimoe.bench.run import steps_of

    settings = M.BenchSettings(repeats=2, new_tokens=2, prefill_shape=(1, 4),
                               decode_shapes={"decode_b1": (1, 4), "decode_b2": (2, 4)})  # fmt: skip
    rc = _rc()
    for against, subjects in ((None, ["minimoe"]), ("hf", ["minimoe", "hf"])):
        calls = []
        fakes = [FakeSubject(n) for n in subjects]
        list(M.run_bench(fakes, rc, torch.device("cpu"), settings, on_step=calls.append))
        assert 1 + len(calls) == steps_of(settings, against), against  # 1: the matmul peak


class FakeMinimoe(M.MinimoeSubject):
    """minimoe's side with a compiled decode, counting as `FakeSubject` does and logging its calls."""

    def __init__(self, log: list) -> None:
        self.name, self.log, self.static = "minimoe", log, {}

    def decode(self, prompts, new_tokens):
        self.log.append("minimoe")
        return prompts.shape[0] * new_tokens

    def decode_compiled(self, prompts, new_tokens, backend="inductor"):
        self.log.append("minimoe compiled")
        self.static[(prompts.shape[0], prompts.shape[1] + new_tokens)] = types.SimpleNamespace(compile_s=1.0)
        return prompts.shape[0] * new_tokens


class LoggedHF(FakeSubject):
    def __init__(self, log: list) -> None:
        super().__init__("hf")
        self.log = log

    def decode(self, prompts, new_tokens):
        self.log.append("hf")
        return prompts.shape[0] * new_tokens


@pytest.mark.parametrize("groups", [("decode", "compiled"), ("compiled",)])
def test_compiled_decode_takes_turns_with_the_other_sides_plain_decode(groups):
    """The compiled decode's ratio is taken against transformers' plain decode of the same repeats: the
    three (or, without the plain rows, the two) decodes take turns within every repeat, and the compiled
    row comes with the HF rates it is divided by; the progress bar counts every call."""
    from minimoe.bench.run import steps_of

    log: list = []
    settings = M.BenchSettings(repeats=2, new_tokens=2, decode_shapes={"decode_b1": (1, 4)}, groups=groups,
                               compiled_decode=True)  # fmt: skip
    steps: list = []
    out = dict(
        M.run_bench([FakeMinimoe(log), LoggedHF(log)], _rc(), torch.device("cpu"), settings, steps.append)
    )
    turn = (["minimoe"] if "decode" in groups else []) + ["hf", "minimoe compiled"]
    assert log == turn * 3  # the warm-up, then two repeats
    assert len(out["decode_b1_compiled"]["hf_decode_b1_rates"]) == 2
    assert list(out) == (["decode_b1"] if "decode" in groups else []) + ["decode_b1_compiled"]
    assert 1 + len(steps) == steps_of(settings, "hf")


def test_benchmark_ratios_mfu_and_ceiling_fractions(monkeypatch):
    """`benchmark`'s derived numbers: ratios minimoe / hf, each side's MFU from its own training rate, the
    published-peak MFU, and the batch-1 ceiling fraction of both sides (not of batch 8)."""
    import minimoe.bench.hf as hf
    import minimoe.bench.run as run

    rates = {
        "train": (30.0, 20.0),
        "prefill": (50.0, 100.0),
        "decode_b1": (6.0, 4.0),
        "decode_b8": (16.0, 8.0),
    }

    def fake_run_bench(subjects, rc, device, settings, on_step=None):
        for key, (ours, theirs) in rates.items():
            yield key, {f"{key}_tok_s": ours, f"hf_{key}_tok_s": theirs, f"peak_mem_{key}_mib": 1.0,
                        f"hf_peak_mem_{key}_mib": 2.0, f"{key}_rates": [ours], f"hf_{key}_rates": [theirs]}  # fmt: skip

    monkeypatch.setattr(hf, "hf_twin", lambda model: model)
    monkeypatch.setattr(hf, "max_logit_diff", lambda *a: 0.0)
    monkeypatch.setattr(M, "run_bench", fake_run_bench)
    monkeypatch.setattr(M, "matmul_peak_gflops", lambda *a: 10.0)
    monkeypatch.setattr(M, "published_peak_tflops", lambda device: 0.1)
    monkeypatch.setattr(run, "machine_bandwidth_gib_s", lambda device, dtype: 2.0)
    rc = _rc()
    r = run.benchmark(rc, "ref", M.BenchSettings(), against="hf")
    assert (r["train_ratio"], r["prefill_ratio"], r["decode_b1_ratio"]) == (1.5, 0.5, 1.5)
    assert r["mfu"] == pytest.approx(M.mfu(rc, 30.0, 10.0))
    assert r["hf_mfu"] == pytest.approx(M.mfu(rc, 20.0, 10.0))
    assert r["mfu_published"] == pytest.approx(M.mfu(rc, 30.0, 100.0))  # 0.1 TFLOP/s = 100 GFLOP/s
    ceiling = M.decode_ceiling_tok_s(rc, 2.0)
    assert r["decode_ceiling_tok_s"] == pytest.approx(ceiling)
    assert r["decode_b1_ceiling_fraction"] == pytest.approx(6.0 / ceiling)
    assert r["hf_decode_b1_ceiling_fraction"] == pytest.approx(4.0 / ceiling)
    assert "decode_b8_ceiling_fraction" not in r


def test_benchmark_ratio_is_the_median_of_the_ratios_of_its_repeats(monkeypatch):
    """Each ratio is taken within a repeat (the sides took turns in it), then the median over repeats, with
    the min-max and the 95% interval of the repeats' ratios beside it: not the ratio of the two sides'
    medians, which pairs one side's repeat with another repeat of the other."""
    import minimoe.bench.hf as hf
    import minimoe.bench.run as run
    from minimoe.bench.ratios import interval

    ours, theirs = [10.0, 20.0, 30.0], [10.0, 40.0, 10.0]  # medians 20 and 10; per repeat 1, 0.5, 3

    def fake_run_bench(subjects, rc, device, settings, on_step=None):
        for key in ("train", "decode_b1"):
            yield key, {f"{key}_tok_s": 20.0, f"hf_{key}_tok_s": 10.0, f"peak_mem_{key}_mib": 1.0,
                        f"hf_peak_mem_{key}_mib": 1.0, f"{key}_rates": ours, f"hf_{key}_rates": theirs}  # fmt: skip

    monkeypatch.setattr(hf, "hf_twin", lambda model: model)
    monkeypatch.setattr(hf, "max_logit_diff", lambda *a: 0.0)
    monkeypatch.setattr(M, "run_bench", fake_run_bench)
    monkeypatch.setattr(M, "matmul_peak_gflops", lambda *a: 10.0)
    monkeypatch.setattr(run, "machine_bandwidth_gib_s", lambda device, dtype: 2.0)
    r = run.benchmark(_rc(), "ref", M.BenchSettings(repeats=3), against="hf")
    assert r["train_ratio"] == 1.0 and r["train_ratios"] == [1.0, 0.5, 3.0]
    assert (r["train_ratio_min"], r["train_ratio_max"]) == (0.5, 3.0)
    assert r["train_ratio_ci95"] == pytest.approx(list(interval([1.0, 0.5, 3.0])))
    assert not any(k.endswith("_rates") for k in r)  # the per-repeat rates are not reported, their ratios are
    assert "| train | 20 | 1 | 10 | 1 | 1.00x (0.50-3.00, 95% " in run.format_table(r, against=True)


@pytest.mark.parametrize("policy", ["PASSIVE", "ACTIVE", None])
def test_benchmark_records_the_openmp_wait_policy_it_ran_under(monkeypatch, script, policy):
    """The in-process result and both tables name the OpenMP wait policy and thread count the process ran
    under (the policy moves the decode ratios)."""
    import minimoe.bench.run as run

    def fake_run_bench(subjects, rc, device, settings, on_step=None):
        yield "train", {"train_tok_s": 1.0, "peak_mem_train_mib": 1.0, "train_rates": [1.0]}

    if policy:
        monkeypatch.setenv("OMP_WAIT_POLICY", policy)
    else:
        monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.setattr(M, "run_bench", fake_run_bench)
    monkeypatch.setattr(M, "matmul_peak_gflops", lambda *a: 10.0)
    monkeypatch.setattr(run, "machine_bandwidth_gib_s", lambda device, dtype: 2.0)
    r = run.benchmark(_rc(), "ref", M.BenchSettings())
    want = policy or "unset"
    assert r["omp_wait_policy"] == want and r["threads"] == torch.get_num_threads()
    assert f"{r['threads']} threads, OMP_WAIT_POLICY={want}, fp32)" in run.format_table(r, against=False)
    head = {k: v for k, v in r.items() if not k.startswith("train")}  # vs_hf's header only
    head.update(hf_mfu=0.1, logits_max_abs_diff=0.0)
    assert f"{r['threads']} threads, OMP_WAIT_POLICY={want} on " in script("vs_hf").table("cmd", head)


def test_ratio_spread_has_an_interval_from_three_rounds():
    from minimoe.bench.ratios import add_ratio, spread

    r: dict = {}
    add_ratio(r, "x_ratio", [2.0, 1.0])
    assert r == {"x_ratio": 1.5, "x_ratios": [2.0, 1.0], "x_ratio_min": 1.0, "x_ratio_max": 2.0}
    assert spread(r, "x_ratio") == " (1.00-2.00, 2 rounds)" and spread({"x_ratio": 1.0}, "x_ratio") == ""
    add_ratio(r, "x_ratio", [2.0, 1.0, 1.5])
    assert spread(r, "x_ratio").startswith(" (1.00-2.00, 95% ") and spread(r, "x_ratio").endswith(
        ", 3 rounds)"
    )


def test_run_bench_reports_every_repeats_rate_in_order(monkeypatch):
    """`run_bench` keeps each side's tokens/s of every repeat (the rounds its ratios are taken in), besides
    their median."""
    clock = Clock()
    monkeypatch.setattr(M.time, "perf_counter", clock)
    seconds = {"minimoe": iter([9.0, 1.0, 2.0, 4.0]), "hf": iter([9.0, 4.0, 1.0, 2.0])}

    class Timed(FakeSubject):
        def train_step(self, x, y):
            clock.now += next(seconds[self.name])
            return 8

        def prefill(self, x):
            clock.now += 1.0
            return 1

    settings = M.BenchSettings(repeats=3, prefill_shape=(1, 4), decode_shapes={}, groups=("compute",))
    out = dict(M.run_bench([Timed("minimoe"), Timed("hf")], _rc(), torch.device("cpu"), settings))["train"]
    assert out["train_rates"] == [8.0, 4.0, 2.0] and out["hf_train_rates"] == [2.0, 8.0, 4.0]
    assert out["train_tok_s"] == out["hf_train_tok_s"] == 4.0


def test_the_ceiling_bandwidth_is_read_with_every_core(monkeypatch):
    import minimoe.bench.run as run

    seen = []
    monkeypatch.setattr(
        M, "matvec_bandwidth_gib_s", lambda device, dtype: seen.append(torch.get_num_threads())
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        run.machine_bandwidth_gib_s(torch.device("cpu"), torch.float32)
    finally:
        torch.set_num_threads(threads)
    assert seen == [os.cpu_count()]


def test_format_table_columns_hold_their_numbers():
    from minimoe.bench.run import format_table

    r = {"config": "c", "cpu": "cpu", "device": "cpu", "threads": 1, "dtype": "fp32", "torch": "t",
         "matmul_peak_gflops": 1.0, "mfu": 0.1, "hf_mfu": 0.05, "train_tok_s": 30.0, "peak_mem_train_mib": 300.0,
         "hf_train_tok_s": 20.0, "hf_peak_mem_train_mib": 200.0, "train_ratio": 1.5}  # fmt: skip
    table = format_table(r, against=True)
    assert "| measurement | minimoe tok/s | peak MiB | hf tok/s | hf peak MiB | minimoe / hf |" in table
    assert "| train | 30 | 300 | 20 | 200 | 1.50x |" in table


# ------------------------------------------------------------------------------------- fair.py


def test_fair_keeps_the_median_of_the_rounds_and_checks_transformers_alone_at_its_setting(monkeypatch):
    """The sides' numbers are the median over rounds (not the first round's); transformers alone runs
    under the HF side's setting in every round, and hf_alone_ratio is the median over rounds of the bench's
    HF side over it."""
    import minimoe.bench.fair as fair

    round_of = {"minimoe": iter([10.0, 30.0, 20.0]), "hf": iter([1.0, 5.0, 4.0])}

    def fake_worker(args, policy, threads, timeout=3600, module="minimoe.bench.fair"):
        task, side = args[0], args[1]
        if task == "bandwidth":
            return {"bandwidth_gib_s": 1.0}
        if task == "probe":  # minimoe fastest on 1 thread, transformers on 2
            fast = (side == "minimoe") == (threads == 1)
            return {"decode_b1_tok_s": 2.0 if fast else 1.0, "decode_b8_tok_s": 1.0, "prefill_tok_s": 1.0}
        return (
            {"decode_b1_tok_s": next(round_of[side])} if "decode" in args[args.index("--groups") + 1] else {}
        )

    envs = []

    class Done:
        returncode, stdout, stderr = 0, json.dumps({"decode_b1_tok_s": 2.0}), ""

    def fake_run(cmd, env=None, **kw):
        envs.append(env)
        return Done()

    monkeypatch.setattr(fair, "run_worker", fake_worker)
    monkeypatch.setattr(fair.subprocess, "run", fake_run)
    r = fair.fair_compare(["--config", "c.yaml"], rounds=3, settings=[("PASSIVE", 1), ("ACTIVE", 2)])
    assert r["settings"]["minimoe"]["threads"] == 1 and r["settings"]["hf"]["threads"] == 2
    assert r["decode_b1_tok_s"] == 20.0 and r["hf_decode_b1_tok_s"] == 4.0
    assert r["decode_b1_ratios"] == [10.0, 6.0, 5.0] and r["decode_b1_ratio"] == 6.0  # the rounds' median
    assert r["hf_alone_decode_b1_tok_s"] == 2.0 and r["hf_alone_ratio"] == 2.0
    assert r["hf_alone_ratios"] == [0.5, 2.5, 2.0]  # the bench's HF side over the alone process of each round
    assert len(envs) == 3 and all(
        e["OMP_NUM_THREADS"] == "2" and e["OMP_WAIT_POLICY"] == "ACTIVE" for e in envs
    )


def test_fair_ratio_is_the_median_of_the_ratios_of_its_rounds(monkeypatch):
    """A fair ratio is taken within each round (a minimoe process over the HF process that took turns with
    it), then the median over rounds, with the rounds' min-max and 95% interval."""
    import minimoe.bench.fair as fair

    round_of = {"minimoe": iter([10.0, 20.0, 30.0]), "hf": iter([10.0, 40.0, 10.0])}

    def fake_worker(args, policy, threads, timeout=3600, module="minimoe.bench.fair"):
        task, side = args[0], args[1]
        if task == "bandwidth":
            return {"bandwidth_gib_s": 1.0}
        if task == "probe":
            return {"decode_b1_tok_s": 1.0, "decode_b8_tok_s": 1.0, "prefill_tok_s": 1.0}
        return {"decode_b1_tok_s": next(round_of[side])}

    class Done:
        returncode, stdout, stderr = 0, json.dumps({"decode_b1_tok_s": 10.0}), ""

    monkeypatch.setattr(fair, "run_worker", fake_worker)
    monkeypatch.setattr(fair.subprocess, "run", lambda *a, **k: Done())
    r = fair.fair_compare(["--config", "c.yaml"], rounds=3, settings=[("PASSIVE", 1)])
    assert r["decode_b1_tok_s"] == 20.0 and r["hf_decode_b1_tok_s"] == 10.0
    assert r["decode_b1_ratio"] == 1.0 and r["decode_b1_ratios"] == [1.0, 0.5, 3.0]
    assert (r["decode_b1_ratio_min"], r["decode_b1_ratio_max"]) == (0.5, 3.0) and "decode_b1_ratio_ci95" in r


def _suite_recorder(order: list, result: dict):
    """A stand-in for fair.run_worker: fixed bandwidth and probe readings, and each suite process's side
    appended to `order` before it returns `result`."""

    def fake_worker(args, policy, threads, timeout=3600, module="minimoe.bench.fair"):
        if args[0] == "bandwidth":
            return {"bandwidth_gib_s": 1.0}
        if args[0] == "probe":
            return {"decode_b1_tok_s": 1.0, "decode_b8_tok_s": 1.0, "prefill_tok_s": 1.0}
        order.append(args[1])
        return dict(result)

    return fake_worker


def test_fair_sides_take_turns_process_by_process(monkeypatch):
    """Every round runs each suite's process once, minimoe's then transformers', before the next round: not
    every round of one side before the other's."""
    import minimoe.bench.fair as fair

    order = []

    class Done:
        returncode, stdout, stderr = 0, json.dumps({"decode_b1_tok_s": 1.0}), ""

    monkeypatch.setattr(fair, "run_worker", _suite_recorder(order, {"decode_b1_tok_s": 1.0}))
    monkeypatch.setattr(fair.subprocess, "run", lambda *a, **k: Done())
    fair.fair_compare(["--config", "c.yaml"], rounds=3, settings=[("PASSIVE", 1)])
    assert order == ["minimoe", "hf"] * 3


@pytest.mark.parametrize("quick,repeats,cut", [(True, None, None), (False, 4, 20)])
def test_transformers_alone_runs_next_to_the_hf_side_in_every_round_as_its_decode_b1_row(
    monkeypatch, quick, repeats, cut
):
    """In every round, right after the HF side's process, transformers alone decodes with the bench's own
    settings: its new tokens and repeats (`--quick`, `--repeats`), and its decode_b1 prompt (cut where a
    short context cut the bench's)."""
    import minimoe.bench.fair as fair

    order = []
    fake_worker = _suite_recorder(
        order, {"decode_b1_tok_s": 4.0, **({"decode_b1_prompt": cut} if cut else {})}
    )

    class Done:
        returncode, stdout, stderr = 0, json.dumps({"decode_b1_tok_s": 2.0}), ""

    def fake_run(cmd, env=None, **kw):
        order.append(("alone", *cmd[-3:]))  # new tokens, repeats, prompt
        return Done()

    monkeypatch.setattr(fair, "run_worker", fake_worker)
    monkeypatch.setattr(fair.subprocess, "run", fake_run)
    base = [
        "--config",
        "c.yaml",
        *(["--quick"] if quick else []),
        *(["--repeats", str(repeats)] if repeats else []),
    ]
    r = fair.fair_compare(base, rounds=3, settings=[("PASSIVE", 1)])
    want = M.BenchSettings.quick() if quick else M.BenchSettings()
    alone = (
        "alone",
        str(want.new_tokens),
        str(repeats or want.repeats),
        str(cut or M.DECODE_SHAPES["decode_b1"][1]),
    )
    assert order == ["minimoe", "hf", alone] * 3
    assert r["hf_alone_ratios"] == [2.0] * 3 and r["hf_alone_ratio"] == 2.0


def test_a_worker_that_ran_under_another_setting_is_refused(monkeypatch):
    """A fair worker reports the OpenMP wait policy and thread count it really ran under; one that differs
    from the setting it was given stops the comparison (its numbers would be another setting's)."""
    import minimoe.bench.fair as fair

    answer = {}

    class Done:
        returncode, stderr = 0, ""

        @property
        def stdout(self):
            return json.dumps({"decode_b1_tok_s": 1.0, **answer})

    monkeypatch.setattr(fair.subprocess, "run", lambda *a, **k: Done())
    for ran in ({}, {"omp_wait_policy": "PASSIVE", "threads": 1}):
        answer = ran
        assert fair.run_worker(["suite", "hf"], "PASSIVE", 1)["decode_b1_tok_s"] == 1.0
    for ran in ({"omp_wait_policy": "PASSIVE", "threads": 2}, {"omp_wait_policy": "unset", "threads": 1}):
        answer = ran
        with pytest.raises(RuntimeError, match="ran under"):
            fair.run_worker(["suite", "hf"], "PASSIVE", 1)


def test_transformers_alone_warms_up_then_times_every_new_token(monkeypatch, capsys):
    """fair.HF_ALONE (run with a stand-in transformers): one untimed generate, then `repeats` timed ones
    of a batch-1 prompt of the length asked, each counting only the new tokens, the median kept."""
    import minimoe.bench.fair as fair

    calls = []

    class Model:
        config = types.SimpleNamespace(vocab_size=16)

        def eval(self):
            return self

        def generate(self, ids, max_new_tokens, **kw):
            calls.append(ids.shape)
            return torch.zeros(ids.shape[0], ids.shape[1] + max_new_tokens, dtype=torch.long)

    stub = types.ModuleType("transformers")
    stub.AutoModelForCausalLM = types.SimpleNamespace(from_pretrained=lambda *a, **k: Model())
    monkeypatch.setitem(sys.modules, "transformers", stub)
    clock = iter(float(t) for t in range(100))
    monkeypatch.setattr("time.perf_counter", lambda: next(clock))  # one second per timed generate
    monkeypatch.setattr(sys, "argv", ["-c", "dir", "8", "3", "5"])
    exec(fair.HF_ALONE, {"__name__": "__main__"})
    assert calls == [(1, 5)] * (1 + 3)
    assert json.loads(capsys.readouterr().out) == {"decode_b1_tok_s": 8.0}


# ------------------------------------------------------------------------------------- continuous.py


def test_continuous_compare_ratio_and_median(monkeypatch, tmp_path):
    from minimoe.bench import continuous as C

    per_round = {"minimoe": iter([30.0, 10.0, 20.0]), "hf": iter([4.0, 5.0, 100.0])}

    def fake_worker(args, policy, threads, timeout=3600, module=C.WORKER):
        task, side = args[0], args[1]
        if task == "probe":
            return {"tok_s": float(threads)}
        tok_s = next(per_round[side])
        return {"tok_s": tok_s, "seconds": 12.0 / tok_s, "tokens": 12, "outputs": [[1, 2]]}

    monkeypatch.setattr(C, "run_worker", fake_worker)
    monkeypatch.setattr("minimoe.bench.fair.run_worker", fake_worker)
    r = C.compare([], rounds=3, settings=[("PASSIVE", 1), ("ACTIVE", 2)])
    assert r["minimoe"]["tok_s"] == 20.0 and r["hf"]["tok_s"] == 5.0 and r["ratio"] == 4.0
    assert r["settings"]["hf"] == {"omp_wait_policy": "ACTIVE", "threads": 2}


def test_continuous_worker_counts_every_generated_token(monkeypatch, tmp_path):
    from minimoe.bench import continuous as C

    mix = tmp_path / "mix.json"
    mix.write_text(json.dumps({"prompts": [[1]], "warm": [[2]], "max_new_tokens": 3, "probe_new_tokens": 1}))
    monkeypatch.setattr(C, "run_minimoe", lambda *a: ([[1, 2, 3], [4, 5, 6]], 2.0))
    threads = torch.get_num_threads()
    try:
        out = C._worker(
            ["measure", "minimoe", "--run", "r", "--hf", "h", "--mix", str(mix), "--threads", "1"]
        )
    finally:
        torch.set_num_threads(threads)
    assert out["tokens"] == 6 and out["tok_s"] == 3.0


# ------------------------------------------------------------------------------------- benchmarks/


def test_train_small_interval_is_the_student_t_interval_of_the_log_ratios(script):
    from minimoe.lab.report import t975

    train_small = script("train_small")
    ratios = [1.0, 1.2, 1.1, 0.9]
    logs = [math.log(x) for x in ratios]
    half = t975(3) * statistics.stdev(logs) / 2
    lo, hi = train_small.interval(ratios)
    m = statistics.mean(logs)
    assert (lo, hi) == (pytest.approx(math.exp(m - half)), pytest.approx(math.exp(m + half)))


def test_train_small_leaves_the_warm_up_round_out(script, capsys):
    train_small = script("train_small")

    class Subject:
        def __init__(self, rates):
            self.rates = iter(rates)

        def turn(self, steps):
            return next(self.rates)

    subjects = {"a": Subject([1.0, 10.0, 30.0]), "b": Subject([100.0, 5.0, 10.0])}
    out = train_small.measure(subjects, {"A": ("a", "b")}, rounds=2, steps={"a": 1, "b": 1})
    assert out["tokens_per_s"] == {"a": 20.0, "b": 7.5}
    median, lo, hi, _ = out["ratios"]["A"]
    assert (median, lo, hi) == (2.5, 2.0, 3.0)


def test_train_small_times_newton_schulz_over_the_muon_matrices_in_both_dtypes(script, monkeypatch):
    import torch

    from minimoe.train.optim import MuonAdamW

    train_small = script("train_small")
    seen = []
    monkeypatch.setattr(
        train_small, "newton_schulz", lambda m, dtype=None: seen.append(("each", m.shape, dtype))
    )
    monkeypatch.setattr(
        train_small,
        "newton_schulz_many",
        lambda ms, dtype=None: seen.append(("many", [m.shape for m in ms], dtype)),
    )
    hidden, embedding = torch.nn.Parameter(torch.zeros(3, 4, 5)), torch.nn.Parameter(torch.zeros(7, 2))
    second = torch.nn.Parameter(torch.zeros(4, 5))
    opt = MuonAdamW([hidden, second], [{"params": [embedding], "weight_decay": 0.0}], lr=1.0, muon_lr=1.0)
    ms = train_small.newton_schulz_ms(opt, rounds=2)
    assert set(ms) == {"fp32", "bf16", "bf16_each"}
    # a warm-up round and two counted ones, each way in turn, over the Muon matrices only: stacked (as the
    # optimizer runs them) in both dtypes, and one at a time in bf16
    shapes = [(3, 4, 5), (4, 5)]
    one_round = [("many", shapes, None), ("many", shapes, torch.bfloat16)]
    one_round += [("each", s, torch.bfloat16) for s in shapes]
    assert seen == one_round * 3
    res = {
        "ratios": {k: (0.9, 0.8, 1.0, (0.85, 0.95)) for k in ("A", "B", "M")},
        "tokens_per_s": {"tiny MoE": 1.0},
        "ns_ms": {"fp32": 30.0, "bf16": 12.0, "bf16_each": 24.0},
    }
    text = train_small.table(res, Namespace(rounds=2, steps=2), (0.0, 0.0))
    assert (
        "| M: `tiny` MoE with train.optimizer=muon / adamw (same Trainer) | 0.90x | 0.80 | 1.00 | 0.85-0.95 |"
        in text
    )
    assert "30.0 ms in fp32, 12.0 ms in bf16 (2.50x" in text
    assert "one matrix at a time in bf16 24.0 ms (2.00x the stacked time)" in text


def test_moe_layer_times_after_the_warm_up_and_keeps_the_fastest(script):
    moe_layer = script("moe_layer")
    n = [0]

    def clock() -> float:
        # two readings per timed call: the warm-up round's 5 calls take 1 us (what a warm-up timed by
        # mistake would keep as the fastest), the later ones 1 ms and a little more each call
        n[0] += 1
        call = (n[0] - 1) // 2
        return n[0] * (1e-6 if call < 5 else 1e-3 * (1 + call / 100))

    out = moe_layer.bench_size(16, 4, 2, 8, 1, 8, warmup=1, repeats=3, clock=clock)
    assert len(out) == 5
    for median, fastest in out.values():
        assert 1 <= fastest < median < 2  # ms


def test_vs_hf_tables_hold_their_numbers(script):
    vs_hf = script("vs_hf")
    r = {"config": "c", "batch": [2, 8], "dtype": "fp32", "threads": 1, "cpu": "x", "cores": 2, "torch": "t",
         "date": "d", "matmul_peak_gflops": 1.0, "mfu": 0.1, "hf_mfu": 0.05, "logits_max_abs_diff": 0.0,
         "decode_b1_tok_s": 30.0, "hf_decode_b1_tok_s": 20.0, "decode_b1_ratio": 1.5,
         "peak_mem_decode_b1_mib": 300.0, "hf_peak_mem_decode_b1_mib": 200.0,
         "decode_b1_compiled_tok_s": 80.0, "decode_b1_compiled_ratio": 4.0, "decode_b1_compile_s": 7.0}  # fmt: skip
    assert "| decode, batch 1, prompt 32 | 30 | 20 | **1.50x** | 300 | 200 |" in vs_hf.table("cmd", r)
    r.update(settings={"minimoe": {"omp_wait_policy": "PASSIVE", "threads": 1},
                       "hf": {"omp_wait_policy": "ACTIVE", "threads": 1}},
             hf_alone_decode_b1_tok_s=20.0, hf_alone_ratio=1.0, decode_ceiling_tok_s=100.0,
             matvec_bandwidth_gib_s=1.0)  # fmt: skip
    assert "| decode, batch 1, prompt 32 | 30 | **1.50x** | 80 | **4.00x** | 7 | 20 |" in vs_hf.fair_table(
        "cmd", r
    )


def test_vs_hf_tables_show_each_ratios_spread(script):
    vs_hf = script("vs_hf")
    r = {"config": "c", "batch": [2, 8], "dtype": "fp32", "threads": 1, "cpu": "x", "cores": 2, "torch": "t",
         "date": "d", "matmul_peak_gflops": 1.0, "mfu": 0.1, "hf_mfu": 0.05, "logits_max_abs_diff": 0.0,
         "decode_b1_tok_s": 30.0, "hf_decode_b1_tok_s": 20.0, "peak_mem_decode_b1_mib": 300.0,
         "hf_peak_mem_decode_b1_mib": 200.0, "decode_b1_compiled_tok_s": 80.0, "decode_b1_compile_s": 7.0,
         "settings": {"minimoe": {"omp_wait_policy": "PASSIVE", "threads": 1},
                      "hf": {"omp_wait_policy": "ACTIVE", "threads": 1}},
         "hf_alone_decode_b1_tok_s": 20.0, "hf_alone_ratio": 1.0, "decode_ceiling_tok_s": 100.0,
         "matvec_bandwidth_gib_s": 1.0}  # fmt: skip
    from minimoe.bench.ratios import add_ratio

    add_ratio(r, "decode_b1_ratio", [1.5, 1.4, 1.6])
    add_ratio(r, "decode_b1_compiled_ratio", [4.0, 3.0, 5.0])
    assert "| decode, batch 1, prompt 32 | 30 | 20 | **1.50x** (1.40-1.60, 95% " in vs_hf.table("cmd", r)
    row = next(
        line for line in vs_hf.fair_table("cmd", r).splitlines() if line.startswith("| decode, batch 1")
    )
    assert "| **1.50x** (1.40-1.60, 95% " in row and "| **4.00x** (3.00-5.00, 95% " in row


def test_vs_hf_runs_every_tabled_fair_config_over_three_rounds(script, monkeypatch, capsys):
    vs_hf = script("vs_hf")
    commands = []

    def fake_bench(argv):
        commands.append(argv)
        return "cmd", {"date": "d", "cpu": "x", "config": "c"}

    monkeypatch.setattr(vs_hf, "bench", fake_bench)
    monkeypatch.setattr(vs_hf, "fair_table", lambda cmd, r: "")
    for quick in (False, True):
        commands.clear()
        vs_hf.main_fair(Namespace(from_json=None, quick=quick, write=False))
        assert len(commands) == (1 if quick else 2)
        for argv in commands:
            assert "--rounds" in argv and int(argv[argv.index("--rounds") + 1]) >= 3, argv


def test_decode_without_cache_counts_every_sequence(script):
    decode = script("decode")
    model = decode.random_model("tiny", 32)
    assert decode.decode_no_cache(model, torch.zeros(3, 4, dtype=torch.long), 2) == 6


def test_engine_decode_turns_give_tokens_per_second(script, monkeypatch):
    engine_decode = script("engine_decode")

    class Engine:
        def start(self):
            pass

        def close(self):
            pass

    runs = {"a": iter([(2.0, 10, ["x"]), (1.0, 10, ["x"]), (4.0, 10, ["x"])])}
    monkeypatch.setattr(engine_decode, "run_engine", lambda engine, prompts, n: next(runs["a"]))
    rates, texts = engine_decode.take_turns({"a": Engine()}, [[1]], 4, repeats=3)
    assert rates == {"a": 5.0} and texts == {"a": ["x"]}


def test_hf_continuous_table_rows(script):
    hf_continuous = script("hf_continuous")
    side = {"tokens": 12, "seconds": 2.0, "tok_s": 6.0, "outputs": [[1]], "repeatable": True}
    r = {"transformers": "v", "settings": {"minimoe": {"omp_wait_policy": "PASSIVE", "threads": 1},
                                           "hf": {"omp_wait_policy": "ACTIVE", "threads": 2}},
         "minimoe": side, "hf": {**side, "tok_s": 3.0, "seconds": 4.0}, "ratio": 2.0, "identical": 1.0,
         "probes": {"minimoe": {}, "hf": {}}}  # fmt: skip
    args = Namespace(compile=False, hf_attn="sdpa", requests=1, min_prompt=1, max_prompt=2, seed=0,
                     max_new_tokens=12, rounds=1)  # fmt: skip
    table = hf_continuous.table(r, args, "m")
    assert "| PASSIVE/1 | 12 | 2.00 | 6.0 |" in table and "| ACTIVE/2 | 12 | 4.00 | 3.0 |" in table
    assert "tokens/s: 2.00x**" in table


def test_fair_worker_names_the_hf_side_prompt_cut_by_a_short_context():
    """The hf side's suite answers in the minimoe side's names (its `hf_` prefix taken off): a prompt
    cut by a short context keeps its key whole, so the comparison reports `hf_<shape>_prompt`."""
    from minimoe.bench import fair

    threads = torch.get_num_threads()
    try:
        out = fair._worker(["suite", "hf", "--config", str(REFERENCE), "--quick", "--repeats", "1",
                            "--groups", "decode", "--threads", "1", *SMALLER,
                            "model.max_position_embeddings=40", "train.seq_len=16"])  # fmt: skip
    finally:
        torch.set_num_threads(threads)
    assert out["omp_wait_policy"] == os.environ.get("OMP_WAIT_POLICY", "unset") and out["threads"] == 1
    assert set(out) == {"omp_wait_policy", "threads", "decode_b1_tok_s", "peak_mem_decode_b1_mib", "decode_b1_prompt",
                        "decode_b1_p512_tok_s", "peak_mem_decode_b1_p512_mib", "decode_b1_p512_prompt"}  # fmt: skip
    assert out["decode_b1_prompt"] == out["decode_b1_p512_prompt"] == 8
