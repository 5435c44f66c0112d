"""`minimoe train --init RUN --out NEW`: a new run that starts from another run's latest weights, config
and tokenizer (pre-training an upcycled or imported model further), with a fresh optimizer, schedule and
data position."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from minimoe.cli.main import main
from minimoe.config_yaml import build_run_config
from minimoe.data import Tokenizer
from minimoe.model.transformer import Transformer
from minimoe.train.checkpoint import find_checkpoint, load_run, write_run
from tiny import TINY_TRAIN


def _weights_only_run(tmp_path: Path) -> Path:
    """A run as `minimoe upcycle` / `import` write it: step 0, weights without training state, and a
    tokenizer that is not the byte default (its rows must be the ones trained on)."""
    cfg = build_run_config(overrides=[*TINY_TRAIN, "model.vocab_size=384"])
    torch.manual_seed(3)
    model = Transformer(cfg.model)
    tok = Tokenizer.byte()
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # a mark to find again
    write_run(tmp_path / "upcycled", model, tok, {"upcycled": "test"}, cfg)
    return tmp_path / "upcycled"


def _train(*argv: str) -> int:
    return main(["train", "--no-progress", "--no-sample", *argv])


def test_init_trains_a_new_run_from_a_weights_only_run(tmp_path, corpus):
    """The new run starts at the source's weights (a learning rate near zero leaves them there), with its
    model config and tokenizer, counts its own steps from 0, records where it started, and resumes as a run
    of its own; the source is untouched."""
    src = _weights_only_run(tmp_path)
    before = load_run(src, "latest")[0].state_dict()
    new = tmp_path / "continued"
    common = [f"data.path={corpus}", "train.max_steps=2", "train.eval_every=2", "train.warmup_steps=0"]
    assert _train("--init", str(src), "--out", str(new), *common, "train.lr=1e-12") == 0
    model, tok, cfg, meta = load_run(new, "latest")
    assert meta["step"] == 2 and meta["init_from"] == str(find_checkpoint(src, "latest").resolve())
    assert meta["init_step"] == 0
    assert cfg.model == load_run(src, "latest")[2].model and cfg.model.vocab_size == 384
    assert tok.chat_template == "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    for k, v in model.state_dict().items():
        if not k.endswith("e_score_correction_bias"):  # the balance step moves these whatever the lr
            torch.testing.assert_close(v, before[k], rtol=0, atol=1e-6, msg=k)
    assert load_run(src, "latest")[3]["step"] == 0  # the source run gained nothing
    rows = [json.loads(line) for line in (new / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2]
    # a fresh start of the same shape is far from the source's weights: the test above can fail
    fresh = Transformer(cfg.model).state_dict()
    assert max((fresh[k] - before[k]).abs().max().item() for k in before if before[k].dim() > 1) > 0.1
    # the new run resumes as any run
    assert _train("--resume", str(new), "train.max_steps=3") == 0
    assert load_run(new, "latest")[3]["step"] == 3


def test_init_builds_the_model_its_overrides_ask_for(tmp_path):
    """model.* overrides that hold no weight (here a capacity and a bias speed) reach the model the new
    run trains, not only its config.yaml."""
    from minimoe.train.run import _init_source

    src = _weights_only_run(tmp_path)
    cfg, _, model, _ = _init_source(str(src), ["model.capacity_factor=1.5", "model.bias_update_speed=0.01"])
    assert model.cfg == cfg.model and model.cfg.capacity_factor == 1.5 and model.training
    moe = next(iter(model.moe_layers().values()))
    assert moe.capacity_factor == 1.5 and moe.gate.cfg.bias_update_speed == 0.01


def test_init_learns_on_from_a_trained_run(tmp_path, corpus):
    """Continued pre-training from a trained run: the first logged loss of the new run is the level
    the source ended at, far below a fresh model's first loss."""
    src, new, fresh = tmp_path / "src", tmp_path / "new", tmp_path / "fresh"
    common = [*TINY_TRAIN, f"data.path={corpus}", "train.eval_every=100", "train.lr=1e-2"]
    assert _train("--out", str(src), *common, "train.max_steps=40") == 0
    assert _train("--init", str(src), "--out", str(new), "train.max_steps=1", "train.warmup_steps=0") == 0
    assert _train("--out", str(fresh), *common, "train.max_steps=1") == 0

    def first_loss(run):
        return next(
            json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines() if "loss" in x
        )

    assert first_loss(new) < first_loss(fresh) - 1.0, (first_loss(new), first_loss(fresh))


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--resume", "RUN"], "--resume continues a run and --init starts a new one"),
        (["--preset", "tiny", "--out", "NEW"], "drop --preset/--config"),
        ([], "name its folder with --out"),
        (["--out", "NEW", "data.tokenizer=gpt2"], "drop data.tokenizer"),
        (["--out", "NEW", "model.vocab_size=512"], "drop model.vocab_size"),
        (["--out", "NEW", "model.hidden_size=64"], "does not fit the one model.hidden_size asks for"),
    ],
)
def test_init_bad_input_is_one_sentence(tmp_path, corpus, capsys, extra, message):
    src = _weights_only_run(tmp_path)
    argv = [a.replace("RUN", str(src)).replace("NEW", str(tmp_path / "new")) for a in extra]
    assert _train("--init", str(src), *argv, f"data.path={corpus}") == 2
    err = capsys.readouterr().err.strip()
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "new" / "checkpoints").exists()


def test_init_from_a_folder_that_is_not_a_run(tmp_path, capsys):
    assert _train("--init", str(tmp_path / "missing"), "--out", str(tmp_path / "new")) == 2
    assert "--init" in capsys.readouterr().err


def test_a_weights_only_run_names_the_tokenizer_it_holds(tmp_path):
    """`write_run` (import, upcycle) records in config.yaml the tokenizer the run holds: its own folder
    for a pretrained or trained one (it said `byte`, the default, whatever the run held)."""
    import yaml

    from minimoe.data import train_bpe

    model = Transformer(build_run_config(overrides=[*TINY_TRAIN, "model.vocab_size=320"]).model)
    bpe = train_bpe(["the cat sat on the mat and the dog ran"] * 20, 300)
    for tok, want in ((bpe, str((tmp_path / "bpe" / "tokenizer").resolve())), (Tokenizer.byte(), "byte")):
        run = tmp_path / ("bpe" if tok is bpe else "byte")
        write_run(run, model, tok, {"format": "test"})
        assert yaml.safe_load((run / "config.yaml").read_text())["data"]["tokenizer"] == want
        assert Tokenizer.load(want if want != "byte" else run / "tokenizer").vocab_size == tok.vocab_size
