"""Trainer, checkpoints and the train/generate CLI on tiny generated data."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minimoe.cli.main import main
from minimoe.errors import MinimoeError
from minimoe.train import checkpoint as ckpt_lib
from minimoe.train.run import train_from_config
from minimoe.train.schedule import lr_multiplier
from tiny import TINY_TRAIN

TINY = list(TINY_TRAIN)


def _train(run_dir, data, *extra, **kw):
    return train_from_config(
        overrides=TINY + [f"data.path={data}", *extra], run_dir=run_dir, progress=False, **kw
    )


def _losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def test_a_minutes_budget_that_ends_in_the_warmup_is_warned_about(tmp_path, corpus, caplog):
    """Warmup counts steps: a train.max_minutes run too short for it never decays its learning rate, and
    the first logged row says so once (at the speed of its steps so far); a warmup that fits is not."""
    from types import SimpleNamespace

    from minimoe.train.schedule import warmup_overrun

    tc = SimpleNamespace(max_minutes=1.0, warmup_steps=100, max_steps=10**6)
    assert "ends near step 70, inside its 100 warmup" in warmup_overrun(10, 6.0, 0.9, tc)[0]
    assert "less than a warmup after" in warmup_overrun(10, 6.0, 0.4, tc)[0]  # step 145
    assert warmup_overrun(10, 6.0, 0.2, tc) == [] and warmup_overrun(10, 6.0, None, tc) == []
    assert warmup_overrun(100, 6.0, 0.6, tc) == []  # warmed up already
    assert warmup_overrun(10, 6.0, 0.6, SimpleNamespace(max_minutes=None, warmup_steps=100)) == []
    tc.max_steps = 150  # the steps end it before the clock: step 150, less than a warmup after it
    assert "ends near step 150, less than a warmup after" in warmup_overrun(10, 6.0, 0.2, tc)[0]
    # a run that the clock cannot end first: its steps decide, whatever the host's speed (no timing here)
    budget = ("train.max_steps=12", "train.max_minutes=30", "train.eval_every=100000", "train.log_every=2")
    with caplog.at_level("WARNING", logger="minimoe.train"):  # its own level, whatever ran before
        _train(tmp_path / "short", corpus, *budget, "train.warmup_steps=10")
    assert sum("ends near step 12, less than a warmup after" in r.message for r in caplog.records) == 1
    caplog.clear()
    with caplog.at_level("WARNING", logger="minimoe.train"):  # its own level, whatever ran before
        _train(tmp_path / "fits", corpus, *budget, "train.warmup_steps=2")
    assert not any("warmup steps" in r.message for r in caplog.records)


def test_training_learns_and_logs(tmp_path, corpus):
    res = _train(tmp_path / "run", corpus, "train.max_steps=30", "train.eval_every=15", "train.lr=1e-2")
    assert res.step == 30 and res.stopped == "max_steps"
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    first = rows[0]
    for key in ("step", "tokens", "loss", "lr", "tokens_per_s", "grad_norm", "max_vio", "load_frac"):
        assert key in first, key
    evals = [r for r in rows if "val_loss" in r]
    assert [r["step"] for r in evals] == [15, 30]
    # byte tokenizer: one token per byte, plus the corpus's one document's EOS at the end of the val tail
    (meta_file,) = (corpus.parent / "cache").rglob("meta.json")
    val = json.loads(meta_file.read_text())["splits"]["val"]
    assert val["tokens"] == val["bytes"] + 1
    for r in evals:
        assert r["val_bpb"] == pytest.approx(
            r["val_loss"] / math.log(2) * val["tokens"] / val["bytes"], rel=1e-12
        )
    losses = _losses(tmp_path / "run")
    assert losses[30] < losses[1] - 1.0  # byte-level text with 16 words is easy
    ck = ckpt_lib.find_checkpoint(tmp_path / "run")
    assert ck.name == "step_00000030" and (ck / "tokenizer").is_dir()
    model, tok, cfg, meta = ckpt_lib.load_run(tmp_path / "run")
    assert meta["step"] == 30 and cfg.model.vocab_size == 320  # 257 byte tokens rounded up to 64


def test_val_bpb_with_bpe_counts_utf8_bytes(tmp_path, monkeypatch):
    """val_bpb = mean validation CE in bits * val tokens / val UTF-8 bytes; with BPE, tokens are not
    bytes. The validation file's bytes are counted by hand (test_eval.MULTIBYTE_DOCS)."""
    from test_eval import MULTIBYTE_BYTES, MULTIBYTE_DOCS

    from minimoe.data import PreparedData

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    sep = "\n<|endoftext|>\n"
    (tmp_path / "train.txt").write_text(sep.join([d * 3 for d in MULTIBYTE_DOCS] * 20), encoding="utf-8")
    (tmp_path / "val.txt").write_text(sep.join(MULTIBYTE_DOCS), encoding="utf-8")
    overrides = [
        f"data.val_path={tmp_path / 'val.txt'}", "data.tokenizer=bpe:300", "train.max_steps=2",
        "train.eval_every=2", "train.seq_len=16", "train.batch_size=2",
    ]  # fmt: skip
    _train(tmp_path / "run", tmp_path / "train.txt", *overrides)
    _, tok, _, _ = ckpt_lib.load_run(tmp_path / "run")
    assert tok.kind == "bpe"
    (meta_file,) = (tmp_path / "cache").rglob("meta.json")
    data = PreparedData.load(meta_file.parent)
    n_tokens = sum(len(tok.encode(d)) + 1 for d in MULTIBYTE_DOCS)  # each document ends with EOS
    assert (data.num_tokens("val"), data.num_bytes("val")) == (n_tokens, MULTIBYTE_BYTES)
    assert n_tokens < 0.6 * MULTIBYTE_BYTES  # merges happened: a token count would be far off
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    (ev,) = [r for r in rows if "val_loss" in r]
    want = ev["val_loss"] / math.log(2) * n_tokens / MULTIBYTE_BYTES
    assert ev["val_bpb"] == pytest.approx(want, rel=1e-9)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_is_exact(tmp_path, corpus, optimizer):
    # muon: both the Muon momentum buffers and the AdamW moments must come back
    common = (
        "train.max_steps=8", "train.eval_every=100", "model.router_jitter=0.1", "model.dropout=0.1",
        f"train.optimizer={optimizer}", "model.mtp_depth=1",
    )  # fmt: skip
    _train(tmp_path / "a", corpus, *common)
    full = _losses(tmp_path / "a")
    from minimoe.config_yaml import build_run_config
    from minimoe.data import prepare
    from minimoe.train.run import data_cache_dir
    from minimoe.train.trainer import Trainer

    cfg = build_run_config("tiny", None, TINY + [f"data.path={corpus}", *common])
    data = prepare(corpus, "byte", data_cache_dir(cfg.data, None), workers=0, progress=False)
    cfg.model.vocab_size = 320
    first = Trainer(cfg, tmp_path / "b", data, data.tokenizer(), progress=False).fit(stop_after=4)
    assert first.stopped == "paused" and first.step == 4
    _train(tmp_path / "b", corpus, f"train.optimizer={optimizer}", resume=True)  # TINY names adamw
    resumed = _losses(tmp_path / "b")
    assert sorted(resumed) == list(range(1, 9))
    for s in range(1, 9):
        assert resumed[s] == pytest.approx(full[s], abs=1e-6), s


@pytest.mark.parametrize("trained, resumed", [("muon", "adamw"), ("adamw", "muon")])
def test_resume_with_another_optimizer_is_refused_naming_the_setting(tmp_path, corpus, trained, resumed):
    """One optimizer's state cannot continue as another's: the refusal names train.optimizer, both
    values and the way to train on with the other (--init), and leaves the checkpoint as it was."""
    _train(tmp_path / "a", corpus, "train.max_steps=2", "train.eval_every=100", f"train.optimizer={trained}")
    ckpts = sorted(f for f in (tmp_path / "a").rglob("*") if f.is_file() and "checkpoint" in str(f))
    assert ckpts
    before = [c.read_bytes() for c in ckpts]
    with pytest.raises(MinimoeError) as e:
        _train(tmp_path / "a", corpus, "train.max_steps=4", f"train.optimizer={resumed}", resume=True)
    msg = str(e.value)
    assert f"was trained with train.optimizer={trained}" in msg
    assert f"config says train.optimizer={resumed}: resume with train.optimizer={trained}" in msg
    assert "minimoe train --init" in msg
    assert [c.read_bytes() for c in ckpts] == before
    # with the optimizer it trained with, it resumes
    res = _train(tmp_path / "a", corpus, "train.max_steps=4", f"train.optimizer={trained}", resume=True)
    assert res.step == 4


def test_a_muon_state_is_told_by_its_groups_key_whatever_their_contents(tmp_path):
    """MuonAdamW leaves out an empty group, so a Muon state may hold only its AdamW groups (use_muon False)
    or only its Muon group; either is Muon's, and a state without the key is AdamW's."""
    from minimoe.train.state import check_same_optimizer

    for groups in ([{"use_muon": False}], [{"use_muon": True}], [{"use_muon": True}, {"use_muon": False}]):
        check_same_optimizer(tmp_path, {"param_groups": groups}, "muon")
        with pytest.raises(MinimoeError, match="trained with train.optimizer=muon"):
            check_same_optimizer(tmp_path, {"param_groups": groups}, "adamw")
    check_same_optimizer(tmp_path, {"param_groups": [{"weight_decay": 0.1}]}, "adamw")
    with pytest.raises(MinimoeError, match="trained with train.optimizer=adamw"):
        check_same_optimizer(tmp_path, {"param_groups": [{"weight_decay": 0.1}]}, "muon")
    # the checkpoint's own config names which AdamW
    with pytest.raises(
        MinimoeError, match="trained with train.optimizer=adamw8bit.*resume with train.optimizer=adamw8bit"
    ):
        check_same_optimizer(tmp_path, {"param_groups": [{"weight_decay": 0.1}]}, "muon", "adamw8bit")
    # and torch's AdamW from bitsandbytes' 8-bit one (each would load the other's state, then fail to step)
    for saved, asked in (("adamw", "adamw8bit"), ("adamw8bit", "adamw")):
        with pytest.raises(
            MinimoeError, match=f"trained with train.optimizer={saved}, .* says train.optimizer={asked}"
        ):
            check_same_optimizer(tmp_path, {"param_groups": [{"weight_decay": 0.1}]}, asked, saved)
        check_same_optimizer(tmp_path, {"param_groups": [{"weight_decay": 0.1}]}, saved, saved)


def _paused_then_resumed(tmp_path, corpus, common, pause_at):
    """Train `common` in tmp_path / "b" for `pause_at` steps (a pause: what Ctrl-C does), then resume
    it to the end; the resumed run's result."""
    from minimoe.config_yaml import build_run_config
    from minimoe.data import prepare
    from minimoe.train.run import data_cache_dir
    from minimoe.train.trainer import Trainer

    cfg = build_run_config("tiny", None, TINY + [f"data.path={corpus}", *common])
    data = prepare(corpus, "byte", data_cache_dir(cfg.data, None), workers=0, progress=False)
    cfg.model.vocab_size = 320
    first = Trainer(cfg, tmp_path / "b", data, data.tokenizer(), progress=False).fit(stop_after=pause_at)
    assert first.stopped == "paused" and first.step == pause_at
    return _train(tmp_path / "b", corpus, *common, resume=True)


def test_tokens_per_s_leaves_out_evaluation_and_checkpoint_time(tmp_path, corpus, monkeypatch):
    """A row's tokens/s is training throughput: the evaluation and checkpoint before its window
    (here made to take 1 s each) do not count in the window's time."""
    from minimoe.train.trainer import Trainer

    evaluate, save = Trainer.evaluate, Trainer.save

    def slow(f):
        def wrapped(self, *a, **k):
            time.sleep(1.0)
            return f(self, *a, **k)

        return wrapped

    monkeypatch.setattr(Trainer, "evaluate", slow(evaluate))
    monkeypatch.setattr(Trainer, "save", slow(save))
    _train(tmp_path / "run", corpus, "train.max_steps=3", "train.eval_every=2", "train.log_every=1")
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    (after,) = [r for r in rows if r["step"] == 3 and "tokens_per_s" in r]
    window_s = 128 / after["tokens_per_s"]  # one step of 4 x 32 tokens
    assert window_s < 1.0, window_s


def test_a_checkpoint_inside_a_pause_keeps_only_the_training_time_of_the_window(monkeypatch):
    """A checkpoint written during an evaluation and save (`LogWindow.paused`) records the window's
    training seconds, without the evaluation before it, as the row an uninterrupted run logs would."""
    from minimoe.train import metrics

    now = [100.0]
    monkeypatch.setattr(metrics.time, "perf_counter", lambda: now[0])
    window = metrics.LogWindow(torch.device("cpu"), ())
    now[0] = 110.0  # 10 s of training steps
    with window.paused():
        now[0] = 115.0  # a 5 s evaluation, then the checkpoint
        state = window.state_dict()
        now[0] = 116.0
    assert state["seconds"] == 10.0
    assert now[0] - window.start == 10.0


def test_resume_between_logged_rows_logs_what_an_uninterrupted_run_does(tmp_path, corpus):
    """With a row every 4 steps, a pause at step 6 falls inside a logging window: the resumed run's
    row at step 8 still averages steps 5-8."""
    common = ("train.max_steps=8", "train.eval_every=100", "train.log_every=4")
    _train(tmp_path / "a", corpus, *common)
    _paused_then_resumed(tmp_path, corpus, common, pause_at=6)
    full, resumed = _losses(tmp_path / "a"), _losses(tmp_path / "b")
    assert sorted(full) == sorted(resumed) == [4, 8]
    for s in (4, 8):
        assert resumed[s] == pytest.approx(full[s], abs=1e-6), s
    rows = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    vios = [[row["max_vio"] for row in run if "loss" in row] for run in rows]
    assert vios[1] == vios[0]  # the per-step MaxVio of steps 5 and 6 came back with the window


def test_resume_between_logged_rows_keeps_the_windows_dropped_pairs(tmp_path, corpus):
    """The capacity's dropped pairs of steps 5 and 6 (before a pause at step 6) stay in the row at step 8."""
    common = ("train.max_steps=8", "train.eval_every=100", "train.log_every=4", "model.capacity_factor=1.0")
    _train(tmp_path / "a", corpus, *common)
    _paused_then_resumed(tmp_path, corpus, common, pause_at=6)
    rows = [[json.loads(x) for x in (tmp_path / r / "metrics.jsonl").read_text().splitlines()] for r in "ab"]
    full, resumed = (
        [(r["step"], r["dropped"], r["dropped_frac"]) for r in run if "loss" in r] for run in rows
    )
    assert resumed == full and full[1][1]["1"] > 0


def test_a_pause_does_not_change_early_stopping(tmp_path, corpus, monkeypatch):
    """The evaluation a pause forces is logged and saved but does not count: with a validation loss
    that is lowest at the pause's step, the resumed run still stops where the uninterrupted one does,
    and its best checkpoint is the same step's."""
    from minimoe.train.trainer import Trainer

    losses = {4: 1.0, 6: 2.0, 12: 1.5, 18: 1.6, 24: 1.4}
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"val_loss": losses[self.step], "val_bpb": None})
    common = ("train.max_steps=24", "train.eval_every=6", "train.early_stop_patience=1")
    full = _train(tmp_path / "a", corpus, *common)
    assert (full.stopped, full.step) == ("early_stop", 18)
    resumed = _paused_then_resumed(tmp_path, corpus, common, pause_at=4)
    assert (resumed.stopped, resumed.step, resumed.best_val_loss) == ("early_stop", 18, 1.5)
    best = (tmp_path / "b" / "checkpoints" / "best").read_text().strip()
    assert best == (tmp_path / "a" / "checkpoints" / "best").read_text().strip() == "step_00000012"


def test_resume_of_an_early_stopped_run_is_refused_until_the_patience_grows(tmp_path, corpus, monkeypatch):
    """A run that stopped on train.early_stop_patience is finished as it stands: a plain resume says so
    in one sentence (it used to train one step, save nothing and stop again); a larger patience
    continues it."""
    from minimoe.train.trainer import Trainer

    vals = iter([1.0, 2.0, 3.0, 4.0])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"val_loss": next(vals), "val_bpb": None})
    common = ("train.max_steps=20", "train.eval_every=2", "train.early_stop_patience=1")
    res = _train(tmp_path / "run", corpus, *common)
    assert (res.stopped, res.step) == ("early_stop", 4)
    with pytest.raises(MinimoeError, match="stopped early at step 4.*train.early_stop_patience"):
        _train(tmp_path / "run", corpus, *common, resume=True)
    res = _train(tmp_path / "run", corpus, *common, "train.early_stop_patience=2", resume=True)
    assert (res.stopped, res.step) == ("early_stop", 6)


def test_overrides_given_at_a_resume_hold_for_the_next(tmp_path, corpus):
    """`--resume RUN train.max_steps=12` on a run that ended at step 8, paused after 2 steps, then a
    plain `--resume RUN`: it continues to step 12, not back to the first run's 8."""
    from minimoe.config_yaml import build_run_config
    from minimoe.data import Tokenizer, prepare
    from minimoe.train.run import data_cache_dir
    from minimoe.train.trainer import Trainer

    _train(tmp_path / "r", corpus, "train.max_steps=8", "train.eval_every=100")
    cfg = build_run_config(config_path=str(tmp_path / "r/config.yaml"), overrides=["train.max_steps=12"])
    tok = Tokenizer.load(tmp_path / "r/tokenizer")
    data = prepare(corpus, tok, data_cache_dir(cfg.data, None), workers=0, progress=False)
    first = Trainer(cfg, tmp_path / "r", data, data.tokenizer(), resume=True, progress=False).fit(
        stop_after=2
    )
    assert (first.stopped, first.step) == ("paused", 10)
    res = train_from_config(overrides=[], run_dir=tmp_path / "r", resume=True, progress=False, sample=False)
    assert (res.stopped, res.step) == ("max_steps", 12)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_optimizer_settings_given_at_a_resume_are_used(tmp_path, corpus, optimizer):
    """`--resume RUN train.lr=... train.weight_decay=... train.beta2=...`: the resumed steps use the new
    settings (the checkpoint's optimizer state brought back the old ones, and Muon kept its old lr)."""
    from minimoe.config_yaml import build_run_config
    from minimoe.data import Tokenizer, prepare
    from minimoe.train.run import data_cache_dir
    from minimoe.train.trainer import Trainer

    common = (f"train.optimizer={optimizer}", "train.schedule=constant", "train.warmup_steps=0")
    _train(tmp_path / "r", corpus, "train.max_steps=2", "train.eval_every=100", *common)
    new = ["train.max_steps=4", "train.lr=1e-5", "train.weight_decay=0", "train.beta2=0.99"]
    cfg = build_run_config(config_path=str(tmp_path / "r/config.yaml"), overrides=new)
    tok = Tokenizer.load(tmp_path / "r/tokenizer")
    data = prepare(corpus, tok, data_cache_dir(cfg.data, None), workers=0, progress=False)
    tr = Trainer(cfg, tmp_path / "r", data, data.tokenizer(), resume=True, progress=False)
    tr.fit(stop_after=1)
    for g in tr.optimizer.param_groups:
        assert g["lr"] == pytest.approx(1e-5) and g["weight_decay"] == 0.0, g.get("use_muon")
        assert tuple(g["betas"]) == (0.9, 0.99)


def test_checkpoint_write_is_atomic(tmp_path, corpus, monkeypatch):
    _train(tmp_path / "run", corpus, "train.max_steps=2", "train.eval_every=2")
    root = tmp_path / "run" / "checkpoints"
    good = ckpt_lib.find_checkpoint(tmp_path / "run")
    before = {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()}

    def boom(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", boom)
    model, tok, cfg, _ = ckpt_lib.load_run(tmp_path / "run")
    with pytest.raises(MinimoeError, match="No space left on device.*step_00000002 is intact"):
        ckpt_lib.save_checkpoint(tmp_path / "run", 3, model, {}, {"step": 3}, "x: 1\n", tok)
    # the failed write left no trusted checkpoint and did not move `latest`
    assert ckpt_lib.find_checkpoint(tmp_path / "run") == good
    assert not (root / "step_00000003" / "meta.json").exists()
    assert {p.name: p.read_bytes() for p in good.iterdir() if p.is_file()} == before
    # a directory without meta.json (crash before the rename finished) is never chosen
    (root / "step_00000009").mkdir()
    (root / "latest").write_text("step_00000009\n")
    assert ckpt_lib.find_checkpoint(tmp_path / "run") == good


def test_keep_last_and_best(tmp_path, corpus):
    _train(
        tmp_path / "run",
        corpus,
        "train.max_steps=6",
        "train.eval_every=1",
        "train.keep_last=2",
        "train.lr=1e-2",
    )
    root = tmp_path / "run" / "checkpoints"
    steps = sorted(p.name for p in root.glob("step_*"))
    best = (root / "best").read_text().strip()
    assert set(steps) <= {"step_00000005", "step_00000006", best}
    assert len(steps) <= 3


def test_schedules():
    assert lr_multiplier(0, 100, "cosine", 10) == pytest.approx(0.1)
    assert lr_multiplier(9, 100, "cosine", 10) == pytest.approx(1.0)
    assert lr_multiplier(100, 100, "cosine", 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(55, 100, "linear", 10, min_ratio=0.0) == pytest.approx(0.5)
    assert lr_multiplier(50, 100, "constant", 10) == 1.0
    assert lr_multiplier(79, 100, "wsd", 10, decay_fraction=0.2) == 1.0
    assert lr_multiplier(90, 100, "wsd", 10, min_ratio=0.0, decay_fraction=0.2) == pytest.approx(0.5)


def test_tensorboard_logging(tmp_path, corpus):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    _train(tmp_path / "run", corpus, "train.max_steps=3", "train.eval_every=3", "train.tensorboard=true")
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert {"loss", "lr", "val_loss"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3]
    # every number of metrics.jsonl (ints such as `tokens` too), at its row's step, with its value
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    want: dict[str, list] = {}
    for r in rows:
        for k, v in r.items():
            if isinstance(v, (int, float)) and k != "step":
                want.setdefault(k, []).append((r["step"], pytest.approx(v, rel=1e-6)))
    assert "tokens" in want and set(acc.Tags()["scalars"]) == set(want)
    for k, series in want.items():
        assert [(e.step, e.value) for e in acc.Scalars(k)] == series, k


def test_tensorboard_after_a_resume_from_an_earlier_checkpoint_has_one_curve(tmp_path, corpus):
    """A run that died after logging steps past its last checkpoint resumes there: TensorBoard, like
    metrics.jsonl, then holds every step once, not the replayed steps a second time."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, common = tmp_path / "run", ("train.max_steps=6", "train.eval_every=100", "train.save_every=3")
    _train(run, corpus, *common, "train.tensorboard=true")
    (run / "checkpoints" / "latest").write_text("step_00000003\n")  # as if it died before step 6's save
    _train(run, corpus, *common, "train.tensorboard=true", resume=True)
    acc = EventAccumulator(str(run / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("loss")] == [1, 2, 3, 4, 5, 6]
    assert sorted(_losses(run)) == [1, 2, 3, 4, 5, 6]


def test_a_row_averages_the_steps_of_its_window(tmp_path, corpus):
    """With a row every 2 steps, each row's loss, parts and MaxVio are the mean over its steps of what a
    run that logs every step says, and the last step, off that grid, gets a row of its own."""
    common = ("train.max_steps=5", "train.eval_every=100")
    rows = {}
    for name, every in (("each", 1), ("two", 2)):
        _train(tmp_path / name, corpus, *common, f"train.log_every={every}")
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = {r["step"]: r for r in map(json.loads, lines) if "loss" in r}
    assert sorted(rows["two"]) == [2, 4, 5]
    for step, window in ((2, (1, 2)), (4, (3, 4)), (5, (5,))):
        row, each = rows["two"][step], [rows["each"][s] for s in window]
        assert row["tokens"] == each[-1]["tokens"] == step * 128
        for key in ("loss", "ce", "aux", "mtp", "router_z"):
            assert row[key] == pytest.approx(sum(r[key] for r in each) / len(each), rel=1e-5), (step, key)
        for layer, vio in row["max_vio"].items():
            assert vio == pytest.approx(sum(r["max_vio"][layer] for r in each) / len(each), abs=2e-4)


def _slow_steps(monkeypatch, seconds: float) -> None:
    """Make every training step seem to take `seconds` more on time.perf_counter's clock."""
    from minimoe.train.trainer import Trainer

    real_clock, offset = time.perf_counter, [0.0]
    monkeypatch.setattr(time, "perf_counter", lambda: real_clock() + offset[0])
    train_step = Trainer._train_step

    def slow_step(self):
        offset[0] += seconds
        return train_step(self)

    monkeypatch.setattr(Trainer, "_train_step", slow_step)


def test_tokens_per_s_is_the_windows_tokens_over_its_training_time(tmp_path, corpus, monkeypatch):
    """Each training step made to take 2 s more: every row of a run that logs every 2 steps says 256
    tokens in about 4 s, the later rows too and the row after a pause inside its window (the tokens and
    seconds of the window's step before the pause come back with the checkpoint)."""
    _slow_steps(monkeypatch, 2.0)
    common = ("train.max_steps=6", "train.eval_every=100", "train.log_every=2")
    _paused_then_resumed(tmp_path, corpus, common, pause_at=3)
    rows = [json.loads(x) for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    tps = {r["step"]: r["tokens_per_s"] for r in rows if "loss" in r}
    assert sorted(tps) == [2, 4, 6]
    for step, v in tps.items():
        assert v == pytest.approx(64, rel=0.2), step  # 2 steps x 128 tokens in 4 s (plus the real time)


def test_tokens_per_s_counts_every_micro_batch(tmp_path, corpus, monkeypatch):
    """With train.grad_accum=2 a step trains 2 x 128 tokens: a step made to take 4 s more logs about
    64 tokens/s, and the row's tokens count both micro-batches."""
    _slow_steps(monkeypatch, 4.0)
    _train(tmp_path / "run", corpus, "train.max_steps=2", "train.eval_every=100", "train.grad_accum=2")
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for r in (r for r in rows if "loss" in r):
        assert r["tokens"] == 256 * r["step"]
        assert r["tokens_per_s"] == pytest.approx(64, rel=0.2), r["step"]


def test_tensorboard_rows_reach_the_event_file_as_they_are_logged(tmp_path):
    """Each row is flushed as it is logged, so a live TensorBoard, and the event file of a run killed
    before it closes its writers, hold every logged step (SummaryWriter itself flushes every 2 minutes)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from minimoe.config_yaml import build_run_config
    from minimoe.train.metrics import MetricWriters

    writers = MetricWriters(tmp_path / "metrics.jsonl")
    writers.open(build_run_config("tiny", None, ["train.tensorboard=true"]), tmp_path)
    try:
        writers.log({"step": 1, "loss": 2.5})
        acc = EventAccumulator(str(tmp_path / "tb"))
        acc.Reload()
        assert [(e.step, e.value) for e in acc.Scalars("loss")] == [(1, 2.5)]
    finally:
        writers.close()


def test_a_run_finishes_its_wandb_run_when_it_ends_and_when_it_fails(tmp_path, corpus, monkeypatch):
    """A run that stops with an error (here it diverges) still finishes its W&B run: in a script,
    wandb.init while a run is active returns that run, so the next run in the process (a sweep's next
    one) would log into the failed one."""
    import sys
    import types

    from minimoe.model.transformer import Transformer

    runs = []

    def init(**kw):
        run = types.SimpleNamespace(id=kw["id"], finished=False, log=lambda *a, **k: None)
        run.finish = lambda: setattr(run, "finished", True)
        runs.append(run)
        return run

    monkeypatch.setitem(sys.modules, "wandb", types.ModuleType("wandb"))
    monkeypatch.setattr(sys.modules["wandb"], "init", init, raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    _train(tmp_path / "ok", corpus, "train.max_steps=2", "train.eval_every=2", "train.wandb=true")
    assert [r.finished for r in runs] == [True]
    real = Transformer.forward

    def nan_loss(self, *a, **k):
        out = real(self, *a, **k)
        if out.loss is not None:
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", nan_loss)
    with pytest.raises(MinimoeError, match="diverged"):
        _train(tmp_path / "bad", corpus, "train.max_steps=20", "train.wandb=true")
    assert [r.finished for r in runs] == [True, True]


def test_a_fresh_run_starts_its_own_logs_in_a_folder_an_attempt_left(tmp_path, corpus):
    """A run from step 0 in a folder whose earlier attempt saved no checkpoint: metrics.jsonl and the
    TensorBoard folder hold this run's rows only."""
    pytest.importorskip("tensorboard")
    from torch.utils.tensorboard import SummaryWriter

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 99.0}\n{"step": 7, "loss": 99.0}\n')
    with SummaryWriter(str(run / "tb")) as old:
        old.add_scalar("loss", 99.0, 7)
    _train(run, corpus, "train.max_steps=2", "train.eval_every=2", "train.tensorboard=true")
    assert sorted(_losses(run)) == [1, 2] and 99.0 not in _losses(run).values()
    assert len(list((run / "tb").iterdir())) == 1  # this run's event file only


# ---------------------------------------------------------------- CLI and bad input


def _cli(capsys, *argv) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_train_then_generate(tmp_path, corpus, capsys):
    code, out, err = _cli(
        capsys, "train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--no-progress",
        *TINY, "train.max_steps=4", "train.eval_every=4", "train.sample_tokens=10",
    )  # fmt: skip
    assert code == 0, err
    assert "val_loss" in out and "--- sample ---" in out
    code, out, err = _cli(
        capsys, "generate", str(tmp_path / "run"), "--prompt", "the cat", "--max-new-tokens", "8",
        "--temperature", "0",
    )  # fmt: skip
    assert code == 0, err
    assert out.startswith("the cat") and len(out) > len("the cat")


def test_cli_train_with_pretokenized_val_data_has_no_bpb(tmp_path, corpus, capsys):
    """Pre-tokenized validation data has no byte count, so no bits per byte: the closing line leaves
    val_bpb out instead of failing after the run has trained and saved."""
    import numpy as np

    val = tmp_path / "val.npy"
    np.save(val, np.frombuffer(corpus.read_bytes()[:3000], dtype=np.uint8).astype(np.uint16))
    code, out, err = _cli(
        capsys, "train", "--data", str(corpus), "--val-data", str(val), "--out", str(tmp_path / "run"),
        "--no-progress", "--no-sample", *TINY, "train.max_steps=2", "train.eval_every=2",
    )  # fmt: skip
    assert code == 0, err
    assert "val_loss" in out and "val_bpb" not in out


def _one_sentence(code: int, err: str, *words: str) -> None:
    assert code == 2, err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    for w in words:
        assert w in err, (w, err)


@pytest.mark.parametrize(
    "setup, args, words",
    [
        (None, ["--data", "{tmp}/missing.txt"], ["does not exist"]),
        ("empty", ["--data", "{tmp}/empty.txt"], ["no text"]),
        ("binary", ["--data", "{tmp}/bad.txt"], ["UTF-8"]),
        ("short", ["--data", "{tmp}/short.txt"], ["window"]),
        ("ok", ["--data", "{tmp}/ok.txt", "model.vocab_size=100"], ["vocab_size"]),
        ("ok", ["--data", "{tmp}/ok.txt", "train.lrr=1"], ["did you mean 'train.lr'"]),
        ("ok", ["--data", "{tmp}/ok.txt", "train.max_steps=ten"], ["train.max_steps", "integer"]),
        ("ok", ["--data", "{tmp}/ok.txt", "--out", "{tmp}/ok.txt/run"], ["cannot write"]),
        ("ok", ["--data", "{tmp}/ok.txt", "model.num_experts_per_tok=9"], ["num_experts_per_tok"]),
        ("ok", ["--data", "{tmp}/ok.txt", "--tokenizer", "bpe:abc"], ["bpe:VOCAB"]),
        ("ok", ["--config", "{tmp}/missing.yaml"], ["does not exist"]),
    ],
)
def test_train_bad_input(tmp_path, capsys, monkeypatch, setup, args, words):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    files = {
        "empty": ("empty.txt", b""),
        "binary": ("bad.txt", b"hello \xff\xfe world\n" * 50),
        "short": ("short.txt", b"hi\n"),
        "ok": ("ok.txt", b"some ordinary text that is long enough for a window or two. " * 40),
    }
    if setup:
        name, content = files[setup]
        (tmp_path / name).write_bytes(content)
    argv = ["train", "--out", str(tmp_path / "run"), "--no-progress", *TINY, "train.max_steps=1"]
    argv += [a.replace("{tmp}", str(tmp_path)) for a in args]
    code, _, err = _cli(capsys, *argv)
    _one_sentence(code, err, *words)


def test_resume_corrupt_checkpoint_is_refused_and_untouched(tmp_path, corpus, capsys):
    _train(tmp_path / "run", corpus, "train.max_steps=2", "train.eval_every=2")
    ck = ckpt_lib.find_checkpoint(tmp_path / "run")
    f = ck / "model.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    snapshot = {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()}
    code, _, err = _cli(
        capsys, "train", "--resume", str(tmp_path / "run"), "--no-progress", "train.max_steps=4"
    )
    _one_sentence(code, err, "corrupt")
    assert {p: p.read_bytes() for p in (tmp_path / "run").rglob("*") if p.is_file()} == snapshot


def test_existing_run_is_not_overwritten(tmp_path, corpus, capsys):
    _train(tmp_path / "run", corpus, "train.max_steps=1", "train.eval_every=1")
    code, _, err = _cli(
        capsys, "train", "--data", str(corpus), "--out", str(tmp_path / "run"), "--no-progress", *TINY
    )
    _one_sentence(code, err, "--resume")


def test_generate_bad_run_dir(tmp_path, capsys):
    code, _, err = _cli(capsys, "generate", str(tmp_path / "nope"), "--prompt", "x")
    _one_sentence(code, err, "does not exist")
    (tmp_path / "empty").mkdir()
    code, _, err = _cli(capsys, "generate", str(tmp_path / "empty"), "--prompt", "x")
    _one_sentence(code, err, "no complete checkpoint")


def test_ctrl_c_saves_and_exits_cleanly(tmp_path, corpus):
    env = dict(os.environ, MINIMOE_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "minimoe", "train", "--data", str(corpus), "--out", str(tmp_path / "run"),
           "--no-progress", *TINY, "train.max_steps=100000", "train.eval_every=100000"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.exists() and metrics.stat().st_size > 0) and time.time() < deadline:
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "interrupted" in out
    ck = ckpt_lib.find_checkpoint(tmp_path / "run")
    # the interrupted step is evaluated, logged last and saved
    last = json.loads(metrics.read_text().splitlines()[-1])
    assert "val_loss" in last and ckpt_lib.load_state(ck)["step"] == last["step"] == int(ck.name[5:])
    assert json.loads((ck / "meta.json").read_text())["val_loss"] == last["val_loss"]


def test_load_weights_rejects_other_config(tmp_path, corpus):
    _train(tmp_path / "run", corpus, "train.max_steps=1", "train.eval_every=1")
    from minimoe.config_yaml import build_run_config
    from minimoe.model.transformer import Transformer

    other = build_run_config("tiny", None, TINY + ["model.hidden_size=48", "model.vocab_size=320"]).model
    with pytest.raises(MinimoeError, match="different model config"):
        ckpt_lib.load_weights(Transformer(other), ckpt_lib.find_checkpoint(tmp_path / "run"))


def test_bf16_autocast_on_cpu_trains(tmp_path, corpus):
    res = _train(tmp_path / "run", corpus, "train.max_steps=3", "train.eval_every=3", "train.precision=bf16")
    assert res.step == 3 and res.val_loss is not None and res.val_loss == res.val_loss  # finite, not NaN


def test_compiled_training_is_one_graph_and_trains_as_eager(tmp_path, corpus, monkeypatch):
    """train.compile=true on the MoE test model (MLA, routed + shared experts, MTP, bias balancing):
    the step's forward compiles into one graph through AOTAutograd (fullgraph=True fails on any graph
    break, such as one per MoE layer) and the losses equal the eager run's step for step."""
    real_compile = torch.compile
    monkeypatch.setattr(
        torch, "compile", lambda fn, **kw: real_compile(fn, backend="aot_eager", fullgraph=True)
    )
    torch._dynamo.reset()
    steps = ["train.max_steps=4", "train.eval_every=4", "model.aux_loss_alpha=0.01"]
    _train(tmp_path / "eager", corpus, *steps)
    _train(tmp_path / "compiled", corpus, *steps, "train.compile=true")
    eager, compiled = _losses(tmp_path / "eager"), _losses(tmp_path / "compiled")
    assert list(compiled) == [1, 2, 3, 4]
    for step, loss in eager.items():
        assert compiled[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step


def test_early_stopping(tmp_path, corpus, monkeypatch):
    from minimoe.train.trainer import Trainer

    vals = iter([3.0, 2.0, 2.5, 2.6, 2.7, 2.8])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"val_loss": next(vals), "val_bpb": 1.0})
    res = _train(
        tmp_path / "run", corpus, "train.max_steps=50", "train.eval_every=1", "train.early_stop_patience=2"
    )
    assert res.stopped == "early_stop" and res.step == 4 and res.best_val_loss == 2.0
    assert (tmp_path / "run/checkpoints/best").read_text().strip() == "step_00000002"


def test_an_equal_validation_loss_is_no_improvement(tmp_path, corpus, monkeypatch):
    """Early stopping counts an evaluation that only matches the best loss as one without improvement,
    and the best checkpoint stays the first step that reached it."""
    from minimoe.train.trainer import Trainer

    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"val_loss": 2.0, "val_bpb": None})
    res = _train(
        tmp_path / "run", corpus, "train.max_steps=6", "train.eval_every=1", "train.early_stop_patience=2"
    )
    assert (res.stopped, res.step, res.best_val_loss) == ("early_stop", 3, 2.0)
    assert (tmp_path / "run/checkpoints/best").read_text().strip() == "step_00000001"


def test_an_improvement_restarts_the_patience(tmp_path, corpus, monkeypatch):
    """The patience counts the evaluations since the last improvement, not all the worse ones."""
    from minimoe.train.trainer import Trainer

    vals = iter([2.0, 2.5, 1.5, 1.8, 1.9, 2.0])
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"val_loss": next(vals), "val_bpb": None})
    res = _train(
        tmp_path / "run", corpus, "train.max_steps=6", "train.eval_every=1", "train.early_stop_patience=2"
    )
    assert (res.stopped, res.step, res.best_val_loss) == ("early_stop", 5, 1.5)


@pytest.mark.parametrize(("last", "best"), [(1.0, "step_00000003"), (3.0, "step_00000002")])
def test_the_evaluation_at_a_clock_stop_counts(tmp_path, corpus, monkeypatch, last, best):
    """When the clock ends a run between two scheduled evaluations, its last evaluation counts: it can
    become the best checkpoint; a worse one that uses up the patience still reports the clock's stop."""
    from minimoe.train.trainer import Trainer

    losses = {2: 2.0, 3: last}
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"val_loss": losses[self.step], "val_bpb": None})
    monkeypatch.setattr(Trainer, "_time_for_another_step", lambda self, *a: self.step < 3)
    res = _train(
        tmp_path / "run", corpus, "train.max_steps=10", "train.max_minutes=60", "train.eval_every=2",
        "train.early_stop_patience=1",
    )  # fmt: skip
    assert (res.stopped, res.step, res.best_val_loss) == ("max_minutes", 3, min(2.0, last))
    assert (tmp_path / "run/checkpoints/best").read_text().strip() == best


def test_a_rows_loss_is_the_loss_optimised(tmp_path, corpus):
    """A row's loss is the sum the backward takes: cross-entropy, aux and z losses and the MTP loss at
    model.mtp_loss_weight (the row's mtp column is the unweighted MTP cross-entropy)."""
    _train(tmp_path / "run", corpus, "train.max_steps=2", "train.eval_every=100", "model.aux_loss_alpha=0.01",
           "model.mtp_loss_weight=0.5")  # fmt: skip
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    for r in (r for r in rows if "loss" in r):
        assert r["aux"] > 0 and r["mtp"] > 0
        assert r["loss"] == pytest.approx(r["ce"] + r["aux"] + r["z"] + 0.5 * r["mtp"], rel=1e-5)


def test_without_validation_every_evaluation_checkpoint_is_the_best(tmp_path, corpus):
    """No validation batches (fine-tuning without a validation set): the latest checkpoint counts as
    the best, and there is no best loss."""
    tr, data = _tiny_trainer(tmp_path, corpus, "x", "train.max_steps=4", "train.eval_every=2")
    from minimoe.train.trainer import Trainer

    tr = Trainer(tr.cfg, tmp_path / "run", None, data.tokenizer(), progress=False,
                 train_batches=tr.train_windows)  # fmt: skip
    res = tr.fit()
    assert (res.step, res.val_loss, res.best_val_loss) == (4, None, None)
    assert (tmp_path / "run/checkpoints/best").read_text().strip() == "step_00000004"


def test_an_interrupt_at_a_pause_is_reported_as_an_interrupt(tmp_path, corpus, monkeypatch):
    """Ctrl-C during the step a pause ends on: the run says it was interrupted."""
    import minimoe.train.trainer as trainer_mod

    class Asked(trainer_mod.Interrupt):
        def __enter__(self):
            self.requested = True
            return self

    monkeypatch.setattr(trainer_mod, "Interrupt", Asked)
    tr, _ = _tiny_trainer(tmp_path, corpus, "run", "train.max_steps=10", "train.eval_every=100")
    res = tr.fit(stop_after=1)
    assert (res.stopped, res.step) == ("interrupted", 1)


def test_an_interrupt_saves_before_its_evaluation(tmp_path, corpus, monkeypatch):
    """Ctrl-C or SIGTERM: the checkpoint is written before the evaluation at the stop (whose loss is
    logged only), since a scheduler kills a process some seconds after its SIGTERM; a stop on the
    schedule's evaluation step saves after it, with the loss that picks the best checkpoint."""
    import minimoe.train.trainer as trainer_mod

    class Asked(trainer_mod.Interrupt):
        def __enter__(self):
            self.requested = True
            return self

    seen = []
    real = trainer_mod.Trainer.evaluate

    def evaluate(self):
        saved = ckpt_lib.latest_checkpoint(self.run_dir)
        seen.append((self.step, saved.name if saved else None))
        return real(self)

    monkeypatch.setattr(trainer_mod.Trainer, "evaluate", evaluate)
    monkeypatch.setattr(trainer_mod, "Interrupt", Asked)
    for every, saved_first in ((100, "step_00000001"), (1, None)):
        seen.clear()
        tr, _ = _tiny_trainer(
            tmp_path, corpus, f"run{every}", "train.max_steps=10", f"train.eval_every={every}"
        )
        res = tr.fit()
        assert (res.stopped, res.step, seen) == ("interrupted", 1, [(1, saved_first)])
        rows = [
            json.loads(line) for line in (tmp_path / f"run{every}/metrics.jsonl").read_text().splitlines()
        ]
        assert any("val_loss" in r for r in rows)  # the evaluation is still logged
        meta = json.loads((ckpt_lib.latest_checkpoint(tmp_path / f"run{every}") / "meta.json").read_text())
        assert meta["step"] == 1 and meta["val_loss"] == [r for r in rows if "val_loss" in r][-1]["val_loss"]
        # an evaluation at a stop asked for does not choose the best checkpoint; the schedule's does
        assert (tmp_path / f"run{every}/checkpoints/best").exists() == (every == 1)


def test_non_finite_loss_skips_steps_then_stops(tmp_path, corpus, monkeypatch):
    from minimoe.model.transformer import Transformer

    real = Transformer.forward
    calls = {"n": 0}

    def flaky(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if out.loss is not None and calls["n"] > 2:  # steps 1-2 fine, then NaN forever
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(Transformer, "forward", flaky)
    with pytest.raises(MinimoeError, match="diverged"):
        _train(tmp_path / "run", corpus, "train.max_steps=20", "train.eval_every=2")
    ck = ckpt_lib.find_checkpoint(tmp_path / "run")
    assert ck.name == "step_00000002"
    ckpt_lib.load_run(tmp_path / "run")  # the last good checkpoint still loads


class _RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_state_file_that_would_run_code_is_refused(tmp_path, corpus):
    _train(tmp_path / "run", corpus, "train.max_steps=1", "train.eval_every=1")
    ck = ckpt_lib.find_checkpoint(tmp_path / "run")
    marker = tmp_path / "code-ran"
    torch.save({"step": 1, "payload": _RunsCode(marker)}, ck / "state.pt")
    with pytest.raises(MinimoeError, match="refusing"):
        ckpt_lib.load_state(ck)
    assert not marker.exists()


def test_time_limit_stops_and_finishes_the_decay(tmp_path, corpus, monkeypatch):
    """A run the clock stops: the cosine ran on the clock, the last step is evaluated and saved, and
    the progress bar is told the run used its budget (it ends at 100%, though the stop comes before
    the clock runs out: the finish must fit inside the budget)."""
    from minimoe.train.progress import TrainProgress

    closed = []
    close = TrainProgress.close
    monkeypatch.setattr(
        TrainProgress, "close", lambda bar, *a, **kw: (closed.append(kw), close(bar, *a, **kw))
    )
    res = _train(
        tmp_path / "run", corpus, "train.max_steps=100000", "train.max_minutes=0.05", "train.eval_every=100000",
        "train.min_lr_ratio=0.1", "train.lr=1e-3",
    )  # fmt: skip
    assert res.stopped == "max_minutes" and 0 < res.step < 100000
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] < 0.3e-3  # the cosine ran on the clock: near its 1e-4 floor at the end, not at the peak
    assert rows[-1]["step"] == res.step and "val_loss" in rows[-1]  # evaluated and saved at the stop
    assert closed == [{"complete": True}]


def test_cpu_clock_limits_by_process_time(tmp_path, corpus, monkeypatch):
    """train.clock=cpu reads time.process_time: a fake CPU clock that runs 1 s per reading stops the run
    within a 1-minute budget after a few steps; the same fake leaves a wall-clock run alone."""
    import minimoe.train.trainer as trainer_mod

    ticks = iter(range(0, 10**7))  # one CPU-second per reading
    monkeypatch.setattr(trainer_mod.time, "process_time", lambda: float(next(ticks)))
    common = ("train.max_minutes=1", "train.eval_every=1000", "train.warmup_steps=0")
    cpu = _train(tmp_path / "cpu", corpus, *common, "train.clock=cpu", "train.max_steps=500")
    assert cpu.stopped == "max_minutes" and 3 <= cpu.step < 60
    meta = json.loads((ckpt_lib.find_checkpoint(tmp_path / "cpu") / "meta.json").read_text())
    assert meta["clock"] == "cpu" and meta["elapsed_s"] >= 60
    rows = [json.loads(line) for line in (tmp_path / "cpu/metrics.jsonl").read_text().splitlines()]
    lrs = [r["lr"] for r in rows if "lr" in r]
    assert lrs[-1] < 0.5 * lrs[0]  # the schedule followed the CPU clock
    wall = _train(tmp_path / "wall", corpus, *common, "train.clock=wall", "train.max_steps=40")
    assert wall.stopped == "max_steps" and wall.step == 40


def _muon_model_and_opt(*extra):
    from minimoe.config_yaml import build_run_config
    from minimoe.model.transformer import Transformer
    from minimoe.train.optim import build_optimizer

    cfg = build_run_config(None, None, TINY + ["model.mtp_depth=1", "train.optimizer=muon", *extra])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    return model, build_optimizer(model, cfg.train, torch.device("cpu"))


def test_muon_ns_steps_sets_the_iterations_of_the_step():
    """train.muon_ns_steps reaches the Newton-Schulz iteration: a first step by hand with that many."""
    from minimoe.train.optim import newton_schulz

    model, opt = _muon_model_and_opt("train.muon_ns_steps=2", "train.precision=fp32")
    (group,) = [g for g in opt.param_groups if g["use_muon"]]
    assert group["ns_steps"] == 2
    p = group["params"][0]
    w0, g = p.detach().clone(), torch.randn_like(p)
    for q in model.parameters():
        q.grad = None
    p.grad = g.clone()
    opt.step()
    lr, wd = group["lr"], group["weight_decay"]
    scale = 0.2 * math.sqrt(max(p.size(-2), p.size(-1)))
    want = w0 * (1 - lr * wd) - lr * scale * newton_schulz(g * 1.95, steps=2)
    torch.testing.assert_close(p.detach(), want)
    assert not torch.allclose(newton_schulz(g * 1.95, steps=2), newton_schulz(g * 1.95))


def test_muon_experts_false_leaves_the_routed_experts_to_adamw():
    """train.muon_experts=false: the routed experts' stacks (main layers and MTP) join AdamW's decayed group;
    the shared experts, attention and dense layers stay on Muon."""
    model, opt = _muon_model_and_opt("train.muon_experts=false", "model.n_shared_experts=1")
    on_muon = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    decayed = {
        id(p) for g in opt.param_groups if not g["use_muon"] and g["weight_decay"] > 0 for p in g["params"]
    }
    routed = {n for n, _ in model.named_parameters() if ".mlp.experts." in n}
    assert routed and any(n.startswith("mtp.") for n in routed)
    for n, p in model.named_parameters():
        if n in routed:
            assert id(p) in decayed and id(p) not in on_muon, n
        elif ".shared_experts." in n or "self_attn.q_proj" in n or n == "layers.0.mlp.gate_proj.weight":
            assert id(p) in on_muon, n
    _, default = _muon_model_and_opt("model.n_shared_experts=1")
    assert len([p for g in default.param_groups if g["use_muon"] for p in g["params"]]) == len(on_muon) + len(
        routed
    )


def test_muon_trains_the_hidden_matrices_and_adamw_the_rest():
    from minimoe.train.optim import muon_param_names

    model, opt = _muon_model_and_opt("model.tie_word_embeddings=true")
    names = muon_param_names(model)
    assert "layers.1.mlp.experts.gate_proj" in names and "layers.0.self_attn.q_proj.weight" in names
    assert "mtp.0.eh_proj.weight" in names and "layers.0.mlp.gate_proj.weight" in names
    for n, p in model.named_parameters():
        if p.dim() < 2 or n.startswith(("embed_tokens", "lm_head")) or n.endswith("mlp.gate.weight"):
            assert n not in names, n  # norms, biases, the embedding (= tied head) and routers: AdamW
    muon_ids = {id(p) for g in opt.param_groups if g["use_muon"] for p in g["params"]}
    adam_ids = {id(p) for g in opt.param_groups if not g["use_muon"] for p in g["params"]}
    assert not muon_ids & adam_ids and len(muon_ids | adam_ids) == len(list(model.parameters()))
    x = torch.randint(0, 256, (2, 16))
    for muon_on in (True, False):  # one step with only one kind of group switched on
        model, opt = _muon_model_and_opt("model.tie_word_embeddings=true")
        for g in opt.param_groups:
            g["lr"] = 1e-2 if g["use_muon"] == muon_on else 0.0
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        model(x, targets=x).loss.backward()
        opt.step()
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        kind = {n for n, _ in model.named_parameters() if (n in names) == muon_on}
        assert changed <= kind, changed - kind
        assert len(changed) >= 0.8 * len(kind)  # some parameters get no gradient in one step (e.g. MTP)


def test_muon_step_matches_torch_muon():
    """Reference: torch.optim.Muon (bf16 Newton-Schulz, 2-D only) with Moonlight's lr adjustment; ours runs
    the iteration in fp32 and batches it over experts, so an (E, m, n) tensor must equal E matrices."""
    from minimoe.train.optim import MuonAdamW, newton_schulz

    torch.manual_seed(0)
    w0 = torch.randn(24, 40)
    grads = [torch.randn(24, 40) for _ in range(3)]
    ours, ref = torch.nn.Parameter(w0.clone()), torch.nn.Parameter(w0.clone())
    opt = MuonAdamW([ours], [], lr=0.02, muon_lr=0.02)
    tref = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for g in grads:
        ours.grad, ref.grad = g.clone(), g.clone()
        opt.step()
        tref.step()
    step = (ref - w0).norm()
    assert (ours - ref).norm() < 0.02 * step  # bf16 against fp32 iterations
    stack = torch.randn(3, 20, 12)
    batched = newton_schulz(stack)
    assert torch.allclose(batched, torch.stack([newton_schulz(m) for m in stack]), atol=1e-6)
    sv = torch.linalg.svdvals(batched[0])
    assert sv.min() > 0.5 and sv.max() < 1.3  # orthogonalised: singular values near 1
    # in bf16 (what a bf16 run uses): computed in bf16, returned in the input's dtype, the same step
    # as torch's within bf16's rounding
    in_bf16 = newton_schulz(stack, dtype=torch.bfloat16)
    assert in_bf16.dtype == torch.float32
    assert torch.equal(in_bf16, newton_schulz(stack.bfloat16()).float())
    assert not torch.equal(in_bf16, batched)
    ours = torch.nn.Parameter(w0.clone())
    opt = MuonAdamW([ours], [], lr=0.02, muon_lr=0.02, ns_dtype=torch.bfloat16)
    for i, g in enumerate(grads):
        ours.grad = g.clone()
        opt.step()
        if i == 0:  # the first step by hand: momentum buffer = g, nesterov update g + 0.95 g, in bf16
            scale = 0.2 * math.sqrt(40)
            update = newton_schulz(g * 1.95, dtype=torch.bfloat16)
            torch.testing.assert_close(ours.detach(), w0 * (1 - 0.02 * 0.1) - 0.02 * scale * update)
    assert (ours - ref).norm() < 0.02 * step


@pytest.mark.parametrize("precision, ns_dtype", [("bf16", torch.bfloat16), ("fp32", None)])
def test_muon_orthogonalises_in_bf16_when_training_does(precision, ns_dtype):
    _, opt = _muon_model_and_opt(f"train.precision={precision}")
    assert opt.ns_dtype == ns_dtype


def test_muon_steps_an_expert_stack_as_its_matrices():
    """An (E, out, in) expert tensor takes the Muon steps of its E matrices stepped one by one: each is
    orthogonalised on its own (not the (E * out, in) stack as one matrix) and scaled by
    0.2 * sqrt(max(out, in)), whatever E (here larger than both)."""
    from minimoe.train.optim import MuonAdamW

    torch.manual_seed(0)
    w0 = torch.randn(16, 6, 10)
    grads = [torch.randn(16, 6, 10) for _ in range(2)]
    stack = torch.nn.Parameter(w0.clone())
    mats = [torch.nn.Parameter(w.clone()) for w in w0]
    opt_stack = MuonAdamW([stack], [], lr=0.02, muon_lr=0.02)
    opt_mats = MuonAdamW(mats, [], lr=0.02, muon_lr=0.02)
    for g in grads:
        stack.grad = g.clone()
        for m, gm in zip(mats, g):
            m.grad = gm.clone()
        opt_stack.step()
        opt_mats.step()
    torch.testing.assert_close(stack.detach(), torch.stack([m.detach() for m in mats]), rtol=1e-5, atol=1e-6)


def test_muon_steps_many_matrices_together_as_each_alone():
    """The optimizer stacks every matrix of one shape (tall ones transposed) into one batched iteration:
    a step over parameters of mixed shapes, with shapes shared across parameters and an expert stack, in
    fp32 and bf16, equals each parameter stepped by an optimizer of its own."""
    from minimoe.train.optim import MuonAdamW, by_matrix_shape, newton_schulz, newton_schulz_many

    torch.manual_seed(0)
    shapes = [(6, 10), (10, 6), (3, 6, 10), (3, 10, 6), (6, 10), (8, 8), (12, 5)]
    w0 = [torch.randn(s) for s in shapes]
    grads = [[torch.randn(s) for s in shapes] for _ in range(3)]
    for ns_dtype in (None, torch.bfloat16):
        together = [torch.nn.Parameter(w.clone()) for w in w0]
        alone = [torch.nn.Parameter(w.clone()) for w in w0]
        opt = MuonAdamW(together, [], lr=0.02, muon_lr=0.02, ns_dtype=ns_dtype)
        opts = [MuonAdamW([p], [], lr=0.02, muon_lr=0.02, ns_dtype=ns_dtype) for p in alone]
        for step in grads:
            for p, q, g in zip(together, alone, step):
                p.grad, q.grad = g.clone(), g.clone()
            opt.step()
            for o in opts:
                o.step()
        for p, q in zip(together, alone):
            torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-5, atol=1e-6)
    # a tall matrix steps as torch.optim.Muon steps it (scaled by its larger side, not its last)
    ref = torch.nn.Parameter(w0[1].clone())
    tref = torch.optim.Muon([ref], lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for step in grads:
        ref.grad = step[1].clone()
        tref.step()
    assert (together[1] - ref).norm() < 0.02 * (ref - w0[1]).norm()
    # the batches: every tensor whose matrices share a shape once tall ones are transposed, expert stacks too
    assert by_matrix_shape([torch.empty(s) for s in shapes]) == [[0, 1, 2, 3, 4], [5], [6]]
    # a tall matrix is orthogonalised as the transpose of its transpose, in the input's shape
    tall = torch.randn(12, 5)
    out = newton_schulz_many([tall, tall.T.clone()])
    assert out[0].shape == (12, 5)
    torch.testing.assert_close(out[0], out[1].T)
    torch.testing.assert_close(out[0], newton_schulz(tall))


def test_wandb_offline_logging(tmp_path, corpus, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    _train(tmp_path / "run", corpus, "train.max_steps=2", "train.eval_every=2", "train.wandb=true")
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and list(runs[0].glob("*.wandb"))  # the offline run file `wandb sync` uploads
    # a resumed session logs to the same W&B run (its offline folder ends with the run's id)
    _train(tmp_path / "run", corpus, "train.max_steps=4", "train.eval_every=2", resume=True)
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    run_id = (tmp_path / "run" / "wandb_run_id").read_text().strip()
    assert len(runs) == 2 and all(r.name.endswith(f"-{run_id}") for r in runs)


def test_wandb_run_id_is_kept_by_a_resume_not_by_a_new_run_in_the_same_folder(tmp_path, monkeypatch):
    """A session from step 0 (a new run in a folder whose earlier attempt saved no checkpoint) starts its
    own W&B run; a resumed session continues the id of the run it resumes."""
    import sys
    import types

    from minimoe.config_yaml import build_run_config
    from minimoe.train.metrics import MetricWriters

    calls = []
    fake = types.ModuleType("wandb")
    fake.init = lambda **kw: calls.append(kw) or types.SimpleNamespace(finish=lambda: None)
    monkeypatch.setitem(sys.modules, "wandb", fake)
    cfg = build_run_config("tiny", None, ["train.wandb=true"])
    for step in (0, 0, 5):
        MetricWriters(tmp_path / "metrics.jsonl").open(cfg, tmp_path, step)
    ids = [c["id"] for c in calls]
    assert ids[0] != ids[1] and ids[2] == ids[1] == (tmp_path / "wandb_run_id").read_text().strip()


@pytest.mark.parametrize(("key", "module"), [("tensorboard", "torch.utils.tensorboard"), ("wandb", "wandb")])
def test_a_missing_logger_is_refused_before_the_run_changes(tmp_path, corpus, monkeypatch, key, module):
    """train.tensorboard / train.wandb without the package: one sentence, before data preparation, and a
    refused resume leaves config.yaml as it was (a kept `=true` would refuse every later plain resume)."""
    import sys

    run = tmp_path / "run"
    _train(run, corpus, "train.max_steps=2", "train.eval_every=2")
    config, rows = (run / "config.yaml").read_text(), (run / "metrics.jsonl").read_text()
    monkeypatch.setitem(sys.modules, module, None)  # `import` of it raises ImportError
    with pytest.raises(MinimoeError, match=rf"^train\.{key}=true needs {key} \(pip install {key}\)$"):
        _train(run, corpus, "train.max_steps=3", f"train.{key}=true", resume=True)
    assert (run / "config.yaml").read_text() == config and (run / "metrics.jsonl").read_text() == rows
    with pytest.raises(MinimoeError, match=f"needs {key}"):
        _train(tmp_path / "new", corpus, f"train.{key}=true")
    assert not (tmp_path / "new").exists()


def test_resume_keeps_the_separate_validation_data(tmp_path, corpus):
    val = tmp_path / "val.txt"
    val.write_text("a completely different validation text, held out from training. " * 30, encoding="utf-8")
    _train(tmp_path / "run", corpus, "train.max_steps=2", "train.eval_every=2", val_source=str(val))
    first = _losses(tmp_path / "run")
    res = _train(tmp_path / "run", corpus, "train.max_steps=4", "train.eval_every=2", resume=True)
    from minimoe.config import RunConfig
    from minimoe.config_yaml import dataclass_from_dict, load_yaml

    cfg = dataclass_from_dict(RunConfig, load_yaml(tmp_path / "run" / "config.yaml"))
    assert cfg.data.val_path == str(val) and res.step == 4 and len(_losses(tmp_path / "run")) > len(first)


def test_balance_step_runs_once_per_optimizer_step(tmp_path, corpus):
    # sign rule: one balancing step moves every bias entry by exactly speed (or 0 for an expert at the
    # mean load); a step per micro-batch would move most entries by 2 * speed (speed is too small to
    # change the routing between the two micro-batches)
    speed = 1e-3
    res = _train(
        tmp_path / "run", corpus, "train.max_steps=1", "train.grad_accum=2", "model.scoring_func=sigmoid",
        "model.aux_free_bias=true", f"model.bias_update_speed={speed}",
    )  # fmt: skip
    from minimoe.train.checkpoint import load_run

    model, *_ = load_run(res.checkpoint)
    biases = torch.stack([m.gate.e_score_correction_bias for m in model.moe_layers().values()])
    moved = biases.abs()
    assert torch.all((moved < 1e-9) | ((moved - speed).abs() < 1e-9)), biases
    assert moved.max() > 0


def test_schedule_edges_and_floors():
    # the warmup ends at exactly the peak (step == warmup is the first post-warmup step, never above 1)
    for sched in ("cosine", "linear", "constant", "wsd"):
        assert lr_multiplier(10, 100, sched, 10) == pytest.approx(1.0), sched
        mults = [lr_multiplier(s, 100, sched, 10, min_ratio=0.1) for s in range(101)]
        assert all(0 < m <= 1.0 for m in mults), sched
        after = mults[9:]
        assert all(a >= b for a, b in zip(after, after[1:])), sched  # no rise after the warmup
    # min_ratio is the floor of every decaying schedule, and scales the way there
    assert lr_multiplier(100, 100, "linear", 10, min_ratio=0.1) == pytest.approx(0.1)
    assert lr_multiplier(55, 100, "linear", 10, min_ratio=0.1) == pytest.approx(0.55)
    assert lr_multiplier(100, 100, "wsd", 10, min_ratio=0.1, decay_fraction=0.2) == pytest.approx(0.1)
    assert lr_multiplier(90, 100, "wsd", 10, min_ratio=0.1, decay_fraction=0.2) == pytest.approx(0.55)
    assert lr_multiplier(80, 100, "wsd", 10, min_ratio=0.1, decay_fraction=0.2) == pytest.approx(1.0)


def test_wsd_decays_over_its_fraction_of_the_steps():
    """WSD decays over decay_fraction x max_steps steps, also where that product comes out of floating
    point just under a whole number (0.29 x 100 = 28.999999999999996: 29 steps, not 28)."""
    for fraction in (0.29, 0.57, 0.2):
        start = 100 - round(fraction * 100)
        assert lr_multiplier(start - 1, 100, "wsd", 10, min_ratio=0.1, decay_fraction=fraction) == 1.0
        got = lr_multiplier(start + 1, 100, "wsd", 10, min_ratio=0.1, decay_fraction=fraction)
        assert got == pytest.approx(1 - 0.9 / round(fraction * 100)), fraction


def test_cosine_scales_the_way_down_to_its_floor():
    """The cosine runs from 1 at the end of the warmup to min_ratio at max_steps, scaled into
    [min_ratio, 1] at every step between (not a plain cosine clipped at the floor)."""
    warmup, total, floor = 10, 100, 0.2
    for step in range(warmup, total + 1):
        progress = (step - warmup) / (total - warmup)
        want = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
        assert lr_multiplier(step, total, "cosine", warmup, min_ratio=floor) == pytest.approx(want), step
    assert lr_multiplier(55, 100, "cosine", 10, min_ratio=0.1) == pytest.approx(0.55)


def test_muon_lr_is_the_peak_of_the_muon_group_only():
    """train.muon_lr sets the Muon group's lr and base_lr (the peak the trainer's schedule scales); the
    AdamW groups keep train.lr."""
    model, opt = _muon_model_and_opt("train.lr=1e-3", "train.muon_lr=0.05")
    groups = opt.param_groups
    assert any(g["use_muon"] for g in groups) and any(not g["use_muon"] for g in groups)
    for g in groups:
        want = 0.05 if g["use_muon"] else 1e-3
        assert g["lr"] == pytest.approx(want) and g["base_lr"] == pytest.approx(want), g["use_muon"]


def test_muon_lr_stays_the_peak_of_the_muon_group_while_training(tmp_path, corpus):
    """The trainer's schedule scales each group's own peak: after a step at a constant schedule the Muon
    group runs at train.muon_lr and the AdamW groups at train.lr."""
    tr, _ = _tiny_trainer(
        tmp_path, corpus, "run", "train.optimizer=muon", "train.lr=1e-3", "train.muon_lr=0.02",
        "train.schedule=constant", "train.warmup_steps=0", "train.max_steps=1", "train.eval_every=100",
    )  # fmt: skip
    tr.fit()
    groups = tr.optimizer.param_groups
    assert any(g["use_muon"] for g in groups) and any(not g["use_muon"] for g in groups)
    for g in groups:
        assert g["lr"] == pytest.approx(0.02 if g["use_muon"] else 1e-3), g["use_muon"]


def test_muon_optimizers_adamw_groups_step_like_torch_adamw():
    """The AdamW groups of MuonAdamW (embedding, LM head, routers, norms) take torch.optim.AdamW's steps,
    each with its group's weight decay and the betas in their order."""
    from minimoe.train.optim import MuonAdamW

    torch.manual_seed(0)
    w0, b0 = torch.randn(6, 4), torch.randn(4)
    ours = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]
    ref = [torch.nn.Parameter(w0.clone()), torch.nn.Parameter(b0.clone())]

    def groups(ps):
        return [{"params": [ps[0]], "weight_decay": 0.5}, {"params": [ps[1]], "weight_decay": 0.0}]

    opt = MuonAdamW([], groups(ours), lr=0.05, muon_lr=0.05, betas=(0.8, 0.9))
    tref = torch.optim.AdamW(groups(ref), lr=0.05, betas=(0.8, 0.9), eps=1e-8)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in ours]
        for p, q, g in zip(ours, ref, grads):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        tref.step()
    for p, q in zip(ours, ref):
        assert torch.allclose(p, q, atol=1e-6), (p - q).abs().max()


def test_muon_optimizers_adamw_groups_continue_a_loaded_state():
    """A loaded state's AdamW step counters, which torch's load_state_dict leaves where they were read (the
    CPU, while the parameters may be on a GPU) and as saved, are brought to the parameter's device as fp32
    before the fused kernel runs, and the steps continue as if never saved."""
    import copy

    from minimoe.train.optim import MuonAdamW

    torch.manual_seed(0)
    ps = [torch.nn.Parameter(torch.randn(6, 4)), torch.nn.Parameter(torch.randn(6, 4))]
    opt = MuonAdamW([], [{"params": ps}], lr=0.05, muon_lr=0.05)
    for _ in range(2):
        for p in ps:
            p.grad = torch.randn_like(p)
        opt.step()
    saved = copy.deepcopy(opt.state_dict())  # state_dict shares the moments with `opt`
    saved["state"][0]["step"] = saved["state"][0]["step"].double()  # as an older writer might hold it
    again = [torch.nn.Parameter(p.detach().clone()) for p in ps]
    loaded = MuonAdamW([], [{"params": again}], lr=0.05, muon_lr=0.05)
    loaded.load_state_dict(saved)
    g = [torch.randn_like(p) for p in ps]
    for p, q, gi in zip(ps, again, g):
        p.grad, q.grad = gi.clone(), gi.clone()
    opt.step()
    loaded.step()
    for p, q in zip(ps, again):
        assert torch.equal(p, q)
        st = loaded.state[q]["step"]
        assert st.dtype == torch.float32 and st.device == q.device and float(st) == 3


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_weight_decay_spares_norms_and_biases(optimizer):
    """AdamW decays matrices only: every 1-D parameter (norms, biases) sits in a group with weight decay
    0, every AdamW matrix in one with train.weight_decay (Muon's matrices decay in their own group)."""
    from minimoe.config_yaml import build_run_config
    from minimoe.model.transformer import Transformer
    from minimoe.train.optim import build_optimizer

    cfg = build_run_config(None, None, TINY + [f"train.optimizer={optimizer}", "train.weight_decay=0.1"])
    torch.manual_seed(0)
    model = Transformer(cfg.model)
    opt = build_optimizer(model, cfg.train, torch.device("cpu"))
    wd = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    params = list(model.parameters())
    assert len(wd) == len(params)
    vectors = [p for p in params if p.dim() < 2]
    assert vectors  # norms exist in the tiny model
    assert all(wd[id(p)] == 0.0 for p in vectors)
    assert all(wd[id(p)] == pytest.approx(0.1) for p in params if p.dim() >= 2)


class _FixedBatches:
    """A batch source that yields `parts` in turn, forever (the trainer's train_batches protocol)."""

    def __init__(self, parts):
        self.parts, self.i = parts, 0

    def __next__(self):
        xy = self.parts[self.i % len(self.parts)]
        self.i += 1
        return xy

    def state_dict(self):
        return {"i": self.i}

    def load_state_dict(self, state):
        self.i = state["i"]


def _tiny_trainer(tmp_path, corpus, name, *extra, **kw):
    from minimoe.config_yaml import build_run_config
    from minimoe.data import prepare
    from minimoe.train.run import data_cache_dir
    from minimoe.train.trainer import Trainer

    cfg = build_run_config("tiny", None, TINY + [f"data.path={corpus}", *extra])
    data = prepare(corpus, "byte", data_cache_dir(cfg.data, None), workers=0, progress=False)
    cfg.model.vocab_size = 320
    torch.manual_seed(0)
    return Trainer(cfg, tmp_path / name, data, data.tokenizer(), progress=False, **kw), data


def test_a_run_prepared_without_validation_trains_and_keeps_its_latest_as_best(tmp_path, corpus):
    """data.val_fraction=0 (no validation split, none asked for): the run trains, logs no validation
    loss, and its latest checkpoint counts as the best, where it used to stop at its start with a
    message asking for the validation split it was told not to make."""
    res = _train(tmp_path / "run", corpus, "train.max_steps=2", "train.eval_every=1", "data.val_fraction=0")
    assert (res.step, res.val_loss, res.best_val_loss) == (2, None, None)
    assert (tmp_path / "run/checkpoints/best").read_text().strip() == "step_00000002"
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert rows and not any("val_loss" in r for r in rows)


def test_grad_accum_averages_micro_batches(tmp_path, corpus):
    """One step over a batch of 4 rows equals one step over 2 micro-batches of 2 rows: the same logged
    loss and gradient norm (the loss is divided by grad_accum for the backward and for the log)."""
    from minimoe.data import TokenWindows

    rows: dict[str, dict] = {}
    for name, bs, accum in (("whole", 4, 1), ("accum", 2, 2)):
        common = ("train.max_steps=1", "train.eval_every=100", "train.grad_clip=0")
        tr, data = _tiny_trainer(tmp_path, corpus, name, *common, f"train.batch_size={bs}",
                                 f"train.grad_accum={accum}", "train.warmup_steps=0")  # fmt: skip
        x, y = TokenWindows(data, "train", 32, 4, seed=5).batch_at(0)
        tr.train_windows = _FixedBatches([(x, y)] if accum == 1 else [(x[:2], y[:2]), (x[2:], y[2:])])
        tr.fit()
        lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
        rows[name] = next(r for r in map(json.loads, lines) if "loss" in r)
    for key in ("loss", "grad_norm"):
        assert rows["accum"][key] == pytest.approx(rows["whole"][key], rel=1e-4), key


def _one_step_grads_and_biases(tmp_path, corpus, name, x, y, accum, *extra):
    """Train one step on the rows of (x, y), split into `accum` equal micro-batches: the gradients the
    optimizer receives, the balancing biases after the step and the logged metrics row."""
    common = ("train.max_steps=1", "train.eval_every=100", "train.grad_clip=0", "train.warmup_steps=0")
    tr, _ = _tiny_trainer(tmp_path, corpus, name, *common, f"train.batch_size={len(x) // accum}",
                          f"train.grad_accum={accum}", *extra)  # fmt: skip
    rows = len(x) // accum
    tr.train_windows = _FixedBatches([(x[i : i + rows], y[i : i + rows]) for i in range(0, len(x), rows)])
    grads, step = {}, tr.optimizer.step

    def record_then_step(*args, **kwargs):
        grads.update({n: p.grad.clone() for n, p in tr.model.named_parameters() if p.grad is not None})
        return step(*args, **kwargs)

    tr.optimizer.step = record_then_step
    tr.fit()
    biases = {i: m.gate.e_score_correction_bias.clone() for i, m in tr.model.moe_layers().items()}
    lines = (tmp_path / name / "metrics.jsonl").read_text().splitlines()
    return grads, biases, next(r for r in map(json.loads, lines) if "loss" in r)


@pytest.mark.parametrize("padded", [False, True])
def test_grad_accum_step_equals_one_batch_step(tmp_path, corpus, padded):
    """Two micro-batches of 2 rows give the gradients and the balancing step of one batch of 4 rows: the
    z-loss and the sequence-wise balance loss count each micro-batch by its rows, and the bias moves
    once, from the loads of both micro-batches (softmax scoring: the proportional rule sees the loads
    themselves, not only their signs; the MTP block's router included). Padded: the first micro-batch
    holds 8 targets, the second 64, and each cross-entropy counts by its share of the targets, as in
    one batch (the MTP loss, whose targets are the main ones shifted, is left out)."""
    from minimoe.data import TokenWindows

    extra = ["model.z_loss_coef=0.01", "model.seq_aux_loss_alpha=0.01", "model.scoring_func=softmax",
             "model.aux_free_bias=true", "model.bias_update_speed=0.01"]  # fmt: skip
    tr, data = _tiny_trainer(tmp_path, corpus, "data", "train.max_steps=1")
    x, y = TokenWindows(data, "train", 32, 4, seed=5).batch_at(0)
    if padded:
        y = y.clone()
        y[:2, :28] = -100  # targets only at the end of the first two rows, as in a fine-tuning batch
        extra.append("model.mtp_depth=0")
    g1, b1, row1 = _one_step_grads_and_biases(tmp_path, corpus, "whole", x, y, 1, *extra)
    g2, b2, row2 = _one_step_grads_and_biases(tmp_path, corpus, "accum", x, y, 2, *extra)
    assert row2["loss"] == pytest.approx(row1["loss"], rel=1e-5)
    assert row2["z"] == pytest.approx(row1["z"], rel=1e-5)
    assert g1.keys() == g2.keys() and g1
    for n in g1:
        assert (g2[n] - g1[n]).norm() <= 1e-5 * g1[n].norm() + 1e-9, n  # float reassociation only
    assert len(b1) == (1 if padded else 2)  # layer 1 (layer 0 is dense), and the MTP block's
    for i in b1:
        assert b1[i].abs().max() > 0, i
        torch.testing.assert_close(b2[i], b1[i], rtol=1e-5, atol=1e-8, msg=f"layer {i}")


def test_time_limited_schedule_counts_the_warmup_in_steps_then_follows_the_clock():
    """With train.max_minutes the schedule sees whichever of the step and the elapsed fraction of the time
    budget (as a step of max_steps) is further along, capped at max_steps; the warmup counts steps only,
    however much of the time it takes."""
    from types import SimpleNamespace

    from minimoe.train.schedule import schedule_step

    tc = SimpleNamespace(max_minutes=1.0, max_steps=1000, warmup_steps=10)

    def seen(step: int, seconds: float) -> int:
        return schedule_step(step, seconds, tc)

    assert seen(3, 30.0) == 3 and seen(9, 59.0) == 9  # in the warmup: the step, not the clock's 500 / 983
    assert seen(10, 30.0) == 500  # half the time gone: half of max_steps
    assert seen(600, 30.0) == 600  # the steps further along than the clock
    assert seen(20, 90.0) == 1000  # past the budget: capped
    tc.max_minutes = None
    assert seen(5, 1e6) == 5


def test_a_skipped_steps_losses_stay_out_of_the_row(tmp_path, corpus, monkeypatch):
    """A step skipped for a non-finite loss adds nothing to the logging window: the next row's loss
    parts are those of the step that was taken."""
    from minimoe.model.transformer import Transformer

    real, calls = Transformer.forward, {"n": 0}

    def flaky(self, *a, **k):
        out = real(self, *a, **k)
        calls["n"] += 1
        if out.loss is not None and calls["n"] == 2:  # the second batch: NaN in the loss and its parts
            out.loss = out.loss * float("nan")
            out.losses = {k: v * float("nan") for k, v in out.losses.items()}
        return out

    monkeypatch.setattr(Transformer, "forward", flaky)
    _train(tmp_path / "run", corpus, "train.max_steps=2", "train.eval_every=100")
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    for r in (r for r in rows if "loss" in r):
        assert all(math.isfinite(r[k]) for k in ("loss", "ce", "aux", "z", "mtp", "router_z")), r


def test_the_results_train_loss_is_the_last_rows(tmp_path, corpus):
    """TrainResult.train_loss is the last row's loss: the mean over its window's steps."""
    res = _train(tmp_path / "run", corpus, "train.max_steps=4", "train.eval_every=100", "train.log_every=4")
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    assert res.train_loss == [r for r in rows if "loss" in r][-1]["loss"]


def test_a_resumed_session_pauses_after_its_own_steps(tmp_path, corpus):
    """fit(stop_after=n) counts the steps of this session, from where a resume continues."""
    common = ("train.max_steps=10", "train.eval_every=100")
    tr, _ = _tiny_trainer(tmp_path, corpus, "run", *common)
    assert tr.fit(stop_after=2).step == 2
    tr, _ = _tiny_trainer(tmp_path, corpus, "run", *common, resume=True)
    res = tr.fit(stop_after=2)
    assert (res.stopped, res.step) == ("paused", 4)


def test_time_limited_schedule_takes_the_step_the_clock_has_reached():
    """The clock's step is the whole steps of the elapsed fraction: rounded down, not to the nearest."""
    from types import SimpleNamespace

    from minimoe.train.schedule import schedule_step

    tc = SimpleNamespace(max_minutes=1.0, max_steps=1000, warmup_steps=0)
    assert schedule_step(0, 29.97, tc) == 499  # 499.5 steps' worth of the budget


def test_grad_clip_scales_the_gradient_to_the_clip_norm(tmp_path, corpus):
    """train.grad_clip rescales the whole gradient to that global norm when it is larger (a clip above
    the norm leaves it alone); the logged grad_norm is the norm before clipping."""
    from minimoe.data import TokenWindows

    _, data = _tiny_trainer(tmp_path, corpus, "data", "train.max_steps=1")
    x, y = TokenWindows(data, "train", 32, 4, seed=5).batch_at(0)
    free, _, row = _one_step_grads_and_biases(tmp_path, corpus, "free", x, y, 1)
    norm = math.sqrt(sum(float(g.double().pow(2).sum()) for g in free.values()))
    assert row["grad_norm"] == pytest.approx(norm, rel=1e-5)
    for name, clip, scale in (("tight", norm / 4, 0.25), ("loose", norm * 4, 1.0)):
        got, _, row = _one_step_grads_and_biases(tmp_path, corpus, name, x, y, 1, f"train.grad_clip={clip}")
        assert row["grad_norm"] == pytest.approx(norm, rel=1e-5), name
        assert got.keys() == free.keys()
        for n in free:
            torch.testing.assert_close(got[n], free[n] * scale, rtol=1e-4, atol=1e-9, msg=f"{name} {n}")


def test_a_finite_loss_with_a_non_finite_gradient_skips_the_step(tmp_path, corpus):
    """The first backward gives the final norm an infinite gradient while the loss stays finite: that
    step is skipped (nothing reaches the weights, not even through clipping), the next batch takes the
    one step, and every weight stays finite."""
    tr, _ = _tiny_trainer(tmp_path, corpus, "run", "train.max_steps=1", "train.eval_every=100")
    calls = {"n": 0}

    def poison_first(grad):
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == 1 else grad

    tr.model.norm.weight.register_hook(poison_first)
    res = tr.fit()
    assert res.step == 1 and calls["n"] == 2  # one skipped backward, then the step
    for n, p in tr.model.named_parameters():
        assert torch.isfinite(p).all(), n


def test_the_checkpoint_of_a_pause_is_never_marked_best(tmp_path, corpus, monkeypatch):
    """A pause's evaluation does not count, so its checkpoint does not become the best one even when its
    validation loss is the lowest: the best stays the step an uninterrupted run picks."""
    from minimoe.train.trainer import Trainer

    losses = {6: 1.0, 8: 0.5, 12: 1.2, 18: 1.3}
    monkeypatch.setattr(Trainer, "evaluate", lambda self: {"val_loss": losses[self.step], "val_bpb": None})
    common = ("train.max_steps=18", "train.eval_every=6")
    _train(tmp_path / "a", corpus, *common)
    resumed = _paused_then_resumed(tmp_path, corpus, common, pause_at=8)
    assert resumed.best_val_loss == 1.0
    for run in "ab":
        assert (tmp_path / run / "checkpoints" / "best").read_text().strip() == "step_00000006", run


def test_a_log_window_comes_back_whole_from_its_state():
    """A resume between two logged rows restores the window's sums exactly: loss, parts, steps, tokens
    (the row's tokens/s counts the steps before the pause too), loads, per-step MaxVio and its seconds."""
    from minimoe.train import metrics

    w = metrics.LogWindow(torch.device("cpu"), ("ce", "aux"))
    w.reset(time.perf_counter() - 5.0)
    for step in range(3):
        w.loss += 1.5 + step
        w.parts["ce"] += 1.0
        w.parts["aux"] += 0.25
        w.steps += 1
        w.tokens += 128
        w.add_loads({1: torch.tensor([3.0, 1.0, 0.0, 4.0]) + step, 2: torch.tensor([2.0, 2.0, 2.0, 2.0])})
    back = metrics.LogWindow(torch.device("cpu"), ("ce", "aux"))
    back.load_state_dict(w.state_dict())
    assert (back.steps, back.tokens, back.loss.item()) == (3, 384, pytest.approx(w.loss.item()))
    assert {k: v.item() for k, v in back.parts.items()} == {k: v.item() for k, v in w.parts.items()}
    assert back.loads.keys() == w.loads.keys() and all(
        torch.equal(back.loads[i], w.loads[i]) for i in w.loads
    )
    want, got = w.max_vio(), back.max_vio()
    assert got.keys() == want.keys() == {1, 2} and all(torch.allclose(got[i], want[i]) for i in want)
    assert back.start == pytest.approx(w.start, abs=0.5)


def test_resume_restores_the_run_counters(tmp_path, corpus):
    """Resume brings back the step, tokens and early-stopping state (best val loss, evaluations since)
    exactly as saved."""
    common = ("train.max_steps=6", "train.eval_every=1")
    first, _ = _tiny_trainer(tmp_path, corpus, "run", *common)
    first.fit(stop_after=2)
    first.best_val, first.evals_since_best = 0.125, 3  # distinct from anything a fresh trainer holds
    first.save(0.5)
    second, _ = _tiny_trainer(tmp_path, corpus, "run", *common, resume=True)
    assert (second.step, second.tokens) == (2, 2 * 4 * 32) == (first.step, first.tokens)
    assert (second.best_val, second.evals_since_best) == (0.125, 3)


def test_resume_restores_the_elapsed_clock(tmp_path, corpus):
    """Resume brings back the time a run has used, so train.max_minutes and a clock-driven schedule
    continue from it instead of starting over."""
    common = ("train.max_steps=6", "train.eval_every=100")
    first, _ = _tiny_trainer(tmp_path, corpus, "run", *common)
    first.fit(stop_after=1)
    first.elapsed = 12.5
    first.save()
    second, _ = _tiny_trainer(tmp_path, corpus, "run", *common, resume=True)
    assert second.step == 1 and second.elapsed == 12.5


def test_a_run_stopped_by_its_clock_refuses_a_plain_resume(tmp_path, corpus):
    """The trainer stops a little before train.max_minutes (the next step and the final evaluation would
    not fit), so the elapsed time alone is under the budget: the checkpoint's clock stop refuses a resume
    with the same budget, and a larger one trains on."""
    common = ("train.max_steps=6", "train.eval_every=100")
    first, _ = _tiny_trainer(tmp_path, corpus, "run", *common, "train.max_minutes=1")
    first.fit(stop_after=1)
    first.elapsed, first._out_of_time = 55.0, True
    first.save()
    with pytest.raises(MinimoeError, match=r"already used 0.9 of its train.max_minutes=1;"):
        _tiny_trainer(tmp_path, corpus, "run", *common, "train.max_minutes=1", resume=True)
    second, _ = _tiny_trainer(tmp_path, corpus, "run", *common, "train.max_minutes=2", resume=True)
    assert second.step == 1 and second.elapsed == 55.0
    first._out_of_time = False  # saved by a pause: the same budget resumes
    first.save()
    third, _ = _tiny_trainer(tmp_path, corpus, "run", *common, "train.max_minutes=1", resume=True)
    assert third.step == 1


def test_trainer_schedules_each_group_from_its_own_peak(tmp_path, corpus):
    """The trainer sets every group's lr to its own base_lr x the schedule: with train.muon_lr the Muon
    group runs at muon_lr, the AdamW groups at train.lr."""
    tr, _ = _tiny_trainer(tmp_path, corpus, "run", "train.max_steps=1", "train.eval_every=100",
                          "train.warmup_steps=0", "train.optimizer=muon", "train.lr=1e-3",
                          "train.muon_lr=0.02")  # fmt: skip
    tr.fit()
    lrs = {g["use_muon"]: g["lr"] for g in tr.optimizer.param_groups}
    assert lrs[True] == pytest.approx(0.02) and lrs[False] == pytest.approx(1e-3)


def test_find_checkpoint_falls_back_to_the_newest_complete_step(tmp_path):
    """Without a `latest` pointer that names a complete checkpoint, a run resolves to its newest step
    directory that has meta.json (an incomplete newer one is skipped)."""
    root = tmp_path / "run" / ckpt_lib.CKPT
    for step in (1, 2, 3, 4):
        d = root / ckpt_lib.step_dir_name(step)
        d.mkdir(parents=True)
        if step != 4:
            (d / "meta.json").write_text("{}")
    assert ckpt_lib.find_checkpoint(tmp_path / "run").name == "step_00000003"
    (root / "latest").write_text("step_00000004\n")  # names a step without meta.json
    assert ckpt_lib.find_checkpoint(tmp_path / "run").name == "step_00000003"


def test_peak_memory_is_in_mib():
    """The CPU's peak resident set (ru_maxrss, KiB on Linux) in MiB: a process that holds torch is well
    over 50 MiB and under a terabyte."""
    from minimoe.train.metrics import peak_mem_mb

    assert 50 < peak_mem_mb(torch.device("cpu")) < 2**20


def test_expert_health_fractions_dead_and_dominant():
    from minimoe.train.health import expert_health

    h = expert_health({0: torch.tensor([6, 2, 0, 0]), 3: torch.tensor([1, 1, 1, 1])}, dominant_factor=2.0)
    assert h["load_frac"] == {"0": [0.75, 0.25, 0.0, 0.0], "3": [0.25, 0.25, 0.25, 0.25]}
    assert h["dead_experts"] == [[0, 2], [0, 3]]
    assert h["dominant_experts"] == [[0, 0]]  # 0.75 > 2 x the fair 0.25
    assert h["max_vio"]["3"] == 0.0 and h["max_vio"]["0"] > 0
    assert expert_health({}) == {}


def test_logged_max_vio_is_the_mean_of_each_steps_max_vio(tmp_path, corpus, monkeypatch):
    """MaxVio_batch is a statistic of one training batch: a row over several steps logs its mean over
    the steps, not the MaxVio of their summed loads (which imbalances in turn cancel out)."""
    from minimoe.model.moe import max_vio
    from minimoe.train import trainer as trainer_mod

    per_step: list[dict[int, float]] = []
    orig = trainer_mod.balance_step

    def balance_step(model, loads):
        per_step.append({i: max_vio(v).item() for i, v in loads.items()})
        return orig(model, loads)

    monkeypatch.setattr(trainer_mod, "balance_step", balance_step)
    _train(tmp_path / "run", corpus, "train.max_steps=8", "train.log_every=4", "train.eval_every=100",
           "model.bias_update_speed=0.01")  # fmt: skip
    rows = [json.loads(x) for x in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if "loss" in r]
    assert [r["step"] for r in rows] == [4, 8] and len(per_step) == 8
    for r in rows:
        steps = per_step[r["step"] - 4 : r["step"]]
        want = {str(i): sum(s[i] for s in steps) / 4 for i in steps[0]}
        assert r["max_vio"] == pytest.approx(want, abs=1e-4)
        assert r["max_vio_mean"] == pytest.approx(sum(want.values()) / len(want), abs=1e-4)


def test_pruning_keeps_the_best_checkpoint(tmp_path, corpus):
    _train(tmp_path / "run", corpus, "train.max_steps=1", "train.eval_every=1")
    model, tok, _, _ = ckpt_lib.load_run(tmp_path / "run")
    run = tmp_path / "run"
    for step in range(2, 7):  # step 2 is the best; keep_last=2 prunes the others before 5
        ckpt_lib.save_checkpoint(run, step, model, {"step": step}, {"step": step}, "x: 1\n", tok,
                                 keep_last=2, is_best=step == 2)  # fmt: skip
    root = run / "checkpoints"
    assert sorted(p.name for p in root.glob("step_*")) == ["step_00000002", "step_00000005", "step_00000006"]
    assert ckpt_lib.find_checkpoint(run, "best").name == "step_00000002"
    assert ckpt_lib.find_checkpoint(run, "latest").name == "step_00000006"


def test_muon_leaves_an_untied_lm_head_to_adamw():
    from minimoe.train.optim import muon_param_names

    model, opt = _muon_model_and_opt("model.tie_word_embeddings=false")
    names = muon_param_names(model)
    assert "lm_head.weight" not in names and "embed_tokens.weight" not in names
    head = model.lm_head.weight
    (group,) = [g for g in opt.param_groups if any(p is head for p in g["params"])]
    assert not group["use_muon"]


def test_evaluate_weights_batches_by_their_targets(tmp_path, corpus):
    """The validation loss is the mean over target tokens, not over batches: batches of 1 and 3 rows
    score as the same 4 rows in one batch."""
    from minimoe.data import TokenWindows

    tr, data = _tiny_trainer(tmp_path, corpus, "run", "train.max_steps=1")
    x, y = TokenWindows(data, "train", 32, 4, seed=2).batch_at(0)
    tr.val_windows = [(x[:1], y[:1]), (x[1:], y[1:])]
    split = tr.evaluate()
    assert tr.model.training  # a mid-run evaluation hands the model back in training mode
    tr.val_windows = [(x, y)]
    whole = tr.evaluate()
    assert split["val_loss"] == pytest.approx(whole["val_loss"], rel=1e-5)
    # the global MaxVio of the summed loads of every batch, not of the last batch's
    assert split["val_max_vio_global"] == pytest.approx(whole["val_max_vio_global"], rel=1e-5)
    tr.val_windows = [(x[1:], y[1:])]  # the last batch alone has another MaxVio
    assert tr.evaluate()["val_max_vio_global"] != pytest.approx(whole["val_max_vio_global"], rel=1e-3)
    # padded batches (fine-tuning's): weighted by the targets that carry a loss, not by positions
    y_pad = y.clone()
    y_pad[0, 4:] = -100  # row 0 keeps 4 targets, the other rows all 32
    tr.val_windows = [(x[:1], y_pad[:1]), (x[1:], y_pad[1:])]
    split = tr.evaluate()["val_loss"]
    tr.val_windows = [(x, y_pad)]
    assert split == pytest.approx(tr.evaluate()["val_loss"], rel=1e-5)


def test_a_checkpoint_from_before_the_mtp_input_moved_is_named_on_load(tmp_path, corpus, caplog):
    """Checkpoints record that their MTP module reads the hidden state after the final norm; one without
    the record (an older minimoe's) loads with a one-line warning, for generation and for a resume."""
    import logging

    from minimoe.train.checkpoint import find_checkpoint, load_run

    run = tmp_path / "run"
    _train(run, corpus, "train.max_steps=2", "train.eval_every=2", "model.mtp_depth=1")
    meta_file = find_checkpoint(run, "latest") / "meta.json"
    assert json.loads(meta_file.read_text())["mtp_input"] == "after_final_norm"
    with caplog.at_level(logging.WARNING, logger="minimoe.train"):
        load_run(run)
    assert "before the final norm" not in caplog.text
    meta = json.loads(meta_file.read_text())
    del meta["mtp_input"]
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level(logging.WARNING, logger="minimoe.train"):
        load_run(run)
        assert caplog.text.count("before the final norm") == 1
        _train(run, corpus, "train.max_steps=3", "train.eval_every=3", resume=True)
    assert caplog.text.count("before the final norm") == 2


def test_rng_state_round_trips_every_stream(tmp_path):
    """A resume restores the torch, NumPy and Python random streams, through a state file that loads
    with weights_only=True."""
    import random

    import numpy as np

    from minimoe.train.state import rng_state, set_rng_state

    torch.save({"rng": rng_state()}, tmp_path / "state.pt")
    want = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(torch.load(tmp_path / "state.pt", weights_only=True)["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(got[0], want[0]) and (got[1] == want[1]).all() and got[2] == want[2]


def test_gpu_rng_state_is_the_training_devices_own(monkeypatch):
    """Training on a GPU, the checkpoint holds that GPU's stream only, and it is restored into the GPU
    the resumed run trains on: a run saved where 8 GPUs were visible resumes where 1 is, and a
    checkpoint of the older format (one state per visible GPU) restores its own GPU's entry or none.
    (torch.cuda's two calls are stood in for: they record which device they were asked about.)"""
    from minimoe.train.state import rng_state, set_rng_state

    got, put = [], []
    monkeypatch.setattr(torch.cuda, "get_rng_state", lambda device: got.append(device) or torch.tensor([7]))
    monkeypatch.setattr(torch.cuda, "set_rng_state", lambda s, device: put.append((int(s[0]), device)))
    cpu = rng_state(torch.device("cpu"))
    assert "cuda" not in cpu and not got
    state = rng_state(torch.device("cuda", 3))
    assert got == [torch.device("cuda", 3)] and int(state["cuda"][0]) == 7
    set_rng_state(state, torch.device("cuda", 0))  # resumed on another GPU: its stream continues there
    set_rng_state(cpu | {"cuda": [torch.tensor([i]) for i in range(8)]}, torch.device("cuda", 1))
    set_rng_state(cpu | {"cuda": [torch.tensor([5])]}, torch.device("cuda", 2))  # not visible then
    set_rng_state(state, torch.device("cpu"))  # resumed on the CPU: nothing to restore
    assert put == [(7, torch.device("cuda", 0)), (1, torch.device("cuda", 1))]


def test_loading_a_run_checks_that_its_fp32_weights_fit(tmp_path, corpus, monkeypatch):
    """load_run refuses, before building the model, a run whose fp32 weights (the MTP module's
    included) exceed the memory available, and loads one that fits exactly."""
    import minimoe.memory as memory
    from minimoe.params import count_params

    run = tmp_path / "run"
    _train(run, corpus, "train.max_steps=1", "train.eval_every=1", "model.mtp_depth=1")
    rep = count_params(ckpt_lib.read_config(ckpt_lib.find_checkpoint(run)).model)
    need = 4 * (rep.total + rep.mtp_total)
    assert rep.mtp_total > 0
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": need - 1)
    with pytest.raises(MinimoeError, match=r"\(fp32 weights\) needs at least .*MINIMOE_SKIP_MEMORY_CHECK=1"):
        ckpt_lib.load_run(run)
    monkeypatch.setattr(memory, "available_bytes", lambda device="cpu": need)
    ckpt_lib.load_run(run)


def test_resume_of_a_run_at_its_max_steps_is_refused(tmp_path, corpus):
    """A run that reached train.max_steps has nothing left to train: a resume with the same max_steps
    is refused in one sentence naming a value that trains further."""
    common = ("train.max_steps=2", "train.eval_every=100")
    _train(tmp_path / "run", corpus, *common)
    with pytest.raises(
        MinimoeError, match=r"already at step 2 and train.max_steps is 2; resume with train.max_steps=4"
    ):
        _train(tmp_path / "run", corpus, *common, resume=True)


def test_a_save_removes_what_a_killed_save_left(tmp_path):
    """A `.tmp-*` directory and the pointers' temporary files left by a killed save are removed by the
    next save, and never taken for a checkpoint."""
    root = tmp_path / "run" / ckpt_lib.CKPT
    (root / ".tmp-step_00000002-123").mkdir(parents=True)
    (root / ".tmp-step_00000002-123" / "meta.json").write_text("{}")
    (root / ".latest.tmp123").write_text("step_00000002\n")
    (root / ".best.tmp45").write_text("step_00000002\n")
    with pytest.raises(MinimoeError, match="holds no complete checkpoint"):
        ckpt_lib.find_checkpoint(tmp_path / "run")
    ckpt_lib.save_checkpoint(tmp_path / "run", 1, {"w": torch.zeros(2)}, {"step": 1}, {"step": 1}, "x: 1\n")
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000001"]


def test_find_checkpoint_without_a_best_pointer_falls_back_to_latest(tmp_path):
    """A run with no `best` (no evaluation yet) resolves "best" to what `latest` names, even where a
    newer complete step exists (a kill between its rename and moving `latest`)."""
    root = tmp_path / "run" / ckpt_lib.CKPT
    for step in (1, 2, 3):
        (root / ckpt_lib.step_dir_name(step)).mkdir(parents=True)
        (root / ckpt_lib.step_dir_name(step) / "meta.json").write_text("{}")
    (root / "latest").write_text("step_00000002\n")
    assert ckpt_lib.find_checkpoint(tmp_path / "run", "best").name == "step_00000002"
    (root / "best").write_text("step_00000001\n")
    assert ckpt_lib.find_checkpoint(tmp_path / "run", "best").name == "step_00000001"


def test_check_weights_names_a_missing_or_unexpected_tensor(tmp_path):
    """Weights with a tensor the model lacks, or without one it has, are another config's: one sentence
    naming the tensor, before any is loaded."""
    model = torch.nn.Linear(2, 3)
    sd = {k: v.clone() for k, v in model.state_dict().items()}
    ckpt_lib.check_weights(sd, model, tmp_path)
    with pytest.raises(MinimoeError, match=r"different model config \(unexpected extra\.weight\)"):
        ckpt_lib.check_weights({**sd, "extra.weight": torch.zeros(1)}, model, tmp_path)
    with pytest.raises(MinimoeError, match=r"different model config \(missing bias\)"):
        ckpt_lib.check_weights({"weight": sd["weight"]}, model, tmp_path)
    with pytest.raises(MinimoeError, match=r"bias: \(4,\) in the file, \(3,\) in the model"):
        ckpt_lib.check_weights({**sd, "bias": torch.zeros(4)}, model, tmp_path)


def test_expert_health_names_layers_and_holds_the_default_dominance_line():
    """Dead and dominant experts are reported by their layer index (not the layer's position in the
    dict), and with the default factor an expert is dominant only over 4x its fair share: exactly 4x
    (or 3x) is not. A layer that got no tokens reports every expert dead and zero fractions, not NaN."""
    from minimoe.train.health import expert_health

    h = expert_health({
        2: torch.tensor([2, 2, 2, 2, 2, 2, 2, 2]),
        5: torch.tensor([8, 6, 2, 0, 0, 0, 0, 0]),  # 4x and 3x the fair 1/8
        7: torch.tensor([9, 1, 1, 1, 1, 1, 1, 1]),  # 4.5x
        9: torch.tensor([0, 0, 0, 0, 0, 0, 0, 0]),
    })  # fmt: skip
    assert h["dominant_experts"] == [[7, 0]]
    assert h["dead_experts"] == [[5, e] for e in range(3, 8)] + [[9, e] for e in range(8)]
    assert h["load_frac"]["9"] == [0.0] * 8
    assert json.loads(json.dumps(h, allow_nan=False)) == h  # a metrics row: valid JSON


def test_resume_accepts_training_only_model_changes_and_names_any_other(tmp_path, corpus):
    """A resume may change how the model trains (balancing speed, loss weights) and extend its context;
    a setting that changes what the weights compute is refused with one sentence naming it."""
    common = ("train.max_steps=6", "train.eval_every=100")
    first, _ = _tiny_trainer(tmp_path, corpus, "run", *common)
    first.fit(stop_after=1)
    extended, _ = _tiny_trainer(tmp_path, corpus, "run", *common, "model.bias_update_speed=0.01",
                                "model.z_loss_coef=0.01", "model.max_position_embeddings=128",
                                resume=True)  # fmt: skip
    assert extended.step == 1
    with pytest.raises(MinimoeError, match=r"trained with model\.rope_theta=10000\.0, not 5000\.0"):
        _tiny_trainer(tmp_path, corpus, "run", *common, "model.rope_theta=5000", resume=True)


def test_the_write_probe_leaves_the_output_directory_as_it_was(tmp_path):
    from minimoe.train.state import check_run_dir_writable

    check_run_dir_writable(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_interrupt_flags_the_first_signal_raises_on_the_second_and_restores_handlers():
    """SIGTERM (a scheduler's stop) asks the loop to stop as Ctrl-C does; a second signal stops at once;
    leaving the context puts the previous handlers back."""
    from minimoe.train.interrupt import Interrupt

    seen: list[int] = []
    guard = {
        s: signal.signal(s, lambda signum, frame: seen.append(signum))
        for s in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        before = {s: signal.getsignal(s) for s in guard}
        for first in (signal.SIGTERM, signal.SIGINT):
            with Interrupt() as interrupt:
                assert not interrupt.requested
                os.kill(os.getpid(), first)
                assert interrupt.requested
                with pytest.raises(KeyboardInterrupt):
                    os.kill(os.getpid(), signal.SIGINT)
            assert {s: signal.getsignal(s) for s in before} == before
        assert seen == []  # no signal got past the trainer's handler
    finally:
        for s, old in guard.items():
            signal.signal(s, old)


def test_interrupt_outside_the_main_thread_installs_nothing():
    """A trainer run in a worker thread (signals can only be handled in the main one) still trains."""
    import threading

    from minimoe.train.interrupt import Interrupt

    errors: list[BaseException] = []

    def body():
        try:
            with Interrupt() as interrupt:
                assert not interrupt.requested
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=body)
    t.start()
    t.join()
    assert errors == []


def test_the_time_check_keeps_room_for_the_final_evaluation_and_checkpoint(tmp_path, corpus):
    """Another step is taken only if the step, then the final evaluation and checkpoint and the reserve
    still fit in the time left; with a periodic evaluation due now, that evaluation and checkpoint count
    twice (now, and again at the end)."""
    tr, _ = _tiny_trainer(tmp_path, corpus, "run", "train.max_steps=1")
    tr._eval_s, tr._save_s, tr.reserve_s = 2.0, 1.0, 0.5  # finish: 3.5 s
    assert tr._time_for_another_step(10.0, None, at_eval=False)  # nothing measured: any time left will do
    assert not tr._time_for_another_step(0.0, None, at_eval=False)
    assert tr._time_for_another_step(4.5, 1.0, at_eval=False)  # 1 + 3.5
    assert not tr._time_for_another_step(4.4, 1.0, at_eval=False)
    assert tr._time_for_another_step(8.0, 1.0, at_eval=True)  # 1 + 2 x 3.5
    assert not tr._time_for_another_step(7.9, 1.0, at_eval=True)
