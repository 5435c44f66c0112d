"""What a run shows while it runs: the training bar under a time budget, the start-up summary, the stop
decision that keeps the final evaluation, checkpoint and sample inside train.max_minutes, the metrics
file after a resume, and evaluation progress inside one long document."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

# the corpus fixture and the tiny run of the training tests
from ranks import init_gloo, run_ranks  # noqa: E402
from test_train import TINY, _train  # noqa: E402

from minimoe.train.progress import TrainProgress, start_logs


def test_bar_under_a_time_budget_counts_the_clock_and_ends_at_100():
    bar = TrainProgress(True, max_steps=2000, max_minutes=2, step=0)
    bar.advance(96, 60.0)  # half the minutes, 5% of the steps: the clock is further along
    assert bar.bar.n == 500
    assert "step 96/2,000" in bar.bar.bar_format and "1.0/2 min" in bar.bar.bar_format
    bar.advance(1900, 61.0)  # now the steps are
    assert bar.bar.n == 950
    bar.close(1900, 119.0, complete=True)
    assert bar.bar.n == bar.bar.total


def test_bar_under_a_time_budget_never_draws_its_internal_counter(capsys):
    """tqdm draws on creation; the clock-bounded bar counts to 1,000 internally, which must not show."""
    bar = TrainProgress(True, max_steps=2000, max_minutes=2, step=0)
    bar.advance(10, 6.0)
    bar.close(10, 6.0, complete=False)
    drawn = capsys.readouterr().err
    assert "train" in drawn and "/1000" not in drawn and "it/s" not in drawn


def test_bar_of_an_interrupted_run_stays_where_it_was():
    bar = TrainProgress(True, max_steps=100, max_minutes=None, step=10)
    bar.advance(40, 5.0)
    bar.close(40, 5.0, complete=False)
    assert bar.bar.n == 40 and bar.bar.total == 100


def test_stop_decision_keeps_the_finish_inside_the_budget(tmp_path, corpus):
    from minimoe.config_yaml import build_run_config
    from minimoe.data import prepare
    from minimoe.train.run import data_cache_dir
    from minimoe.train.trainer import Trainer

    cfg = build_run_config(overrides=TINY + [f"data.path={corpus}", "train.eval_batches=6"])
    data = prepare(corpus, "byte", data_cache_dir(cfg.data, None), workers=0, progress=False)
    tr = Trainer(cfg, tmp_path / "r", data, data.tokenizer(), progress=False, reserve_s=1.0)
    assert tr._time_for_another_step(0.5, None, False)  # nothing measured yet: time left is enough
    tr._eval_s, tr._save_s = 2.0, 0.5  # measured: the finish costs 2 + 0.5 + 1 (reserve) = 3.5 s
    assert tr._time_for_another_step(4.6, 1.0, False)  # 1 s step + 3.5 s finish fits 4.6 s
    assert not tr._time_for_another_step(4.4, 1.0, False)
    assert not tr._time_for_another_step(7.0, 1.0, True)  # an evaluation due now counts twice: 8 s
    assert tr._time_for_another_step(8.1, 1.0, True)
    tr._eval_s = None  # before the first evaluation: 6 batches at a third of a 1 s step each = 2 s
    assert tr._time_for_another_step(4.6, 1.0, False) and not tr._time_for_another_step(4.4, 1.0, False)


def test_stop_decision_before_any_timing_stops_when_the_budget_is_spent(tmp_path, corpus):
    """Before a step was timed, the run goes on only while time is left."""
    from minimoe.config_yaml import build_run_config
    from minimoe.data import prepare
    from minimoe.train.run import data_cache_dir
    from minimoe.train.trainer import Trainer

    cfg = build_run_config(overrides=TINY + [f"data.path={corpus}"])
    data = prepare(corpus, "byte", data_cache_dir(cfg.data, None), workers=0, progress=False)
    tr = Trainer(cfg, tmp_path / "r", data, data.tokenizer(), progress=False)
    assert tr._time_for_another_step(0.01, None, True)
    assert not tr._time_for_another_step(0.0, None, False) and not tr._time_for_another_step(
        -1.0, None, False
    )


def test_stop_decision_estimates_the_first_evaluation_from_one_micro_batch(tmp_path, corpus):
    """Before the first evaluation its cost is a third of a micro-batch per validation batch: with
    train.grad_accum=2 a step holds two micro-batches, so 6 batches after a 2 s step cost 2 s."""
    from minimoe.config_yaml import build_run_config
    from minimoe.data import prepare
    from minimoe.train.run import data_cache_dir
    from minimoe.train.trainer import Trainer

    cfg = build_run_config(
        overrides=TINY + [f"data.path={corpus}", "train.eval_batches=6", "train.grad_accum=2"]
    )
    data = prepare(corpus, "byte", data_cache_dir(cfg.data, None), workers=0, progress=False)
    tr = Trainer(cfg, tmp_path / "r", data, data.tokenizer(), progress=False, reserve_s=1.0)
    tr._save_s = 0.5  # the finish: 2 + 0.5 + 1 (reserve) = 3.5 s after a 2 s step
    assert tr._time_for_another_step(5.6, 2.0, False) and not tr._time_for_another_step(5.4, 2.0, False)


def test_start_up_summary_names_size_data_device_and_budget(tmp_path, corpus, caplog, monkeypatch):
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # what the CLI picks on a busy machine
    with caplog.at_level(logging.INFO, logger="minimoe.train"):
        _train(tmp_path / "run", corpus, "train.max_steps=1", "train.eval_every=1", "train.max_minutes=5")
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert len(lines) == 1, caplog.text
    line = lines[0]
    # the corpus is one document: validation is the stream's tail
    for part in ("parameters", "activated per token", "train +", "val tokens", "cpu", "1 thread (OMP", "fp32",
                 "(OMP_WAIT_POLICY=PASSIVE)", "budget 1 step or 5 min",
                 "val tokens (the last 1% of the text)"):  # fmt: skip
        assert part in line, (part, line)
    # enough documents: whole ones held out, counted
    docs = tmp_path / "docs.txt"
    docs.write_text(
        "\n<|endoftext|>\n".join(f"story {i} of the cat and the dog" for i in range(1000)), "utf-8"
    )
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="minimoe.train"):
        _train(tmp_path / "docs", docs, "train.max_steps=1", "train.eval_every=1")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("train: ")]
    assert "val tokens (10 held-out documents)" in line, line


def test_start_up_summary_says_when_the_whole_budget_is_warmup():
    """A short trial of a preset with a long warmup (`tiny`: 100 steps) trains at a rising learning rate
    only; the start-up line says so, and says nothing when the schedule gets past its warmup."""
    import torch

    from minimoe.config_yaml import build_run_config
    from minimoe.train.progress import run_summary

    def line(*overrides):
        return run_summary(build_run_config("tiny", None, list(overrides)), None, torch.device("cpu"))

    short = line("train.max_steps=40", "train.warmup_steps=100")
    assert "budget 40 steps" in short
    assert short.endswith(" (all of it warmup, train.warmup_steps=100: the learning rate only rises)")
    assert "warmup" in line("train.max_steps=100", "train.warmup_steps=100")
    assert "warmup" not in line("train.max_steps=101", "train.warmup_steps=100")


def test_start_up_summary_of_a_torchrun_launch_names_the_parallel_layout():
    """Under torchrun the line says which layout the dist settings chose, so a run started with
    dist.expert_parallel=2 shows that the experts are sharded, not just "x 2 processes"."""
    import torch

    from minimoe.config_yaml import build_run_config
    from minimoe.train.progress import run_summary

    def line(*overrides, world=2):
        cfg = build_run_config("tiny", None, list(overrides))
        return run_summary(cfg, None, torch.device("cpu"), world_size=world)

    assert "cpu x 2 processes (DDP), " in line()
    assert "cpu x 2 processes (DDP, expert parallel 2), " in line("dist.expert_parallel=2")
    assert "cpu x 2 processes (FSDP), " in line("dist.strategy=fsdp")
    assert "cpu x 2 processes (pipeline parallel 2), " in line("dist.pipeline_parallel=2")
    assert "processes" not in line("dist.expert_parallel=2", world=1)


def test_resume_drops_metrics_rows_after_the_restored_checkpoint(tmp_path, corpus):
    run = tmp_path / "run"
    _train(run, corpus, "train.max_steps=4", "train.eval_every=2", "train.keep_last=5")
    import shutil

    shutil.rmtree(run / "checkpoints" / "step_00000004")  # as if the run died after logging step 4
    (run / "checkpoints" / "latest").write_text("step_00000002\n")
    _train(run, corpus, "train.max_steps=4", "train.eval_every=2", resume=True)
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps), steps  # never backwards
    assert steps.count(3) == 1 and steps.count(4) == 2  # step 4's train row and its eval row, once each


def test_start_logs_of_a_resume_skips_a_half_written_row(tmp_path):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"ste', encoding="utf-8")
    start_logs(tmp_path, 2)
    assert p.read_text().splitlines() == ['{"step": 1}', '{"step": 2}']


def test_perplexity_of_one_long_document_moves_the_bar_per_batch(tmp_path, monkeypatch):
    import tqdm.auto

    from minimoe.config import ModelConfig
    from minimoe.data import Tokenizer
    from minimoe.eval.perplexity import evaluate_perplexity
    from minimoe.model.transformer import Transformer

    updates: list[float] = []

    class Recorder:
        def __init__(self, *a, total=None, **k):
            self.total = total

        def update(self, n):
            updates.append(n)

        def close(self):
            pass

    monkeypatch.setattr(tqdm.auto, "tqdm", Recorder)
    torch.manual_seed(0)
    model = Transformer(ModelConfig(vocab_size=320, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=32,
                                    first_k_dense_replace=1, intermediate_size=64, attn_type="gqa")).eval()  # fmt: skip
    doc = tmp_path / "one.txt"
    doc.write_text("the cat sat on a mat " * 40, encoding="utf-8")  # one document, 840 bytes, 27 windows
    evaluate_perplexity(model, Tokenizer.byte(), doc, window=32, batch_size=4, progress=True)
    assert sum(updates) == doc.stat().st_size
    assert len([u for u in updates if u > 0]) >= 5  # one update per batch of 4 windows, not one at the end


def _agree_rank(rank: int, port: int, out: str) -> None:
    import types

    import torch.distributed as dist

    from minimoe.train.trainer import Trainer

    init_gloo(rank, port)
    try:
        me = types.SimpleNamespace(device=torch.device("cpu"))
        # rank 1 finds no time for another step (its own timings), rank 0 does: both must stop
        res = Trainer._agree(me, 10.0 + rank, False, rank == 1)
        Path(out, f"{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


def test_ranks_agree_on_running_out_of_time(tmp_path):
    run_ranks(_agree_rank, args=(str(tmp_path),), timeout_s=150)
    for rank in (0, 1):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == [11.0, False, True]
