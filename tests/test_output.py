"""Output that reads without colour and files others can read: `minimoe inspect` shows expert ids in
the text when the output is not a colour terminal, a distinct colour per expert for every expert
count, corpus tables within 80 columns; weight files get the umask's permissions; figures name the
MTP module; `params --memory` explains its rows."""

from __future__ import annotations

import io
import re
from pathlib import Path

import pytest
from rich.console import Console

from minimoe.cli.main import main
from minimoe.lab.inspect import expert_color, rich_text_view, route_text, terminal_palette
from tiny import TINY_TRAIN


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    from minimoe.train.run import train_from_config

    root = tmp_path_factory.mktemp("inspect")
    text = root / "t.txt"
    text.write_text("the cat sat on the mat and the dog ran to the red ball\n" * 60, encoding="utf-8")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MINIMOE_CACHE", str(root / "cache"))
        train_from_config(None, None, [*TINY_TRAIN, f"data.path={text}", "train.max_steps=2",
                                       "train.eval_every=2"], root / "run", progress=False, sample=False)  # fmt: skip
    return root / "run", text


@pytest.mark.parametrize("n", [1, 2, 8, 16, 20, 21, 64, 157, 158, 256, 300])
def test_every_expert_gets_its_own_colour(n):
    colours = [expert_color(e, n) for e in range(n)]
    assert len(set(colours)) == n
    pal = terminal_palette()
    assert len(set(pal)) == len(pal) and all(16 <= i <= 231 for i in pal)


def test_text_view_carries_expert_ids_without_colour(run):
    from minimoe.train.checkpoint import load_run

    model, tok, _, _ = load_run(run[0])
    tr = route_text(model, tok, "a cat sat")
    out = io.StringIO()
    Console(file=out, force_terminal=False, width=200).print(rich_text_view(tr, ids=True))
    text = out.getvalue()
    for i, layer in tr.layers.items():
        line = next(x for x in text.splitlines() if x.startswith(f"layer {i}:"))
        expect = "".join(f"{t}[{row[0]}]" for t, row in zip(tr.tokens, layer.topk_idx.tolist()))
        assert line == f"layer {i}: {expect}"


def test_cli_text_piped_shows_ids_and_corpus_tables_fit_80_columns(run, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["inspect", str(run[0]), "--text", "a cat"]) == 0
    out = capsys.readouterr().out
    assert "[" in out.splitlines()[0] and "]" in out.splitlines()[0]  # `a[2] cat[0]`, not colour alone
    assert main(["inspect", str(run[0]), "--corpus", str(run[1]), "--max-tokens", "500"]) == 0
    out = capsys.readouterr().out
    assert max(len(line) for line in out.splitlines()) <= 80
    rows = [line for line in out.splitlines() if re.match(r"^ \d+\s+\d\.\d{3}", line)]
    assert len(rows) == 4  # the one MoE layer: each of its 4 experts on one line


def test_weight_files_get_the_umask_permissions(run, tmp_path, capsys):
    from minimoe.files import current_umask

    want = 0o666 & ~current_umask()
    files = list(run[0].glob("checkpoints/step_*/model.safetensors"))
    assert main(["export", str(run[0]), "--out", str(tmp_path / "hf")]) == 0
    files += list((tmp_path / "hf").glob("*.safetensors"))
    assert main(["quantize", str(run[0]), "--bits", "8", "--out", str(tmp_path / "q")]) == 0
    files += list((tmp_path / "q").glob("*.safetensors"))
    assert len(files) >= 3
    for f in files:
        assert f.stat().st_mode & 0o777 == want, (f, oct(f.stat().st_mode))
    capsys.readouterr()


def test_figures_name_the_mtp_module():
    from minimoe.config import RunConfig
    from minimoe.lab.plot import RunData, layer_label

    cfg = RunConfig()
    cfg.model.num_hidden_layers, cfg.model.mtp_depth = 4, 1
    rd = RunData(label="r", path=Path("."), cfg=cfg)
    assert [layer_label(rd, k) for k in ("1", "3", "4")] == ["layer 1", "layer 3", "MTP"]
    cfg.model.mtp_depth = 2
    assert [layer_label(rd, k) for k in ("4", "5")] == ["MTP 1", "MTP 2"]


def test_params_memory_explains_its_rows(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["params", "tiny", "--memory"]) == 0
    out = capsys.readouterr().out
    # tiny's recipe trains with Muon: its table says so
    for part in ("optimizer state: AdamW's two fp32 moments", "Muon's one", "master copy", "bf16 and fp32",
                 "KV cache / seq", "train.optimizer=muon"):  # fmt: skip
        assert part in out, part


def test_weight_files_follow_a_umask_other_than_022(tmp_path):
    """The mode comes from the process umask, not a fixed 0644: under umask 027 the group may read a
    weight file and others may not."""
    import os

    from minimoe.files import as_umask_allows

    f = tmp_path / "model.safetensors"
    f.write_bytes(b"")
    f.chmod(0o600)  # as safetensors writes it
    old = os.umask(0o027)
    try:
        as_umask_allows(f)
    finally:
        os.umask(old)
    assert f.stat().st_mode & 0o777 == 0o640, oct(f.stat().st_mode)
