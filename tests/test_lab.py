"""MoE lab: exact training FLOPs, figures (panels and labels), inspect numbers that add up, compare sweeps."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from minimoe.cli.main import main
from minimoe.config import ModelConfig
from minimoe.config_yaml import build_run_config
from minimoe.errors import MinimoeError
from minimoe.lab import compare, flops
from minimoe.lab import inspect as lab_inspect
from minimoe.lab import plot as lab_plot
from minimoe.lab import report as lab_report
from minimoe.lab import runs as lab_runs
from minimoe.lab.sweep import run_state
from minimoe.train.checkpoint import find_checkpoint
from minimoe.train.run import train_from_config
from tiny import TINY_TRAIN

pytest.importorskip("matplotlib")

TINY = [
    *TINY_TRAIN,
    "model.n_shared_experts=1", "model.first_k_dense_replace=0", "model.mtp_depth=0", "train.log_every=2",
]  # fmt: skip


def _corpus(path: Path) -> Path:
    words = "the cat sat on a mat and the dog ran to the red ball while a bird sang".split()
    g = torch.Generator().manual_seed(0)
    lines = [" ".join(words[i] for i in torch.randint(0, len(words), (12,), generator=g)) for _ in range(300)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One tiny MoE run (12 steps, evaluations at 6 and 12) shared by the plot and inspect tests."""
    root = tmp_path_factory.mktemp("lab")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINIMOE_CACHE", str(root / "cache"))
    data = _corpus(root / "corpus.txt")
    run = root / "run"
    train_from_config(
        overrides=TINY + [f"data.path={data}", "train.max_steps=12", "train.eval_every=6"],
        run_dir=run,
        progress=False,
        sample=False,
    )
    yield run, data
    mp.undo()


# ---------------------------------------------------------------- FLOPs


def _hand_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=320, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64, attn_type="mla",
        q_lora_rank=None, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
        intermediate_size=64, first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=16, n_shared_experts=1, aux_free_bias=True, mtp_depth=0,
        tie_word_embeddings=False,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def test_flops_match_a_hand_count():
    cfg = _hand_cfg()
    D, H, S = 32, 2, 32
    attn = D * H * 16 + D * (16 + 8) + 16 * H * (8 + 8) + H * 8 * D  # q, kv_a, kv_b, o = 2816
    dense = 3 * D * 64  # layer 0
    moe = 4 * D + 2 * 3 * D * 16 + 3 * D * 16  # router, 2 of 4 routed experts, 1 shared
    head = 320 * D
    n_mm = 2 * attn + dense + moe + head
    assert n_mm == 26752
    rep = flops.flops_per_token(cfg, S)
    assert rep.matmul_params == n_mm
    pair = 2 * H * (16 + 8)  # score + value FLOPs of one query-key pair in one layer
    attn_fwd = 2 * pair * (S + 1) / 2  # 2 layers, causal: on average (S + 1) / 2 keys per query
    assert rep.forward_attention == attn_fwd
    assert rep.train_per_token == 3 * (2 * n_mm + attn_fwd) == 170016

    # GQA: 2 query heads of 16, 1 KV head
    g = _hand_cfg(attn_type="gqa", num_key_value_heads=1, head_dim=16)
    g_attn = D * 32 + 2 * D * 16 + 32 * D
    rep_g = flops.flops_per_token(g, S)
    assert rep_g.matmul_params == 2 * g_attn + dense + moe + head
    assert rep_g.forward_attention == 2 * (2 * H * (16 + 16)) * (S + 1) / 2

    # one MTP depth: eh_proj + a MoE block + the shared head, on S - 1 of S positions
    m = _hand_cfg(mtp_depth=1)
    rep_m = flops.flops_per_token(m, S)
    mtp_mm = 2 * D * D + attn + moe + head
    assert rep_m.mtp_matmul_params == mtp_mm
    expect = (2 * mtp_mm * (S - 1) + pair * (S - 1) * S / 2) / S
    assert rep_m.forward_mtp == pytest.approx(expect, rel=1e-12)


def test_matmul_params_equal_the_model_matrices():
    """Independent check: count 2-D weights of a real model, routed experts scaled by top-k / E."""
    from minimoe.model.transformer import Transformer

    for kw in (
        {},
        {"tie_word_embeddings": True, "q_lora_rank": 12},
        {"attn_type": "gqa", "aux_free_bias": False},
        {"attn_type": "gqa", "num_key_value_heads": 2, "qk_norm": "head"},
        {"attn_type": "gqa", "num_key_value_heads": 2, "qk_norm": "full"},
        {"attn_type": "gqa", "num_key_value_heads": 1, "qk_norm": "full"},  # H + KV-head norms, not 2 H
    ):
        cfg = _hand_cfg(**kw)
        model = Transformer(cfg)
        n = 0
        seen = set()
        for name, p in model.named_parameters():
            if id(p) in seen or p.dim() < 2 or name.startswith(("embed_tokens", "mtp.")):
                continue
            seen.add(id(p))
            scale = cfg.num_experts_per_tok / cfg.n_routed_experts if ".experts." in name else 1
            n += p.numel() * scale
        if cfg.tie_word_embeddings:
            n += model.lm_head.weight.numel()  # the tied head is a matmul even though it is the embedding
        assert flops.matmul_params(cfg) == n, kw


def test_steps_for_budget():
    cfg = build_run_config(overrides=TINY + ["model.vocab_size=320"])
    per_step = 4 * 32
    assert flops.steps_for_budget(cfg, tokens=per_step * 10 + 5) == 10
    assert flops.steps_for_budget(cfg, tokens=per_step * 11 - 1) == 10  # rounded down, not to nearest
    fpt = flops.flops_per_token(cfg.model, 32).train_per_token
    assert flops.steps_for_budget(cfg, flops=fpt * per_step * 7.5) == 7
    assert flops.training_flops(cfg, 7) == pytest.approx(fpt * per_step * 7)
    with pytest.raises(MinimoeError):
        flops.steps_for_budget(cfg)
    with pytest.raises(MinimoeError):
        flops.steps_for_budget(cfg, flops=-1.0)
    with pytest.raises(MinimoeError, match="less than one step"):
        flops.steps_for_budget(cfg, flops=fpt * per_step * 0.5)


def test_mtp_depths_see_fewer_positions_and_budgets_count_accumulation():
    """MTP depth k sees S - k positions of each sequence; a step spends batch x seq_len x grad_accum
    tokens, in token and FLOPs budgets alike."""
    D, H, S = 32, 2, 32
    attn = D * H * 16 + D * (16 + 8) + 16 * H * (8 + 8) + H * 8 * D
    moe = 4 * D + 2 * 3 * D * 16 + 3 * D * 16
    mtp_mm = 2 * D * D + attn + moe + 320 * D
    pair = 2 * H * (16 + 8)
    rep = flops.flops_per_token(_hand_cfg(mtp_depth=2), S)
    assert rep.mtp_matmul_params == 2 * mtp_mm
    expect = sum((2 * mtp_mm * (S - k) + pair * (S - k) * (S - k + 1) / 2) / S for k in (1, 2))
    assert rep.forward_mtp == pytest.approx(expect, rel=1e-12)

    cfg = build_run_config(overrides=TINY + ["model.vocab_size=320", "train.grad_accum=3"])
    per_step = 4 * 32 * 3
    assert flops.tokens_per_step(cfg) == per_step
    assert flops.steps_for_budget(cfg, tokens=per_step * 10 + 5) == 10
    fpt = flops.flops_per_token(cfg.model, 32).train_per_token
    assert flops.steps_for_budget(cfg, flops=fpt * per_step * 7.5) == 7
    assert flops.training_flops(cfg, 7) == pytest.approx(fpt * per_step * 7)


# ---------------------------------------------------------------- plot


def test_read_metrics_keeps_the_last_row_of_a_step(tmp_path):
    rows = [
        {"step": 1, "tokens": 10, "loss": 5.0},
        {"step": 2, "tokens": 20, "loss": 4.0},
        {"step": 2, "tokens": 20, "val_loss": 4.5},
        {"step": 2, "tokens": 20, "loss": 3.9},  # resumed run logs step 2 again
        {"step": 3, "tokens": 30, "loss": 3.5},
    ]
    p = tmp_path / "metrics.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows) + '\n{"step": 4, "lo')  # torn last line
    train, evals = lab_plot.read_metrics(p)
    assert [r["step"] for r in train] == [1, 2, 3] and train[1]["loss"] == 3.9
    assert [r["val_loss"] for r in evals] == [4.5]
    p.write_text('{"step": 1, "loss": 1}\nnot json\n{"step": 2, "loss": 1}\n')
    with pytest.raises(MinimoeError, match="line 2"):
        lab_plot.read_metrics(p)


def test_figures_have_the_expected_panels(trained):
    run, _ = trained
    data = lab_plot.load_run_data(run, "a")
    twin = lab_plot.load_run_data(run, "b")  # overlay two runs
    fig = lab_plot.loss_figure([data, twin], "tokens")
    axes = fig.get_axes()
    assert len(axes) == 2
    assert axes[0].get_xlabel() == "tokens seen" and "nats" in axes[0].get_ylabel()
    assert "validation" in axes[1].get_title()
    assert [t.get_text() for t in axes[1].get_legend().get_texts()] == ["a", "b"]
    assert len(axes[1].lines) == 2 and list(axes[1].lines[0].get_xdata()) == [6 * 128, 12 * 128]
    fig_f = lab_plot.loss_figure([data], "flops")
    x_flops = fig_f.get_axes()[1].lines[0].get_xdata()
    assert x_flops[-1] == pytest.approx(12 * 128 * data.train_flops_per_token)
    assert "FLOPs" in fig_f.get_axes()[0].get_xlabel()
    assert fig.get_axes()[0].get_xlabel() != fig_f.get_axes()[0].get_xlabel()
    lr = lab_plot.lr_figure([data])
    assert len(lr.get_axes()) == 1 and lr.get_axes()[0].get_ylabel() == "learning rate"
    # a sweep's seeds of one variant share a colour and one legend entry (a legend of every run of a
    # 20-seed sweep squeezed the axes away)
    seeds = [lab_plot.load_run_data(run, f"{v} (seed {s})") for v in ("x", "y") for s in range(12)]
    for r in seeds:
        r.group = r.label.split()[0]
    fig_s = lab_plot.loss_figure(seeds, "tokens")
    for ax in fig_s.get_axes():
        assert [t.get_text() for t in ax.get_legend().get_texts()] == ["x (12 runs)", "y (12 runs)"]
        assert len(ax.lines) == 24 and len({line.get_color() for line in ax.lines}) == 2
    mv = lab_plot.maxvio_figure([data, twin])
    assert len([a for a in mv.get_axes() if a.get_visible()]) == 2
    labels = [t.get_text() for t in mv.get_axes()[0].get_legend().get_texts()]
    assert labels == ["layer 0", "layer 1", "mean over layers"]
    # the router z per run, with the steps of z-spike alerts marked (one planted in a copy of the rows)
    spiked = lab_plot.load_run_data(run, "spiked")
    spiked.train[3] = {**spiked.train[3], "alerts": [{"kind": "z_spike", "z": 1.0, "baseline": 0.1}]}
    (ax,) = lab_plot.router_z_figure([data, spiked]).get_axes()
    line, spike_line, marks = ax.lines[0], ax.lines[1], ax.lines[2]
    assert list(line.get_ydata()) == [r["router_z"] for r in data.train] and min(line.get_ydata()) > 0
    assert list(marks.get_xdata()) == [spiked.train[3]["step"]] and len(ax.lines) == 3
    assert list(spike_line.get_xdata()) == [r["step"] for r in data.train]
    hm = lab_plot.load_heatmap_figure(data, [2, 12])
    heat_axes = [a for a in hm.get_axes() if a.get_images()]
    assert len(heat_axes) == 2 and len(hm.get_axes()) == 3  # two steps + colour bar
    img = heat_axes[1].get_images()[0].get_array()
    assert img.shape == (2, 4)  # layers x experts
    assert img.sum(axis=1).tolist() == pytest.approx([1.0, 1.0], abs=1e-3)  # shares per layer
    assert heat_axes[0].get_title().startswith("step 2")


def test_plot_cli_writes_pngs(trained, tmp_path, capsys, caplog):
    run, _ = trained
    assert main(["plot", str(run), "--out", str(tmp_path / "p"), "--steps", "4,11"]) == 0
    logged = [r["step"] for r in lab_plot.load_run_data(run, "run").train if "load_frac" in r]
    assert 4 in logged and 11 not in logged  # the step shown in place of 11 is said
    assert (
        "step 11 has no expert loads logged; showing step 10" in caplog.text and "step 4 " not in caplog.text
    )
    names = sorted(p.name for p in (tmp_path / "p").glob("*.png"))
    assert names == [
        "expert_load_run.png", "loss_vs_flops.png", "loss_vs_tokens.png", "lr.png", "maxvio.png", "router_z.png"
    ]  # fmt: skip
    assert all((tmp_path / "p" / n).read_bytes()[:4] == b"\x89PNG" for n in names)
    assert main(["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "p")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["plot", str(run), "--steps", "x"]) == 2


def test_plot_of_a_run_that_never_trained_says_so(trained, tmp_path, capsys):
    """A run directory without metrics.jsonl (`minimoe import` and `upcycle` make such runs) is a run
    directory: the error says it has logged no training, not that it may not be a run."""
    run, _ = trained
    imported = tmp_path / "imported"
    imported.mkdir()
    shutil.copy(run / "config.yaml", imported / "config.yaml")
    assert main(["plot", str(imported), "--out", str(tmp_path / "p")]) == 2
    err = capsys.readouterr().err
    assert "no metrics.jsonl" in err and "a run directory?" not in err


def test_router_z_figure_leaves_out_dense_runs(trained, tmp_path, monkeypatch):
    """A dense run logs router_z 0 (it has no router): plot draws the router z of the MoE runs only."""
    import shutil

    run, _ = trained
    dense = tmp_path / "dense"
    shutil.copytree(run, dense)
    rows = [json.loads(x) for x in (dense / "metrics.jsonl").read_text().splitlines()]
    moe_keys = ("max_vio", "max_vio_mean", "load_frac")
    rows = [{k: (0.0 if k == "router_z" else v) for k, v in r.items() if k not in moe_keys} for r in rows]
    (dense / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    drawn = []
    figure = lab_plot.router_z_figure
    monkeypatch.setattr(
        lab_plot, "router_z_figure", lambda runs: drawn.append([r.label for r in runs]) or figure(runs)
    )
    lab_plot.plot_runs([run, dense], tmp_path / "p")
    assert drawn == [["run"]] and (tmp_path / "p" / "router_z.png").is_file()


# ---------------------------------------------------------------- inspect


def test_inspect_numbers_add_up(trained):
    from minimoe.train.checkpoint import load_run

    run, data = trained
    model, tok, cfg, _ = load_run(run)
    ids = lab_inspect.corpus_ids(str(data), tok, 700)
    assert len(ids) == 700
    stats = lab_inspect.corpus_stats(model, tok, ids, seq_len=32, batch_size=4)
    assert stats["tokens"] == 700 and set(stats["layers"]) == {"0", "1"}
    K, E = 2, 4
    for layer in stats["layers"].values():
        assert sum(layer["routed_share"]) == pytest.approx(1.0, abs=1e-9)
        assert sum(layer["slot_share"]["routed"]) + sum(layer["slot_share"]["shared"]) == pytest.approx(1.0)
        assert layer["slot_share"]["shared"] == [pytest.approx(1 / 3)]  # K = 2 routed + 1 shared
        assert sum(layer["token_frac"]) == pytest.approx(K)
        co = torch.tensor(layer["coactivation"])
        assert torch.allclose(co, co.T) and co.diagonal().abs().sum() == 0
        # each token that visits i also visits K - 1 others
        assert co.sum(1).tolist() == pytest.approx([f * (K - 1) for f in layer["token_frac"]])
        for e in range(E):
            n_e = round(layer["token_frac"][e] * 700)
            assert sum(t["count"] for t in layer["top_tokens"][e]) <= n_e
        assert 0 <= layer["entropy"]["load_normalised"] <= 1 + 1e-9
        assert layer["dead_experts"] == [e for e in range(E) if layer["routed_share"][e] == 0]

    # the hooks see exactly what the model's own routing statistics count
    x = torch.tensor([ids[:32], ids[32:64]])
    model.train()
    routing = lab_inspect.route_ids(model, x)
    assert model.training  # routed in eval mode, then put back as it was
    model.eval()
    with torch.no_grad():
        out = model(x)
    for i, st in out.moe_stats.items():
        assert torch.equal(torch.bincount(routing[i].topk_idx.reshape(-1), minlength=E).float(), st.load)
    assert all(h == {} for h in (g._forward_hooks for g in lab_inspect.moe_gates(model).values()))


def test_inspect_text_and_cli(trained, tmp_path, capsys):
    from minimoe.train.checkpoint import load_run

    run, data = trained
    model, tok, _, _ = load_run(run)
    tr = lab_inspect.route_text(model, tok, "the cat sat")
    assert tr.tokens == list("the cat sat") and set(tr.layers) == {0, 1}
    assert tr.layers[0].topk_idx.shape == (11, 2)
    page = lab_inspect.text_html(tr)
    assert page.count('class="tok"') == 2 * 11 + 4  # tokens per layer + legend

    html_path = tmp_path / "r.html"
    png = tmp_path / "co.png"
    argv = ["inspect", str(run), "--text", "the dog", "--html", str(html_path), "--corpus", str(data),
            "--max-tokens", "300", "--coact-png", str(png), "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["text"]["tokens"] == list("the dog") and len(out["text"]["layers"]["1"]["experts"]) == 7
    assert out["corpus"]["tokens"] == 300 and png.read_bytes()[:4] == b"\x89PNG"
    assert "expert 0:" in html_path.read_text()
    assert main(["inspect", str(run), "--text", "the cat"]) == 0  # rich terminal view
    assert "layer 1" in capsys.readouterr().out
    # a name without the suffix: the figure gets it, and the terminal view names the file written
    argv = [
        "inspect",
        str(run),
        "--corpus",
        str(data),
        "--max-tokens",
        "100",
        "--coact-png",
        str(tmp_path / "co2"),
    ]
    assert main(argv) == 0
    assert f"co-activation: {tmp_path / 'co2.png'}" in capsys.readouterr().out.replace("\n", "")
    assert (tmp_path / "co2.png").read_bytes()[:4] == b"\x89PNG"
    assert main(["inspect", str(run)]) == 2
    assert "--text" in capsys.readouterr().err


def test_inspect_windows_documents_and_views(trained, tmp_path):
    """A text longer than the context is routed window by window; a corpus sample joins its documents
    with EOS and caps its windows at the context; the HTML page and the terminal view colour each token
    by its top-1 expert (and write expert ids where colours run out), escape the text, and the
    co-activation figure leaves the diagonal blank."""
    from minimoe.train.checkpoint import load_run

    run, _ = trained
    model, tok, _, _ = load_run(run)
    L = model.cfg.max_position_embeddings
    assert lab_inspect.token_strings(tok, [104, 0xC3]) == ["h", "\\xc3"]  # half a character shows its byte

    text = "the cat sat on the mat. " * (2 * L // 24 + 1)
    tr = lab_inspect.route_text(model, tok, text)
    ids = tok.encode(text)
    assert len(ids) > L and tr.layers[1].topk_idx.shape[0] == len(ids)
    second = lab_inspect.route_ids(model, torch.tensor([ids[L : 2 * L]]))[1]
    assert torch.equal(tr.layers[1].topk_idx[L : 2 * L], second.topk_idx)

    docs = tmp_path / "docs.jsonl"
    docs.write_text('{"text": "ab"}\n{"text": "cd"}\n')
    assert lab_inspect.corpus_ids(str(docs), tok, 100) == [
        *tok.encode("ab"),
        tok.eos_id,
        *tok.encode("cd"),
        tok.eos_id,
    ]
    wide = lab_inspect.corpus_stats(model, tok, ids, seq_len=10 * L)  # past the context: windows of L
    assert wide == lab_inspect.corpus_stats(model, tok, ids)

    tr = lab_inspect.route_text(model, tok, "a<b>&c")
    top1 = [row[0] for row in tr.layers[1].topk_idx.tolist()]
    page = lab_inspect.text_html(tr)
    assert "<b>" not in page and "&lt;" in page and "&amp;" in page
    layer_row = page[page.index("layer 1</div>") :]
    colours = re.findall(r'style="background:(#[0-9a-f]{6})"', layer_row)[: len(top1)]
    assert colours == [lab_inspect.expert_color(e, tr.n_experts) for e in top1]
    pal = lab_inspect.terminal_palette()
    line = lab_inspect.rich_text_view(tr).renderables[1]  # layer 1
    assert [str(span.style) for span in line.spans] == [f"black on color({pal[e]})" for e in top1]
    assert "[" not in line.plain
    crowded = lab_inspect.TextRouting(tr.tokens, tr.ids, tr.layers, len(pal) + 1, tr.n_shared)
    assert f"[{top1[0]}]" in lab_inspect.rich_text_view(crowded).renderables[1].plain

    stats = lab_inspect.corpus_stats(model, tok, ids[:200])
    fig = lab_inspect.coactivation_figure(stats)
    shown = fig.axes[0].images[0].get_array()
    assert bool(np.all(np.isnan(np.ma.getdata(shown).diagonal()) | np.ma.getmaskarray(shown).diagonal()))


def test_terminal_palette_is_readable_under_black_text():
    """Every colour of the terminal palette keeps black text readable (WCAG contrast against black at
    least 4.5:1, WCAG AA) and is not near-white (contrast against white above 1.1:1), all distinct."""

    def rel_luminance(hex_colour: str) -> float:
        c = [int(hex_colour[i : i + 2], 16) / 255 for i in (1, 3, 5)]
        lin = [x / 12.92 if x <= 0.04045 else ((x + 0.055) / 1.055) ** 2.4 for x in c]
        return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]

    pal = lab_inspect.terminal_palette()
    assert len(set(pal)) == len(pal) >= 16
    for idx in pal:
        lum = rel_luminance(lab_inspect._index_hex(idx))
        assert (lum + 0.05) / 0.05 >= 4.5 and 1.05 / (lum + 0.05) > 1.1, idx


def test_inspect_refuses_a_dense_model(tmp_path):
    from minimoe.model.transformer import Transformer

    model = Transformer(_hand_cfg(n_routed_experts=0))
    with pytest.raises(MinimoeError, match="dense"):
        lab_inspect.route_ids(model, torch.zeros(1, 4, dtype=torch.long))


# ---------------------------------------------------------------- compare


def test_compare_equal_flops_sweep(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    sweep_file = tmp_path / "sweep.yaml"
    base = [o for o in TINY if not o.startswith("train.log_every")] + [
        "train.log_every=1",
        "train.eval_every=100",
    ]
    # 4 routed experts top-2 + shared vs a dense MLP twice as wide: different FLOPs per token
    sweep_file.write_text(
        "name: tiny\n"
        "base:\n  overrides: " + json.dumps(base) + "\n"
        "data: corpus.txt\n"
        "budget: {flops: 2.0e8}\n"
        "seeds: [3]\n"
        # the MoE without the balancing bias: the trainer must log a model that has none
        "variants:\n  moe: [model.aux_free_bias=false]\n  dense: [model.n_routed_experts=0, model.intermediate_size=128]\n"
    )
    sweep = compare.load_sweep(sweep_file)
    runs = compare.plan(sweep)
    assert [r.variant for r in runs] == ["moe", "dense"]
    for r in runs:
        assert r.cfg.model.vocab_size == 320 and r.cfg.train.seed == 3
        per_step = flops.flops_per_token(r.cfg.model, 32).train_per_token * 4 * 32
        assert r.cfg.train.max_steps == int(2.0e8 // per_step)
        assert r.train_flops_per_token * 128 * r.cfg.train.max_steps <= 2.0e8
    assert runs[0].cfg.train.max_steps != runs[1].cfg.train.max_steps

    out = tmp_path / "out"
    assert main(["compare", str(sweep_file), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("start") == 2 and log.count("done") == 2
    report = (out / "report.md").read_text()
    lines = report.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| variant |"))
    table = lines[start : lines.index("", start)]
    assert len(table) == 4  # header, rule, two rows
    assert table[2].startswith("| moe | 1/1 |") and table[3].startswith("| dense | 1/1 |")
    cols = [c.strip() for c in table[0].strip("|").split("|")]
    moe_row, dense_row = (dict(zip(cols, (c.strip() for c in t.strip("|").split("|")))) for t in table[2:])
    assert dense_row["MaxVio global (val)"] == dense_row["MaxVio batch (train)"] == "–"  # dense: no MaxVio
    assert float(moe_row["MaxVio global (val)"]) >= 0 and moe_row["Δ val loss (paired)"] == "–"
    moe_loss, dense_loss = float(moe_row["val loss"]), float(dense_row["val loss"])
    assert float(dense_row["Δ val loss (paired)"]) == pytest.approx(dense_loss - moe_loss, abs=2e-4)
    assert (out / "loss_vs_flops.png").is_file() and "![loss_vs_flops.png]" in report
    for r in runs:
        rows = [
            json.loads(x) for x in (out / r.variant / "seed_3" / "metrics.jsonl").read_text().splitlines()
        ]
        assert rows[-1]["step"] == r.cfg.train.max_steps and "val_loss" in rows[-1]

    # a rerun skips finished runs and reproduces the report
    assert main(["compare", str(sweep_file), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("skip") == 2
    assert (out / "report.md").read_text() == report

    # a run stopped half-way (its latest checkpoint before max_steps) has evaluations, but not its
    # final one: the report leaves it out instead of averaging its last evaluation in
    dense = out / "dense" / "seed_3" / "checkpoints"
    meta = dense / (dense / "latest").read_text().strip() / "meta.json"
    m = json.loads(meta.read_text())
    meta.write_text(json.dumps({**m, "step": m["step"] - 1}))
    assert main(["compare", str(sweep_file), "--out", str(out), "--report-only"]) == 0
    partial = (out / "report.md").read_text()
    assert "| dense | 0/1 |" in partial and "| moe | 1/1 |" in partial
    meta.write_text(json.dumps(m))

    # the report names the code that trained the runs (checkpoints record it), and which runs each version
    # trained where they differ
    from minimoe.provenance import code_label, code_version

    assert f"Code: every run was trained by {code_label(code_version())}." in report
    other = {**m["code"], "commit": "0123456789abcdef", "modified": False}
    meta.write_text(json.dumps({**m, "code": other}))
    assert main(["compare", str(sweep_file), "--out", str(out), "--report-only"]) == 0
    mixed = (out / "report.md").read_text()
    assert (
        f"Code: the runs were trained by 2 versions; {code_label(code_version())}: moe/3; "
        "commit 0123456789: dense/3." in mixed
    )
    assert "Under a time budget" not in mixed  # a FLOPs budget: the code's speed does not enter
    meta.write_text(json.dumps(m))

    bad = tmp_path / "bad.yaml"
    bad.write_text("variants: {a: []}\nbudget: {hours: 3}\n")
    assert main(["compare", str(bad)]) == 2
    assert "budget" in capsys.readouterr().err
    bad.write_text("variants: {a: []}\nbudget: {tokens: 3, clock: cpu}\n")
    assert main(["compare", str(bad)]) == 2
    assert "clock" in capsys.readouterr().err
    bad.write_text("variants: {a: []}\nbudget: {steps: 3}\ncontrasts: [[a, b]]\n")
    assert main(["compare", str(bad)]) == 2
    assert "unknown variant 'b'" in capsys.readouterr().err


@pytest.mark.parametrize("clock", ["wall", "cpu"])
def test_compare_time_budget_and_paired_contrasts(tmp_path, monkeypatch, capsys, clock):
    """{minutes: M, clock: ...}: every run stops on its clock (wall time, or its own CPU time), is done on
    a rerun, and the report pairs the seeds of the two variants."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    sweep_file = tmp_path / "sweep.yaml"
    base = [o for o in TINY if not o.startswith("train.log_every")] + [
        "train.log_every=1", "train.eval_every=100000", "train.threads=1",
    ]  # fmt: skip
    sweep_file.write_text(
        "name: timed\nbase:\n  overrides: " + json.dumps(base) + "\ndata: corpus.txt\n"
        f"budget: {{minutes: 0.01, clock: {clock}}}\nseeds: [1, 2]\n"
        "variants:\n  moe: []\n  dense: [model.n_routed_experts=0]\ncontrasts: [[dense, moe]]\n"
        "equivalence: 1000\n"
    )
    sweep = compare.load_sweep(sweep_file)
    assert sweep.budget_kind == "minutes" and sweep.clock == clock
    runs = compare.plan(sweep)
    assert all(r.cfg.train.max_minutes == 0.01 and r.cfg.train.clock == clock for r in runs)
    out = tmp_path / "out"
    assert main(["compare", str(sweep_file), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("done") == 4
    for r in runs:
        d = out / r.variant / f"seed_{r.seed}"
        meta = json.loads((find_checkpoint(d) / "meta.json").read_text())
        assert meta["clock"] == clock and meta["out_of_time"] and meta["step"] < r.cfg.train.max_steps
        assert 0.2 <= meta["elapsed_s"] <= 0.6 + 1.0  # stops near the 0.6 s budget
        if clock == "cpu":  # the report's speed: tokens per CPU-second of the training process
            last = [json.loads(x) for x in (d / "metrics.jsonl").read_text().splitlines() if '"loss"' in x][
                -1
            ]
            speed = lab_report.summarize_run(d, r).tokens_per_s
            assert speed == pytest.approx(last["tokens"] / last["elapsed_s"])
    assert main(["compare", str(sweep_file), "--out", str(out)]) == 0
    assert capsys.readouterr().out.count("skip") == 4  # finished on the clock: not resumed
    d = out / runs[0].variant / f"seed_{runs[0].seed}"
    assert run_state(d, runs[0].cfg.train.max_steps, 0.01) == "done"
    assert run_state(d, runs[0].cfg.train.max_steps, 1.0) == "partial"  # a larger budget resumes it
    report = (out / "report.md").read_text()
    assert (out / "loss_vs_time.png").is_file() and "![loss_vs_time.png]" in report
    row = next(line for line in report.splitlines() if line.startswith("| dense − moe |"))
    rows = lab_report.report_rows(sweep, out, runs)
    diffs = [rows[1]["val_loss_by_seed"][s] - rows[0]["val_loss_by_seed"][s] for s in (1, 2)]
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[1] == "2" and float(cells[2].split(" ± ")[0]) == pytest.approx(sum(diffs) / 2, abs=1e-4)
    # a 1000-nat margin decides either way, whatever the spread of two seeds on a loaded machine (the
    # 95% interval of 2 seeds is +-12.7 standard errors wide)
    expected = lab_report.verdict(lab_report.paired_stats(diffs), 1000.0)
    assert cells[3] == expected != "no" and "inside ±1000 nats" in report


def test_compare_jobs_train_in_parallel_processes_with_the_same_results(tmp_path, monkeypatch, capsys):
    """--jobs 2 trains runs in two worker processes at once; every run ends exactly where the same run
    trained in this process ends (seeded, one thread), and a rerun skips them all."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    sweep_file = tmp_path / "sweep.yaml"
    base = [o for o in TINY if not o.startswith("train.log_every")] + [
        "train.eval_every=100",
        "train.threads=1",
    ]
    sweep_file.write_text(
        "name: par\nbase:\n  overrides: " + json.dumps(base) + "\ndata: corpus.txt\n"
        "budget: {steps: 3}\nseeds: [1, 2]\nvariants:\n  moe: []\n  dense: [model.n_routed_experts=0]\n"
    )
    sweep = compare.load_sweep(sweep_file)
    runs = compare.plan(sweep)
    assert main(["compare", str(sweep_file), "--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    log = capsys.readouterr().out
    assert log.count("start") == 4 and log.count("done") == 4
    lab_runs.run_sweep(sweep, tmp_path / "seq", figures=False)
    rows = {d: lab_report.report_rows(sweep, tmp_path / d, runs) for d in ("par", "seq")}
    for a, b in zip(rows["par"], rows["seq"]):
        assert a["val_loss_by_seed"] == b["val_loss_by_seed"] and len(a["val_loss_by_seed"]) == 2
    assert main(["compare", str(sweep_file), "--out", str(tmp_path / "par"), "--jobs", "2"]) == 0
    assert capsys.readouterr().out.count("skip") == 4
    assert main(["compare", str(sweep_file), "--jobs", "0"]) == 2
    assert "jobs" in capsys.readouterr().err


def test_paired_stats_match_student_t():
    stats = pytest.importorskip("scipy.stats")
    samples = [[0.1, -0.05], [0.03, 0.01, 0.02, 0.05, -0.01]] + [
        [0.01 * i**1.5 for i in range(n)] for n in (32, 40, 61)
    ]
    for diffs in samples:
        st = lab_report.paired_stats(diffs)
        n = len(diffs)
        mean = sum(diffs) / n
        se = float(stats.sem(diffs))
        lo, hi = stats.t.interval(0.95, n - 1, loc=mean, scale=se)
        assert st["n"] == n and st["mean"] == pytest.approx(mean) and st["se"] == pytest.approx(se)
        tol = 5e-4 * (hi - lo)  # the table's quantiles have three decimals
        assert st["lo"] == pytest.approx(lo, abs=tol) and st["hi"] == pytest.approx(hi, abs=tol)
    assert lab_report.paired_stats([0.1]) is None


def test_t_quantile_beyond_the_table():
    """Above 30 degrees of freedom the 95% quantile keeps Student's value (not the normal's 1.96)."""
    for df, want in ((31, 2.0395134), (40, 2.0210754), (60, 2.0002978), (120, 1.9799304), (1000, 1.9623391)):
        assert lab_report.t975(df) == pytest.approx(want, abs=2e-5), df
    assert lab_report.t975(30) == 2.042


def test_mean_std_uses_the_sample_standard_deviation():
    assert lab_report.mean_std([1.0, 2.0, 3.0]) == "2.0000 ± 1.0000"
    assert lab_report.mean_std([0.5, None]) == "0.5000" and lab_report.mean_std([None]) == "–"


def test_summary_maxvio_batch_is_the_mean_of_the_last_tenth_of_the_rows(tmp_path):
    """A finished run's summary: the final evaluation's numbers, and MaxVio batch over the last 10%
    of the logged training rows."""
    from minimoe.lab.sweep import PlannedRun

    cfg = build_run_config(overrides=TINY + ["model.vocab_size=320", "train.max_steps=20"])
    run = PlannedRun("v", 1, [], cfg, 1000.0)
    rows = [{"step": s, "loss": 1.0, "tokens": 128 * s, "max_vio_mean": float(s)} for s in range(1, 21)]
    rows.append({"step": 20, "tokens": 2560, "val_loss": 2.5, "val_max_vio_global": 0.3})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_20").mkdir(parents=True)
    (ckpt / "step_20" / "meta.json").write_text(json.dumps({"step": 20}))
    (ckpt / "latest").write_text("step_20")
    s = lab_report.summarize_run(tmp_path, run)
    assert (s.steps, s.tokens, s.val_loss, s.max_vio_global) == (20, 2560, 2.5, 0.3)
    assert s.max_vio_batch == pytest.approx((19 + 20) / 2) and s.train_flops == 2560 * 1000.0


def test_plan_trains_every_variant_with_each_seed_seed_major(tmp_path):
    """Each planned run trains with its own seed, and every variant's first seed comes before any
    variant's second (a sweep cut short still compares all variants)."""
    sweep_file = tmp_path / "s.yaml"
    base = json.dumps(TINY + ["model.vocab_size=320"])
    sweep_file.write_text(
        f"base:\n  overrides: {base}\nbudget: {{steps: 3}}\nseeds: [5, 7]\n"
        "variants:\n  a: []\n  b: [train.lr=2e-3]\n"
    )
    runs = compare.plan(compare.load_sweep(sweep_file))
    assert [(r.variant, r.seed, r.cfg.train.seed) for r in runs] == [
        ("a", 5, 5),
        ("b", 5, 5),
        ("a", 7, 7),
        ("b", 7, 7),
    ]
    # the tiny preset's time limit does not cut a steps budget short
    assert all(r.cfg.train.max_steps == 3 and r.cfg.train.max_minutes is None for r in runs)


def test_a_run_that_died_before_its_first_checkpoint_starts_clean(tmp_path, monkeypatch):
    """A run folder without a checkpoint (an attempt that died early) is trained from scratch: none of
    what the dead attempt left is kept."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    sweep_file = tmp_path / "s.yaml"
    base = json.dumps(TINY + ["train.eval_every=100"])
    sweep_file.write_text(
        f"base:\n  overrides: {base}\ndata: corpus.txt\nbudget: {{steps: 2}}\nseeds: [1]\nvariants:\n  a: []\n"
    )
    dead = tmp_path / "out" / "a" / "seed_1"
    dead.mkdir(parents=True)
    (dead / "metrics.jsonl").write_text(json.dumps({"step": 99, "loss": 9.0, "tokens": 1}) + "\n")
    (dead / "stale.txt").write_text("left by the dead attempt")
    lab_runs.run_sweep(compare.load_sweep(sweep_file), tmp_path / "out", figures=False)
    steps = [json.loads(x)["step"] for x in (dead / "metrics.jsonl").read_text().splitlines()]
    assert 99 not in steps and max(steps) == 2 and not (dead / "stale.txt").exists()


def test_seeds_to_resolve_is_the_first_n_whose_interval_excludes_zero():
    """At the observed mean and spread, n seeds resolve and n - 1 do not (the interval's half-width
    t(n-1) sd / sqrt(n) against |mean|); a contrast that already resolves needs no more seeds than it has."""
    # [0, 1, 2]: mean = sd = 1, where t(n) in place of t(n - 1) would say 6 seeds, not 7
    for diffs in ([0.03, -0.02, 0.05, 0.0, 0.04], [-0.01, 0.02, -0.03, -0.02, 0.0, -0.01], [0.2, 0.21, 0.19],
                  [0.0, 1.0, 2.0]):  # fmt: skip
        st = lab_report.paired_stats(diffs)
        n = lab_report.seeds_to_resolve(st)
        sd = st["se"] * math.sqrt(st["n"])
        half = lambda k, sd=sd: lab_report.t975(k - 1) * sd / math.sqrt(k)  # noqa: E731
        assert half(n) < abs(st["mean"]) and (n == 2 or half(n - 1) >= abs(st["mean"]))
        if st["lo"] > 0 or st["hi"] < 0:
            assert n <= st["n"]
        else:
            assert n > st["n"]
    assert lab_report.seeds_to_resolve(lab_report.paired_stats([0.1, -0.1])) is None  # mean 0


def test_verdict_is_a_difference_or_an_equivalence_decided_by_the_interval(tmp_path, capsys):
    """An interval excluding 0 resolves as lower/higher; one inside the sweep's +-equivalence margin as
    equal; one straddling 0 but reaching past the margin, or any tie without a margin, does not."""
    st = lambda lo, hi: {"n": 10, "mean": (lo + hi) / 2, "se": (hi - lo) / 4, "lo": lo, "hi": hi}  # noqa: E731
    assert lab_report.verdict(st(-0.03, -0.001), 0.02) == "yes: lower"
    assert lab_report.verdict(st(0.001, 0.05)) == "yes: higher"
    assert lab_report.verdict(st(-0.012, 0.007), 0.02) == "yes: equal within ±0.02"
    assert lab_report.verdict(st(-0.012, 0.007)) == "no"  # no margin: a tie is not a decision
    assert lab_report.verdict(st(-0.0216, 0.0153), 0.02) == "no"  # reaches past the margin
    assert lab_report.verdict(st(-0.02, 0.01), 0.02) == "no"  # touching the margin is not inside it
    assert lab_report.verdict(None, 0.02) == "–"
    # the "seeds to resolve" planning column is for open contrasts only: a decided one shows "–"
    rows = [
        {"variant": v, "reference": "r", "seeds": 10, "val_loss": st(lo, hi), "equivalence": 0.02,
         "val_bpb": None, "both_moe": False}
        for v, lo, hi in (("tie", -0.012, 0.007), ("lower", -0.03, -0.001), ("open", -0.0216, 0.0153))
    ]  # fmt: skip
    cells = {
        line.split(" | ")[0][2:]: line.split(" | ")[4]
        for line in lab_report.contrast_table(rows).splitlines()[2:]
    }
    assert cells["tie − r"] == "–" and cells["lower − r"] == "–"
    assert cells["open − r"] == str(lab_report.seeds_to_resolve(rows[2]["val_loss"]))
    sweep_file = tmp_path / "eq.yaml"
    sweep_file.write_text("variants: {a: [], b: []}\nbudget: {steps: 3}\nequivalence: 0.02\n")
    assert compare.load_sweep(sweep_file).equivalence == 0.02
    sweep_file.write_text(
        "variants: {a: [], b: []}\nbudget: {steps: 3}\nequivalence: 1e-2\n"
    )  # a YAML string
    assert compare.load_sweep(sweep_file).equivalence == 0.01
    for bad in ("-0.01", "0", "true", ".nan", ".inf", "'small'", "1" + "0" * 400):
        sweep_file.write_text(f"variants: {{a: []}}\nbudget: {{steps: 3}}\nequivalence: {bad}\n")
        assert main(["compare", str(sweep_file)]) == 2
        assert "equivalence must be a positive margin" in capsys.readouterr().err


def _finished_run(run_dir: Path, steps: int, evals: list[tuple[int, float]], vio: float = 0.5) -> None:
    """A synthetic finished run: one training row per step, the (step, val_loss) evaluations, and a
    checkpoint at the last step."""
    rows = [
        {"step": s, "loss": 3.0, "tokens": 128 * s, "max_vio_mean": vio, "elapsed_s": 0.1 * s}
        for s in range(1, steps + 1)
    ]
    rows += [{"step": s, "tokens": 128 * s, "val_loss": v, "val_bpb": 2 * v} for s, v in evals]
    run_dir.mkdir(parents=True)
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (run_dir / "checkpoints" / f"step_{steps}").mkdir(parents=True)
    (run_dir / "checkpoints" / f"step_{steps}" / "meta.json").write_text(json.dumps({"step": steps}))
    (run_dir / "checkpoints" / "latest").write_text(f"step_{steps}")


def _synthetic_sweep(out: Path, final: dict[str, dict[int, float]]):
    """A steps sweep of MoE variants whose finished runs have these final validation losses (variant ->
    seed -> loss); each run also has an earlier, lower evaluation (its best, not its final one)."""
    from minimoe.lab.sweep import PlannedRun, Sweep

    seeds = sorted({s for by_seed in final.values() for s in by_seed})
    sweep = Sweep(name="syn", path=out / "s.yaml", variants={v: [] for v in final}, seeds=seeds,
                  budget_kind="steps", budget=4)  # fmt: skip
    cfg = build_run_config(overrides=TINY + ["model.vocab_size=320", "train.max_steps=4"])
    runs = [PlannedRun(v, s, [], cfg, 1000.0) for s in seeds for v in final]
    for v, by_seed in final.items():
        for s, loss in by_seed.items():
            _finished_run(out / v / f"seed_{s}", 4, [(2, loss - 0.01 * s), (4, loss)], vio=loss / 10)
    return sweep, runs


def test_contrasts_and_tables_match_a_paired_reference(tmp_path):
    """The contrast is the per-seed difference of final validation losses on the seeds both variants
    finished (a seed done by one side only is left out): its mean, sample SE and t(n - 1) interval, as the
    report's tables print them, against a slow hand computation."""
    ref = {1: 3.00, 2: 3.30, 3: 2.80, 4: 3.10}
    var = {1: 2.97, 3: 2.78, 4: 3.05, 5: 2.50}  # seed 2 not done by var, seed 5 not done by ref
    sweep, runs = _synthetic_sweep(tmp_path, {"ref": ref, "var": var})
    diffs = [var[s] - ref[s] for s in (1, 3, 4)]
    mean, sd = sum(diffs) / 3, math.sqrt(sum((d - sum(diffs) / 3) ** 2 for d in diffs) / 2)
    se, t2 = sd / math.sqrt(3), 4.303  # Student's t, 97.5%, 2 degrees of freedom
    rows = lab_report.report_rows(sweep, tmp_path, runs)
    c = lab_report.contrast_rows(sweep, rows)[0]
    st = c["val_loss"]
    assert (c["variant"], c["reference"], st["n"]) == ("var", "ref", 3)
    assert st["mean"] == pytest.approx(mean) and st["se"] == pytest.approx(se)
    assert st["lo"] == pytest.approx(mean - t2 * se) and st["hi"] == pytest.approx(mean + t2 * se)
    vio = c["max_vio_batch"]  # MaxVio batch is loss / 10 in these runs: paired the same way
    assert vio["n"] == 3 and vio["mean"] == pytest.approx(mean / 10) and vio["se"] == pytest.approx(se / 10)
    text = lab_report.write_report(sweep, tmp_path, runs, figures=False).read_text()
    cells = next(line for line in text.splitlines() if line.startswith("| var − ref |")).split(" | ")
    assert cells[1] == "3 (of 5; not 2, 5)"  # the sweep's seeds 1-5: 2 and 5 have no pair
    assert cells[2] == f"{mean:+.4f} ± {se:.4f} [{mean - t2 * se:+.4f}, {mean + t2 * se:+.4f}]"
    table = next(line for line in text.splitlines() if line.startswith("| var | 4/5 |")).split(" | ")
    assert table[6] == f"{mean:+.4f} ± {sd:.4f}"  # Δ val loss (paired): mean ± std over the same seeds
    assert table[5] == lab_report.mean_std(list(var.values()))  # final losses, not the best ones


def test_a_verdict_on_fewer_seeds_than_the_sweep_has_is_provisional(tmp_path):
    """A verdict resting on the seeds that survived is marked provisional, naming how many of the sweep's
    seeds it rests on and why the others are missing: a run that failed (its folder holds the marker
    the sweep writes) is told apart from one not finished. A contrast of every seed is not marked."""
    from minimoe.lab.sweep import FAILED_MARKER

    ref = {1: 3.00, 2: 3.30, 3: 2.80, 4: 3.10, 5: 3.20}
    sweep, runs = _synthetic_sweep(
        tmp_path,
        {"ref": ref, "var": {s: ref[s] - 0.1 - 0.001 * s for s in (1, 2, 3)},
         "all": {s: ref[s] - 0.1 - 0.001 * s for s in ref}},
    )  # fmt: skip
    (tmp_path / "var" / "seed_4").mkdir()
    (tmp_path / "var" / "seed_4" / FAILED_MARKER).write_text("training diverged\n")
    text = lab_report.write_report(sweep, tmp_path, runs, figures=False).read_text()
    cells = {line.split(" | ")[0]: line.split(" | ") for line in text.splitlines() if " − ref |" in line}
    assert cells["| var − ref"][3] == "yes: lower (provisional: 3 of 5 seeds; 1 failed, 1 not finished)"
    assert cells["| all − ref"][3] == "yes: lower"
    (tmp_path / "var" / "seed_5" / FAILED_MARKER).parent.mkdir()
    (tmp_path / "var" / "seed_5" / FAILED_MARKER).write_text("RuntimeError: out of memory\n")
    text = lab_report.write_report(sweep, tmp_path, runs, figures=False).read_text()
    assert "| yes: lower (provisional: 3 of 5 seeds; 2 failed) |" in text


def test_a_contrast_across_tokenizers_is_decided_on_bits_per_byte(tmp_path, monkeypatch):
    """Nats per token do not compare across tokenizers: a contrast between a byte-level and a BPE variant
    is decided (verdict, seeds to resolve) on validation bits per byte, and the table and a note say so."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    base = json.dumps(TINY + ["train.eval_every=100", "model.mtp_depth=0"])
    (tmp_path / "s.yaml").write_text(
        f"base:\n  overrides: {base}\ndata: corpus.txt\nbudget: {{tokens: 384}}\nseeds: [1, 2]\n"
        "variants:\n  byte: []\n  bpe: [data.tokenizer=bpe:320]\n"
    )
    sweep = compare.load_sweep(tmp_path / "s.yaml")
    text = lab_runs.run_sweep(sweep, tmp_path / "out", figures=False).read_text()
    rows = lab_report.report_rows(sweep, tmp_path / "out", compare.plan(sweep))
    (c,) = lab_report.contrast_rows(sweep, rows)
    assert c["measure"] == "val_bpb" and c["val_bpb"]["n"] == 2
    bpb = lab_report.verdict(c["val_bpb"])
    resolve = "–" if bpb != "no" else str(lab_report.seeds_to_resolve(c["val_bpb"]) or "> 1000")
    row = next(line for line in text.splitlines() if line.startswith("| bpe − byte |"))
    assert row.startswith(
        f"| bpe − byte | 2 | tokenizers differ: see Δ val bpb | {bpb} (on val bpb: the tokenizers differ) | {resolve} |"
    ), row
    assert "(bpe − byte) are decided on validation bits per byte" in text
    assert "At an equal budget of tokens, such variants also train on different amounts of text" in text


def test_report_figures_draw_the_finished_runs_the_tables_count(tmp_path, monkeypatch):
    """The figures draw the runs the tables count: a run stopped half-way (or failed) is left out of the
    loss curves too."""
    sweep, runs = _synthetic_sweep(tmp_path, {"ref": {1: 3.0, 2: 3.1}, "var": {1: 2.9}})
    _finished_run(tmp_path / "var" / "seed_2", 2, [(2, 2.5)])  # checkpoint at step 2 of 4: not finished
    import types

    drawn = []  # what the figures get (the synthetic runs have no config.yaml to read)
    monkeypatch.setattr(
        lab_plot, "load_run_data", lambda d, label: drawn.append(label) or types.SimpleNamespace(group=None)
    )
    monkeypatch.setattr(lab_plot, "loss_figure", lambda data, x: lab_plot._plt().figure())
    monkeypatch.setattr(lab_plot, "moe_runs", lambda data: [])
    assert lab_report._report_figures(tmp_path, runs)
    assert sorted(drawn) == ["ref (seed 1)", "ref (seed 2)", "var (seed 1)"]


def test_a_contrast_of_one_seed_says_it_has_no_interval(tmp_path):
    """One seed done by both sides has a difference but no spread: the table counts that seed and says
    there is no interval, instead of reporting 0 seeds."""
    sweep, runs = _synthetic_sweep(tmp_path, {"ref": {1: 3.0}, "var": {1: 2.9, 2: 2.8}})
    text = lab_report.write_report(sweep, tmp_path, runs, figures=False).read_text()
    row = next(line for line in text.splitlines() if line.startswith("| var − ref |"))
    assert row.startswith("| var − ref | 1 (of 2; not 2) | 1 seed: no interval (needs 2) | – |"), row


def test_a_reused_run_read_with_other_data_settings_is_refused(tmp_path):
    """A finished run is reused only when its data was read the same way: another tokenizer, text field,
    glob or validation split is refused, not reported as this sweep's run."""
    import yaml

    from minimoe.lab.sweep import PlannedRun

    common = TINY + ["model.vocab_size=320", f"data.path={tmp_path / 'corpus.txt'}"]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(build_run_config(overrides=common).to_dict()))
    lab_runs._check_same_config(tmp_path, PlannedRun("a", 1, [], build_run_config(overrides=common), 1.0))
    for ov in ("data.val_fraction=0.2", "data.text_field=body", "data.glob=*.txt", "data.tokenizer=bpe:512"):
        planned = PlannedRun("a", 1, [], build_run_config(overrides=common + [ov]), 1.0)
        with pytest.raises(MinimoeError, match=f"other data \\(data.{ov.split('=')[0][5:]} = "):
            lab_runs._check_same_config(tmp_path, planned)


def test_a_reused_run_may_hold_the_fallback_tokenizer_of_its_base_configs_preset(tmp_path, monkeypatch):
    """A base config file's `preset:` key names the seed preset its runs train (as in `minimoe train
    --config`): a finished run that trained that preset's fallback tokenizer (its own was not found) is
    skipped as done, not refused as trained on other data."""
    import yaml

    from minimoe.presets import TOKENIZER_FALLBACKS

    _corpus(tmp_path / "corpus.txt")
    (tmp_path / "base.yaml").write_text("preset: deepseek-mini\nmodel: {vocab_size: 512}\n")
    (tmp_path / "s.yaml").write_text(
        "base:\n  config: base.yaml\ndata: corpus.txt\nbudget: {steps: 2}\nseeds: [1]\nvariants:\n  a: []\n"
    )
    sweep = compare.load_sweep(tmp_path / "s.yaml")
    (planned,) = compare.plan(sweep)
    run = tmp_path / "out" / "a" / "seed_1"
    (run / "checkpoints" / "step_00000002").mkdir(parents=True)
    (run / "checkpoints" / "step_00000002" / "meta.json").write_text('{"step": 2}')
    (run / "checkpoints" / "latest").write_text("step_00000002")
    saved = planned.cfg.to_dict()
    saved["data"]["tokenizer"] = TOKENIZER_FALLBACKS["deepseek-mini"]  # what train_from_config stored
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    monkeypatch.setattr(lab_runs, "write_report", lambda *a, **k: tmp_path / "report.md")
    events = []
    lab_runs.run_sweep(sweep, tmp_path / "out", on_event=lambda e, r, d: events.append(e), figures=False)
    assert events == ["skip"]


def test_sweep_seeds_are_integers_not_booleans(tmp_path):
    (tmp_path / "s.yaml").write_text("variants: {a: []}\nbudget: {steps: 2}\nseeds: [true, 2]\n")
    with pytest.raises(MinimoeError, match="seeds must be a list of integers"):
        compare.load_sweep(tmp_path / "s.yaml")


def test_time_axis_places_each_evaluation_at_its_own_step(trained):
    """Against training time, an evaluation at a step with no logged row sits at the clock interpolated
    between the logged rows around it (not at the run's last logged time)."""
    data = lab_plot.load_run_data(trained[0], "a")
    data.train = [
        {"step": s, "loss": 3.0, "tokens": 128 * s, "elapsed_s": 2.0 * s} for s in range(10, 101, 10)
    ]
    data.evals = [{"step": s, "tokens": 128 * s, "val_loss": 3.0} for s in (5, 25, 50, 75, 103)]
    fig = lab_plot.loss_figure([data], "time")
    assert list(fig.get_axes()[1].lines[0].get_xdata()) == [20.0, 50.0, 100.0, 150.0, 200.0]


@pytest.mark.parametrize(
    "sweep_file", sorted(Path(__file__).parents[1].glob("experiments/**/*.yaml")), ids=lambda p: p.stem
)
def test_sweep_file_smoke(sweep_file, tmp_path, monkeypatch):
    """Each shipped sweep file: every variant trains two steps on a small generated corpus (CI checks the
    files parse, their variants build and train; the real sweeps are not run in CI)."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    data = _corpus(tmp_path / "corpus.txt")
    val = tmp_path / "valid.txt"  # a copy: the same file as both is refused
    val.write_bytes(data.read_bytes())
    sweep = compare.load_sweep(sweep_file, data=str(data), val_data=str(val))
    sweep.budget_kind, sweep.budget, sweep.seeds = "steps", 2, sweep.seeds[:1]
    sweep.base_overrides += [
        "train.eval_batches=1",
        "train.batch_size=2",
        "train.seq_len=32",
        "data.workers=0",
    ]
    if any("train.compile=true" in o for o in sum(sweep.variants.values(), [])):
        # the variant's compiled step is what it measures; here only that it builds and trains (inductor
        # would spend minutes compiling two steps), so torch.compile hands the function back
        monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    report = lab_runs.run_sweep(sweep, tmp_path / "out", figures=False)
    text = report.read_text()
    for v in sweep.variants:
        assert f"| {v} | 1/1 | 2 |" in text, v


def test_report_without_matplotlib_keeps_its_numbers(tmp_path, monkeypatch):
    """A sweep's report needs no figures: without matplotlib it is written with a note naming the extra,
    instead of the whole sweep ending in an import error after its runs."""
    import importlib.util

    _corpus(tmp_path / "corpus.txt")
    (tmp_path / "s.yaml").write_text(
        "name: nofig\nbase:\n  overrides: " + json.dumps(TINY) + "\ndata: corpus.txt\n"
        "budget: {steps: 2}\nseeds: [1]\nvariants:\n  a: []\n  b: [train.lr=1e-3]\n"
    )
    sweep = compare.load_sweep(tmp_path / "s.yaml")
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "matplotlib" else real(n, *a))
    text = lab_report.write_report(sweep, tmp_path / "out", compare.plan(sweep)).read_text()
    assert "| a | 0/1 |" in text and "not drawn, they need matplotlib (pip install 'minimoe[plot]')" in text
    assert not list((tmp_path / "out").glob("*.png"))


def test_split_sweep_reuses_reference_runs_and_refuses_another_config(tmp_path, monkeypatch, capsys):
    """Two files of one sweep share its folder: the second reuses the first's reference runs (skipped, and
    paired in its own report), and a reference with another config is refused, not silently reused."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    base = "base:\n  overrides: " + json.dumps(TINY + ["train.eval_every=100"]) + "\ndata: corpus.txt\n"
    common = "name: split\n" + base + "budget: {steps: 2}\nseeds: [1, 2]\n"
    (tmp_path / "a.yaml").write_text(
        common + "report: report_a.md\nvariants:\n  ref: []\n  x: [train.lr=1e-3]\n"
    )
    (tmp_path / "b.yaml").write_text(
        common + "report: report_b.md\nvariants:\n  ref: []\n  y: [train.lr=2e-3]\n"
    )
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "a.yaml"), "--out", str(out)]) == 0
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "b.yaml"), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert log.count("skip") == 2 and log.count("start") == 2  # ref reused, y trained
    assert (out / "report_a.md").is_file() and "| y − ref | 2 |" in (out / "report_b.md").read_text()
    (tmp_path / "c.yaml").write_text(common + "report: report_c.md\nvariants:\n  ref: [train.lr=5e-3]\n")
    assert main(["compare", str(tmp_path / "c.yaml"), "--out", str(out)]) == 2
    assert "another config (train.lr" in capsys.readouterr().err


def test_a_second_compare_on_a_folder_in_use_is_refused(tmp_path, monkeypatch, capsys):
    """A sweep holds its output folder's lock while it trains and while it writes its report: a second
    `compare` there (which would delete or share the first one's run folders), or a --report-only, is
    refused with one sentence; --plan reads only and still runs. The lock ends with the sweep: a rerun
    afterwards is not blocked."""
    import fcntl

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    base = json.dumps(TINY + ["train.eval_every=100"])
    sweep_file = tmp_path / "s.yaml"
    sweep_file.write_text(
        f"base:\n  overrides: {base}\ndata: corpus.txt\nbudget: {{steps: 2}}\nseeds: [1]\nvariants:\n  a: []\n"
    )
    out = tmp_path / "out"
    assert main(["compare", str(sweep_file), "--out", str(out)]) == 0
    assert main(["compare", str(sweep_file), "--out", str(out)]) == 0  # the first one's lock is gone
    assert "skip   a/seed_1" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    with open(out / lab_runs.LOCK_FILE, "a") as held:  # another process's sweep, as flock sees it
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)
        for extra in ([], ["--report-only"]):
            (out / "report.md").write_text("kept")
            assert main(["compare", str(sweep_file), "--out", str(out), *extra]) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"minimoe compare: error: another `minimoe compare` is running on {out}")
            assert err.count("\n") == 1 and (out / "report.md").read_text() == "kept"
        assert main(["compare", str(sweep_file), "--out", str(out), "--plan"]) == 0
    (out / "report.md").write_text(report)
    assert run_state(out / "a" / "seed_1", 2) == "done"


def test_report_only_refuses_runs_trained_with_another_config(tmp_path, monkeypatch, capsys):
    """--report-only checks the runs it reports as a rerun does: after the sweep file changed (another
    budget, another width for one variant), the old runs are refused with one sentence, and the report
    they made is not overwritten with numbers the file no longer describes."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    base = json.dumps(TINY + ["train.eval_every=100"])
    common = f"base:\n  overrides: {base}\ndata: corpus.txt\nseeds: [1]\n"
    (tmp_path / "s.yaml").write_text(
        common + "budget: {steps: 3}\nvariants:\n  moe: []\n  dense: [model.n_routed_experts=0]\n"
    )
    (tmp_path / "s2.yaml").write_text(
        common + "budget: {steps: 2}\nvariants:\n  moe: []\n"
        "  dense: [model.n_routed_experts=0, model.intermediate_size=256]\n"
    )
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "s2.yaml"), "--out", str(out), "--report-only"]) == 2
    err = capsys.readouterr().err
    assert "was trained with another config (train.max_steps = 3, this sweep wants 2)" in err
    assert err.count("\n") == 1 and (out / "report.md").read_text() == report
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out), "--report-only"]) == 0


def test_a_rerun_of_a_finished_sweep_at_precision_auto_skips_its_runs(tmp_path, monkeypatch, capsys):
    """The trainer records what `train.precision=auto` became on its device (bf16 or fp32) in config.yaml;
    rerunning the same sweep file skips those finished runs instead of refusing them as trained with
    another config (README: "rerunning a sweep continues it")."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    (tmp_path / "s.yaml").write_text(
        "base:\n  overrides: "
        + json.dumps(TINY + ["train.eval_every=100", "train.precision=auto"])
        + "\ndata: corpus.txt\nbudget: {steps: 2}\nseeds: [1]\nvariants:\n  a: []\n"
    )
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    saved = (out / "a" / "seed_1" / "config.yaml").read_text()
    assert "precision: auto" not in saved  # what ran, resolved for this device
    capsys.readouterr()
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "skip" in log and "start" not in log
    # a run that really trained at another precision is still refused
    (tmp_path / "t.yaml").write_text(
        (tmp_path / "s.yaml").read_text().replace("precision=auto", "precision=fp16")
    )
    assert main(["compare", str(tmp_path / "t.yaml"), "--out", str(out)]) == 2
    assert "another config (train.precision" in capsys.readouterr().err


def test_a_rerun_at_precision_auto_decides_at_the_runs_threads(tmp_path, monkeypatch, capsys):
    """What auto became is checked at the thread count the run trained with (train.threads), not at the
    compare process's: where bf16 pays on one thread but not on two, a finished one-thread bf16 run is
    skipped by a rerun from a two-thread process, not refused as trained with another config."""
    from minimoe.train import precision as precision_lib

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_lib, "native_bf16", lambda device: True)
    monkeypatch.setattr(precision_lib, "cpu_bf16_speedup", lambda threads: 2.0 if threads == 1 else 0.5)
    _corpus(tmp_path / "corpus.txt")
    overrides = TINY + ["train.eval_every=100", "train.precision=auto", "train.threads=1"]
    (tmp_path / "s.yaml").write_text(
        "base:\n  overrides: "
        + json.dumps(overrides)
        + "\ndata: corpus.txt\nbudget: {steps: 2}\nseeds: [1]\n"
        "variants:\n  a: []\n"
    )
    out, threads = tmp_path / "out", torch.get_num_threads()
    try:
        assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
        assert "precision: bf16" in (out / "a" / "seed_1" / "config.yaml").read_text()
        capsys.readouterr()
        torch.set_num_threads(2)
        assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    finally:
        torch.set_num_threads(threads)
    log = capsys.readouterr()
    assert "skip" in log.out and "start" not in log.out, log.err


def test_sweep_file_values_of_the_wrong_type_are_one_sentence(tmp_path, capsys):
    """A sweep file's contrasts, data paths and base preset/config of the wrong YAML type are refused in
    one sentence naming the key, not an internal error."""
    common = "variants: {a: [], b: []}\nbudget: {steps: 3}\n"
    for extra, key in (
        ("contrasts: 5\n", "contrasts must be a list"),
        ("data: 5\n", "data must be"),
        ("val_data: [x]\n", "val_data must be"),
        ("base: {preset: [x]}\n", "base.preset must be"),
        ("base: {config: 5}\n", "base.config must be"),
    ):
        (tmp_path / "s.yaml").write_text(common + extra)
        assert main(["compare", str(tmp_path / "s.yaml"), "--plan"]) == 2, extra
        assert key in capsys.readouterr().err, extra


def test_plan_keeps_the_vocab_size_a_base_config_sets(tmp_path, monkeypatch):
    """As `minimoe train --config`, a sweep keeps the model.vocab_size its base config file sets; only an
    unset one is fitted to the tokenizer."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    for vocab, want in (("model: {vocab_size: 512}\n", 512), ("model: {hidden_size: 32}\n", 320)):
        (tmp_path / "base.yaml").write_text(vocab)
        (tmp_path / "s.yaml").write_text(
            "base:\n  config: base.yaml\n  overrides: " + json.dumps(TINY) + "\ndata: corpus.txt\n"
            "budget: {steps: 2}\nseeds: [1]\nvariants:\n  a: []\n"
        )
        runs = compare.plan(compare.load_sweep(tmp_path / "s.yaml"))
        assert runs[0].cfg.model.vocab_size == want, vocab


def test_a_rerun_on_other_data_is_refused_not_reported_as_that_data(tmp_path, monkeypatch, capsys):
    """Finished runs trained on one corpus are not skipped as done (and reported under another data
    name) when the sweep is rerun on other training or validation data."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    (tmp_path / "other.txt").write_text("another text altogether\n" * 200, encoding="utf-8")
    (tmp_path / "s.yaml").write_text(
        "base:\n  overrides: " + json.dumps(TINY + ["train.eval_every=100"]) + "\ndata: corpus.txt\n"
        "budget: {steps: 2}\nseeds: [1]\nvariants:\n  a: []\n"
    )
    out = str(tmp_path / "out")
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", out]) == 0
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", out]) == 0
    assert "skip" in capsys.readouterr().out
    for opt in ("--data", "--val-data"):
        assert (
            main(["compare", str(tmp_path / "s.yaml"), "--out", out, opt, str(tmp_path / "other.txt")]) == 2
        )
        assert "trained on other data" in capsys.readouterr().err, opt


def test_compare_help_lists_every_sweep_file_key():
    """`minimoe compare --help` shows the sweep file's format: every key load_sweep accepts is in it."""
    from minimoe.cli.compare import SWEEP_FORMAT

    missing = [k for k in compare.SWEEP_KEYS if f"\n  {k}:" not in SWEEP_FORMAT]
    assert missing == []


def test_a_section_given_as_one_override_is_one_sentence(tmp_path, monkeypatch, capsys):
    """An override that names a whole section (`model=5`, a mapping as the value of `model`) is refused
    with one sentence wherever overrides are read; a sweep file's nested mapping of overrides is read as
    the dotted keys it spells."""
    with pytest.raises(MinimoeError, match=r"config key 'model' is a section; give model.FIELD=value"):
        build_run_config(overrides=["model={'hidden_size': 64}"])
    assert main(["train", "--preset", "tiny", "train=5"]) == 2
    assert capsys.readouterr().err == (
        "minimoe train: error: config key 'train' is a section; give train.FIELD=value\n"
    )
    (tmp_path / "s.yaml").write_text(
        "base: {overrides: {train: {seq_len: 32}}}\nbudget: {steps: 2}\n"
        "variants:\n  a: {model: {hidden_size: 64, vocab_size: 320}}\n  b: {model.hidden_size: 32}\n"
    )
    sweep = compare.load_sweep(tmp_path / "s.yaml")
    assert sweep.base_overrides == ["train.seq_len=32"]
    assert sweep.variants == {
        "a": ["model.hidden_size=64", "model.vocab_size=320"],
        "b": ["model.hidden_size=32"],
    }
    for value in ("5", "null", "{}"):
        (tmp_path / "s.yaml").write_text(f"budget: {{steps: 2}}\nvariants:\n  a: {{model: {value}}}\n")
        assert main(["compare", str(tmp_path / "s.yaml"), "--plan"]) == 2
        assert capsys.readouterr().err.endswith(
            "variant 'a': config key 'model' is a section; give model.FIELD=value\n"
        )


def test_a_variants_own_data_source_beside_the_sweeps_is_refused(tmp_path, monkeypatch, capsys):
    """The sweep's `data` (or `val_data`) would replace a variant's or the base's own data.path (or
    data.val_path) without a word: such a file is refused with one sentence. A directory given as the
    sweep file is named as the sweep file."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    _corpus(tmp_path / "val.txt")
    for key, extra in (("data.path", ""), ("data.val_path", "val_data: val.txt\n")):
        (tmp_path / "s.yaml").write_text(
            f"data: corpus.txt\n{extra}budget: {{steps: 2}}\nvariants:\n  b: [{key}=nowhere.txt]\n  a: []\n"
        )
        assert main(["compare", str(tmp_path / "s.yaml"), "--plan"]) == 2
        err = capsys.readouterr().err
        assert f"variant 'b': {key}=nowhere.txt conflicts with the sweep's " in err and err.count("\n") == 1
    assert main(["compare", str(tmp_path), "--plan"]) == 2
    assert capsys.readouterr().err == (
        f"minimoe compare: error: sweep file {tmp_path} is a directory, not a YAML file\n"
    )


def test_a_key_given_twice_in_a_sweep_file_is_refused(tmp_path, capsys):
    """YAML keeps the last of two equal keys: a variant name given twice would silently drop the first
    variant (and a budget given twice its first value). The sweep file is refused, naming the key."""
    for text, key in (
        ("variants:\n  a: [train.lr=1e-3]\n  a: [train.lr=2e-3]\n  b: []\nbudget: {steps: 3}\n", "'a'"),
        ("variants: {a: [], b: []}\nbudget: {steps: 3, steps: 4}\n", "'steps'"),
        ("variants: {a: []}\nseeds: [1]\nbudget: {steps: 3}\nseeds: [2]\n", "'seeds'"),
    ):
        (tmp_path / "s.yaml").write_text(text)
        assert main(["compare", str(tmp_path / "s.yaml"), "--plan"]) == 2, text
        err = capsys.readouterr().err
        assert f"{key} is given twice" in err and err.count("\n") == 1, err
    # an anchor's merge key and the same variant name under two sections are not repeats
    (tmp_path / "s.yaml").write_text(
        "base:\n  overrides: &o [train.lr=1e-3]\nvariants:\n  a: *o\n  b: []\nbudget: {steps: 3}\n"
    )
    assert list(compare.load_sweep(tmp_path / "s.yaml").variants) == ["a", "b"]


def test_a_steps_budget_is_a_whole_number_of_steps(tmp_path, capsys):
    """`budget: {steps: 2.7}` is not silently trained as 2 steps, nor 0.5 as an error about max_steps;
    `{minutes: true}` is no budget of 1 minute."""
    for value in ("2.7", "0.5"):
        (tmp_path / "s.yaml").write_text(f"variants: {{a: []}}\nbudget: {{steps: {value}}}\n")
        assert main(["compare", str(tmp_path / "s.yaml"), "--plan"]) == 2, value
        assert "budget steps must be a whole number" in capsys.readouterr().err, value
    (tmp_path / "s.yaml").write_text("variants: {a: []}\nbudget: {minutes: true}\n")
    assert main(["compare", str(tmp_path / "s.yaml"), "--plan"]) == 2
    assert "budget minutes must be a number, got True" in capsys.readouterr().err
    (tmp_path / "s.yaml").write_text("variants: {a: []}\nbudget: {steps: 3.0}\n")
    assert compare.load_sweep(tmp_path / "s.yaml").budget == 3


def test_a_non_finite_loss_is_reported_not_a_crash(tmp_path):
    """A seed whose final validation loss is NaN or inf (a diverged run) leaves the report readable: its
    contrast has no interval and no verdict (it is not resolved), the other contrasts are unchanged."""
    ref = {1: 3.0, 2: 3.2, 3: 2.9}
    sweep, runs = _synthetic_sweep(
        tmp_path, {"ref": ref, "nan": {1: 2.9, 2: float("nan"), 3: 2.8}, "inf": {1: 2.9, 2: float("inf"), 3: 2.8},
                   "ok": {1: 2.9, 2: 3.1, 3: 2.8}},
    )  # fmt: skip
    text = lab_report.write_report(sweep, tmp_path, runs, figures=False).read_text()
    lines = text.splitlines()
    for v in ("nan", "inf"):
        row = next(line for line in lines if line.startswith(f"| {v} − ref |"))
        assert row.startswith(f"| {v} − ref | 3 | not finite: a seed's loss is NaN or inf | – | – |"), row
        table = next(line for line in lines if line.startswith(f"| {v} | 3/3 |")).split(" | ")
        assert table[5] == "not finite in 1 of 3 seeds", table
    ok = next(line for line in lines if line.startswith("| ok − ref |"))
    assert "yes: lower" in ok
    assert lab_report.paired_stats([0.1, float("nan"), 0.2]) is None


def test_early_stopping_is_refused_in_a_sweep(tmp_path, capsys):
    """An early-stopped run ends before its budget: the report would never count it and a rerun could not
    resume it (the trainer refuses), so a sweep that turns early stopping on is refused up front."""
    base = json.dumps(TINY + ["model.vocab_size=320"])
    for where in ("base", "variant"):
        es = "train.early_stop_patience=2"
        (tmp_path / "s.yaml").write_text(
            f"base:\n  overrides: {base if where == 'variant' else base[:-1] + ', ' + json.dumps(es) + ']'}\n"
            f"budget: {{steps: 4}}\nvariants:\n  a: {json.dumps([es]) if where == 'variant' else '[]'}\n"
        )
        assert main(["compare", str(tmp_path / "s.yaml"), "--plan"]) == 2, where
        assert "train.early_stop_patience=2 would end runs before the budget" in capsys.readouterr().err


def test_a_sweep_without_validation_is_refused_before_any_run(tmp_path, monkeypatch, capsys):
    """A sweep compares validation losses: runs with no val_data and data.val_fraction=0 (in the base or a
    variant) would all train, then the sweep failed on their missing loss; it is refused at plan time in
    one sentence, before any run trains. With val_data it plans."""
    import minimoe.train.run

    def trained(*a, **k):
        raise AssertionError("a run trained before the sweep was refused")

    monkeypatch.setattr(minimoe.train.run, "train_from_config", trained)
    monkeypatch.setattr(compare, "_fitted_vocab", lambda cfg, val_data: 320)  # nothing to prepare here
    _corpus(tmp_path / "corpus.txt")
    base = TINY + ["model.vocab_size=320"]
    no_val = "data.val_fraction=0"
    for base_ov, variant_ov in ((base + [no_val], []), (base, [no_val])):
        (tmp_path / "s.yaml").write_text(
            f"base:\n  overrides: {json.dumps(base_ov)}\ndata: corpus.txt\nbudget: {{steps: 2}}\nseeds: [1]\n"
            f"variants:\n  ref: []\n  a: {json.dumps(variant_ov)}\n"
        )
        for argv in (["--plan"], ["--out", str(tmp_path / "out")]):
            assert main(["compare", str(tmp_path / "s.yaml"), *argv]) == 2, argv
            err = capsys.readouterr().err.strip()
            assert len(err.splitlines()) == 1 and "a sweep compares validation losses" in err, err
            assert "give val_data or set data.val_fraction above 0" in err, err
            # no run folder (the sweep's lock file aside): nothing started
            assert not any(p.name != lab_runs.LOCK_FILE for p in (tmp_path / "out").glob("*"))
    monkeypatch.undo()
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "val.txt")
    sweep = compare.load_sweep(tmp_path / "s.yaml", val_data=str(tmp_path / "val.txt"))
    assert [r.variant for r in compare.plan(sweep)] == ["ref", "a"]
    # a run that still ends without a validation loss is reported as such, not a TypeError
    events = []
    monkeypatch.setattr(lab_runs, "_train_run", lambda kwargs, level: (None, 1.0, "max_steps"))
    monkeypatch.setattr(lab_runs, "write_report", lambda *a, **k: tmp_path / "report.md")
    lab_runs.run_sweep(
        sweep, tmp_path / "out", on_event=lambda *e: events.append((e[0], e[2])), figures=False
    )
    assert ("done", "no val_loss in 1 s") in events, events


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_a_diverged_run_does_not_stop_the_sweep(tmp_path, monkeypatch, capsys, jobs):
    """A variant that diverges (the trainer stops it with an error) is reported as failed; the other
    variants still train and the report is written with them, and compare exits non-zero."""
    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    base = TINY + ["model.mtp_depth=0", "train.eval_every=100", "train.grad_clip=0", "train.threads=1"]
    (tmp_path / "s.yaml").write_text(
        "base:\n  overrides: " + json.dumps(base) + "\ndata: corpus.txt\nbudget: {steps: 8}\nseeds: [1]\n"
        "variants:\n  bad: [train.lr=1e6]\n  good: []\n"
    )
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out), "--jobs", jobs]) == 1
    captured = capsys.readouterr()
    assert "failed bad/seed_1" in captured.out and "training diverged" in captured.out
    assert "done   good/seed_1" in captured.out
    assert "1 run failed (bad/seed_1)" in captured.err
    report = (out / "report.md").read_text()
    assert "| bad | 0/1 |" in report and "| good | 1/1 |" in report
    if jobs == "1":  # the variant fixed in the sweep file: its failed run (no checkpoint) trains anew
        (tmp_path / "s.yaml").write_text((tmp_path / "s.yaml").read_text().replace("lr=1e6", "lr=1e-3"))
        assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
        assert "start  bad/seed_1" in capsys.readouterr().out
        assert "| bad | 1/1 |" in (out / "report.md").read_text()


@pytest.mark.parametrize("jobs", ["1", "2"])
def test_an_unexpected_error_in_one_run_does_not_stop_the_sweep(tmp_path, monkeypatch, capsys, jobs):
    """A run that raises something other than a MinimoeError (a RuntimeError from torch, say) is reported
    as failed with the error's type and message; the later runs still train and the report is written.
    A KeyboardInterrupt still stops the sweep. (--jobs 2: worker processes replaced by threads.)"""
    import concurrent.futures

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        concurrent.futures,
        "ProcessPoolExecutor",
        lambda max_workers, **kw: concurrent.futures.ThreadPoolExecutor(max_workers),
    )
    _corpus(tmp_path / "corpus.txt")
    base = json.dumps(TINY + ["train.eval_every=100", "train.threads=1"])
    (tmp_path / "s.yaml").write_text(
        f"base:\n  overrides: {base}\ndata: corpus.txt\nbudget: {{steps: 2}}\nseeds: [1]\n"
        "variants:\n  bad: []\n  good: []\n"
    )
    real, error = lab_runs._train_run, RuntimeError("CUDA out of memory.\nTried to allocate 2 GiB")

    def train(kwargs, level):
        if Path(kwargs["run_dir"]).parent.name == "bad":
            raise error
        return real(kwargs, level)

    monkeypatch.setattr(lab_runs, "_train_run", train)
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out), "--jobs", jobs]) == 1
    captured = capsys.readouterr()
    assert (
        "failed bad/seed_1  (2 steps)  RuntimeError: CUDA out of memory. Tried to allocate 2 GiB\n"
        in captured.out
    )
    assert "done   good/seed_1" in captured.out and "1 run failed (bad/seed_1)" in captured.err
    report = (out / "report.md").read_text()
    assert "| bad | 0/1 |" in report and "| good | 1/1 |" in report
    assert (out / "bad" / "seed_1" / "failed").read_text().startswith("RuntimeError: CUDA out of memory.")
    if jobs == "1":
        error = KeyboardInterrupt()
        shutil.rmtree(out)
        assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out)]) == 130
        assert "good" not in capsys.readouterr().out and not (out / "report.md").exists()


def test_a_worker_killed_from_outside_stops_the_sweep_with_one_sentence(tmp_path, monkeypatch, capsys):
    """A worker process killed mid-run (the out-of-memory killer) breaks the pool: its run is reported
    failed, and the next run that cannot start stops the sweep with one sentence (exit 2, not an internal
    error), so that a rerun continues it. (Worker processes replaced by threads; the kill by its error.)"""
    import concurrent.futures
    from concurrent.futures.process import BrokenProcessPool

    class Pool(concurrent.futures.ThreadPoolExecutor):
        broken, submitted = False, threading.Semaphore(0)

        def submit(self, fn, *args):
            if Pool.broken:
                raise BrokenProcessPool("A child process terminated abruptly")
            Pool.submitted.release()
            return super().submit(fn, *args)

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(
        concurrent.futures, "ProcessPoolExecutor", lambda max_workers, **kw: Pool(max_workers)
    )
    _corpus(tmp_path / "corpus.txt")
    base = json.dumps(TINY + ["train.eval_every=100", "train.threads=1"])
    (tmp_path / "s.yaml").write_text(
        f"base:\n  overrides: {base}\ndata: corpus.txt\nbudget: {{steps: 2}}\nseeds: [1, 2]\n"
        "variants:\n  a: []\n  b: []\n"
    )
    real = lab_runs._train_run

    def train(kwargs, level):
        if Path(kwargs["run_dir"]).parent.name == "a" and Path(kwargs["run_dir"]).name == "seed_1":
            for _ in range(2):  # dies once both workers have their runs, as a killed worker does mid-run
                Pool.submitted.acquire()
            Pool.broken = True
            raise BrokenProcessPool("A process in the process pool was terminated abruptly")
        return real(kwargs, level)

    monkeypatch.setattr(lab_runs, "_train_run", train)
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(tmp_path / "out"), "--jobs", "2"]) == 2
    captured = capsys.readouterr()
    assert "failed a/seed_1" in captured.out, captured.out
    assert "a worker process of the sweep died" in captured.err and "rerun the sweep" in captured.err
    assert "so a/seed_2 cannot run" in captured.err, captured.err
    assert "internal error" not in captured.err


def test_a_run_that_died_before_its_first_checkpoint_may_have_had_another_config(tmp_path, monkeypatch):
    """A run that died before its first checkpoint (e.g. a bad setting, since fixed in the sweep file)
    is started clean with the file's config, not refused as trained with another config."""
    import yaml

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    base = json.dumps(TINY + ["train.eval_every=100"])
    (tmp_path / "s.yaml").write_text(
        f"base:\n  overrides: {base}\ndata: corpus.txt\nbudget: {{steps: 2}}\nseeds: [1]\nvariants:\n  a: []\n"
    )
    sweep = compare.load_sweep(tmp_path / "s.yaml")
    (planned,) = compare.plan(sweep)
    dead = tmp_path / "out" / "a" / "seed_1"
    dead.mkdir(parents=True)
    old = planned.cfg.to_dict()
    old["train"]["lr"] = 1e6  # what the file said before its fix
    (dead / "config.yaml").write_text(yaml.safe_dump(old))
    lab_runs.run_sweep(sweep, tmp_path / "out", figures=False)
    assert yaml.safe_load((dead / "config.yaml").read_text())["train"]["lr"] == planned.cfg.train.lr
    assert run_state(dead, 2) == "done"


def test_a_run_killed_while_saving_is_resumed_not_wiped(tmp_path):
    """A run killed between writing a checkpoint and pointing `latest` at it (no `latest` yet, or one
    naming a directory renamed away) still holds complete checkpoints, which a resume loads: its state
    is read from them, not 'new' (which would delete the run folder)."""
    run = tmp_path / "a" / "seed_1"
    _finished_run(run, 4, [(4, 3.0)])
    (run / "checkpoints" / "latest").unlink()
    assert run_state(run, 4) == "done" and run_state(run, 8) == "partial"
    (run / "checkpoints" / "latest").write_text("step_9\n")  # a step directory that is not there
    assert run_state(run, 4) == "done"
    assert run_state(tmp_path / "nothing", 4) == "new"


def test_ctrl_c_stops_the_sweep_not_just_the_run(tmp_path, monkeypatch, capsys):
    """The trainer turns a Ctrl-C (or SIGTERM) into a checkpoint and a normal return: compare must stop
    there (exit 130), not report that run as done and start the next one; a rerun resumes it."""
    import os
    import signal

    from minimoe.train.interrupt import Interrupt

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    (tmp_path / "s.yaml").write_text(
        "base:\n  overrides: " + json.dumps(TINY + ["train.eval_every=100"]) + "\ndata: corpus.txt\n"
        "budget: {steps: 4}\nseeds: [1]\nvariants:\n  a: []\n  b: []\n"
    )
    enter = Interrupt.__enter__

    def signalled(self):  # a Ctrl-C as training starts
        enter(self)
        os.kill(os.getpid(), signal.SIGINT)
        return self

    monkeypatch.setattr(Interrupt, "__enter__", signalled)
    out = tmp_path / "out"
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out)]) == 130
    log = capsys.readouterr().out
    assert "stopped a/seed_1" in log and "done" not in log and "b/seed_1" not in log
    assert run_state(out / "a" / "seed_1", 4) == "partial"
    monkeypatch.setattr(Interrupt, "__enter__", enter)
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out)]) == 0
    log = capsys.readouterr().out
    assert "resume a/seed_1" in log and log.count("done") == 2


def test_ctrl_c_stops_parallel_runs_with_a_checkpoint_each(tmp_path, monkeypatch, capsys):
    """With --jobs 2 a Ctrl-C (or SIGTERM) sent to compare reaches each training worker once: both save
    a checkpoint and stop, and compare exits 130, instead of waiting for both runs to train to the end."""
    import os
    import signal
    import threading
    import time

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    base = TINY + ["train.eval_every=100000", "train.threads=1"]
    (tmp_path / "s.yaml").write_text(
        "base:\n  overrides: " + json.dumps(base) + "\ndata: corpus.txt\n"
        "budget: {steps: 4000}\nseeds: [1]\nvariants:\n  a: []\n  b: []\n"
    )
    out = tmp_path / "out"
    logs = [out / v / "seed_1" / "metrics.jsonl" for v in ("a", "b")]

    def signal_once_both_train() -> None:  # both trainers have logged a step: they listen for it
        deadline = time.monotonic() + 120
        while not all(p.is_file() and p.stat().st_size for p in logs) and time.monotonic() < deadline:
            time.sleep(0.2)
        os.kill(os.getpid(), signal.SIGINT)

    threading.Thread(target=signal_once_both_train, daemon=True).start()
    assert main(["compare", str(tmp_path / "s.yaml"), "--out", str(out), "--jobs", "2"]) == 130
    log = capsys.readouterr().out
    assert "stopped a/seed_1" in log and "stopped b/seed_1" in log
    for v in ("a", "b"):
        assert run_state(out / v / "seed_1", 4000) == "partial"


def test_layer_stats_match_a_token_by_token_count():
    """Every number of one layer's statistics against a plain loop over a hand-made routing: T = 6
    tokens, K = 2 of E = 4 experts, two shared experts. Expert 0 is dominant (5/12 > 1 x 1/E; 3/12 only
    equals it), expert 3 is chosen once (alive), and the probabilities are not the gate weights."""
    from collections import Counter

    from minimoe.data import resolve_tokenizer

    tok = resolve_tokenizer("byte")
    idx = [[0, 1], [0, 2], [1, 0], [0, 2], [3, 0], [2, 1]]
    ids = [ord(c) for c in "abacab"]
    probs = torch.tensor([[0.4, 0.3, 0.2, 0.1], [0.5, 0.1, 0.3, 0.1], [0.35, 0.45, 0.1, 0.1],
                          [0.6, 0.1, 0.2, 0.1], [0.3, 0.1, 0.1, 0.5], [0.1, 0.3, 0.5, 0.1]])  # fmt: skip
    r = lab_inspect.LayerRouting(torch.tensor(idx), torch.full((6, 2), 0.5), probs)
    st = lab_inspect.layer_stats(r, ids, tok, n_shared=2, top_n=8, dominant_factor=1.0)
    T, K, E, S = 6, 2, 4, 2
    count = [sum(row.count(e) for row in idx) for e in range(E)]  # [5, 3, 3, 1]
    share = [c / (T * K) for c in count]
    assert st["routed_share"] == pytest.approx(share) and st["token_frac"] == pytest.approx(
        [c / T for c in count]
    )
    assert st["slot_share"]["routed"] == pytest.approx([s * K / (K + S) for s in share])
    assert (
        st["slot_share"]["shared"] == pytest.approx([1 / (K + S)] * S)
        and st["shared_token_frac"] == [1.0] * S
    )
    H = [-sum(p * math.log(p) for p in row) for row in probs.tolist()]
    assert st["entropy"]["mean_token_nats"] == pytest.approx(sum(H) / T)
    assert st["entropy"]["mean_token_normalised"] == pytest.approx(sum(H) / T / math.log(E))
    assert st["entropy"]["load_normalised"] == pytest.approx(
        -sum(s * math.log(s) for s in share) / math.log(E)
    )
    assert st["max_vio"] == pytest.approx(max(count) / (sum(count) / E) - 1)
    both = [[sum(i != j and i in row and j in row for row in idx) / T for j in range(E)] for i in range(E)]
    assert st["coactivation"] == [pytest.approx(row) for row in both]
    assert st["dead_experts"] == [] and st["dominant_experts"] == [0]  # 5/12 > 1/4 == 3/12
    for e in range(E):
        seen = Counter(t for t, row in zip(ids, idx) if e in row)
        want = {tok.decode([t]): (n, round(n / ids.count(t), 4)) for t, n in seen.items()}
        assert {x["token"]: (x["count"], x["frac_of_token"]) for x in st["top_tokens"][e]} == want, e


def test_recorded_probabilities_are_the_router_scores_normalised_per_token(trained):
    """The entropy's probabilities are the router's unbiased scores of the hooked input, normalised to
    sum to 1 per token (sigmoid scores do not sum to 1 by themselves)."""
    from minimoe.model.router import router_scores
    from minimoe.train.checkpoint import load_run

    run, _ = trained
    model, _, _, _ = load_run(run)
    x = torch.tensor([list(range(40, 72))])
    seen = {}
    gate = lab_inspect.moe_gates(model)[1]
    h = gate.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach().clone()))  # returns None
    try:
        routing = lab_inspect.route_ids(model, x)
    finally:
        h.remove()
    s = router_scores(
        seen["x"].reshape(-1, seen["x"].shape[-1]).double() @ gate.weight.double().T, gate.cfg.scoring_func
    )
    torch.testing.assert_close(routing[1].probs.double(), s / s.sum(-1, keepdim=True), rtol=1e-5, atol=1e-6)


def test_an_interval_touching_zero_or_the_margin_does_not_resolve():
    """Resolution needs the interval to exclude 0 strictly, or to lie strictly inside ±equivalence."""
    st = lambda lo, hi: {"n": 10, "mean": (lo + hi) / 2, "se": (hi - lo) / 4, "lo": lo, "hi": hi}  # noqa: E731
    assert lab_report.verdict(st(-0.01, 0.0)) == "no" and lab_report.verdict(st(0.0, 0.01)) == "no"
    assert lab_report.verdict(st(-0.01, 0.02), 0.02) == "no"  # the upper end touches the margin
    assert lab_report.verdict(st(-0.01, 0.0199), 0.02) == "yes: equal within ±0.02"


def test_summary_maxvio_batch_rounds_the_last_tenth_up_and_takes_the_mean(tmp_path):
    """25 logged rows: the last ceil(2.5) = 3 of them, averaged (not their median)."""
    from minimoe.lab.sweep import PlannedRun

    cfg = build_run_config(overrides=TINY + ["model.vocab_size=320", "train.max_steps=25"])
    vios = [0.0] * 22 + [1.0, 2.0, 6.0]
    rows = [{"step": s, "loss": 1.0, "tokens": 128 * s, "max_vio_mean": v} for s, v in enumerate(vios, 1)]
    rows.append({"step": 25, "tokens": 3200, "val_loss": 2.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "checkpoints" / "step_25").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_25" / "meta.json").write_text(json.dumps({"step": 25}))
    (tmp_path / "checkpoints" / "latest").write_text("step_25")
    s = lab_report.summarize_run(tmp_path, PlannedRun("v", 1, [], cfg, 1.0))
    assert s.max_vio_batch == pytest.approx((1.0 + 2.0 + 6.0) / 3)


def test_summary_speed_leaves_out_the_first_window_and_a_time_budget_reports_the_mean_steps(
    tmp_path, monkeypatch
):
    """A run's tokens/s is the median over its logged windows after the first (which holds start-up);
    a minutes sweep's steps column is the mean over its finished seeds (the clock decides each)."""
    from minimoe.lab.sweep import PlannedRun

    cfg = build_run_config(overrides=TINY + ["model.vocab_size=320", "train.max_steps=3"])
    rows = [
        {"step": s, "loss": 1.0, "tokens": 128 * s, "tokens_per_s": v}
        for s, v in ((1, 10), (2, 100), (3, 200))
    ]
    rows.append({"step": 3, "tokens": 384, "val_loss": 2.5})
    (tmp_path / "run" / "checkpoints" / "step_3").mkdir(parents=True)
    (tmp_path / "run" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "run" / "checkpoints" / "step_3" / "meta.json").write_text(json.dumps({"step": 3}))
    (tmp_path / "run" / "checkpoints" / "latest").write_text("step_3")
    summary = lab_report.summarize_run(tmp_path / "run", PlannedRun("v", 1, [], cfg, 1.0))
    assert summary.tokens_per_s == 150
    sweep, runs = _synthetic_sweep(tmp_path / "syn", {"v": {1: 3.0, 2: 3.1, 3: 3.2}})
    sweep.budget_kind = "minutes"
    steps = {1: 10, 2: 13, 3: 14}
    monkeypatch.setattr(
        lab_report,
        "summarize_run",
        lambda d, r: dataclasses.replace(summary, seed=r.seed, steps=steps[r.seed]),
    )
    assert lab_report.report_rows(sweep, tmp_path / "syn", runs)[0]["steps"] == 12  # not the longest, 14


def test_human_numbers_keep_three_significant_digits():
    assert [lab_report._human(n) for n in (999, 1234, 2.5e6, 1.234e9, 7e12)] == [
        "999", "1.23K", "2.50M", "1.23G", "7.00T"
    ]  # fmt: skip


def test_a_contrast_with_no_seed_in_common_has_an_empty_loss_cell():
    cells = [lab_report._loss_cell({"val_loss": None, "seeds": n}) for n in (0, 1, 2)]
    assert cells == ["–", "1 seed: no interval (needs 2)", "not finite: a seed's loss is NaN or inf"]


def test_training_flops_include_the_mtp_modules():
    """An MTP depth adds 3x its forward FLOPs to the training cost, and the budget helpers use it."""
    S = 32
    plain, mtp = flops.flops_per_token(_hand_cfg(), S), flops.flops_per_token(_hand_cfg(mtp_depth=1), S)
    assert mtp.forward_mtp > 0 and mtp.forward_matmul == plain.forward_matmul
    assert mtp.train_per_token == pytest.approx(plain.train_per_token + 3 * mtp.forward_mtp, rel=1e-12)
    assert mtp.forward_per_token == pytest.approx(plain.forward_per_token + mtp.forward_mtp, rel=1e-12)


def _t975_by_integration(df: int) -> float:
    """Student's 97.5% quantile from its density alone: Simpson's rule for the probability between 0 and
    x, bisected until it is 0.475. Slow and plainly correct; needs no scipy."""

    def density(t: float) -> float:
        log_c = math.lgamma((df + 1) / 2) - math.lgamma(df / 2) - 0.5 * math.log(df * math.pi)
        return math.exp(log_c - (df + 1) / 2 * math.log1p(t * t / df))

    def mass(x: float, n: int = 1000) -> float:
        h = x / n
        inner = sum((4 if i % 2 else 2) * density(i * h) for i in range(1, n))
        return h / 3 * (density(0.0) + inner + density(x))

    lo, hi = 1.9, 13.0
    for _ in range(30):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if mass(mid) < 0.475 else (lo, mid)
    return (lo + hi) / 2


def test_t_quantile_table_is_students_to_three_decimals():
    for df in range(1, 31):
        assert lab_report.t975(df) == pytest.approx(_t975_by_integration(df), abs=5e-4), df
    assert _t975_by_integration(9) == pytest.approx(2.262157, abs=1e-5)  # the reference itself


def test_identical_zero_differences_never_resolve_as_a_difference():
    """Seeds that all differ by exactly 0: a zero-width interval at 0 excludes nothing, and no number of
    seeds would make it."""
    st = lab_report.paired_stats([0.0, 0.0, 0.0])
    assert (st["lo"], st["hi"]) == (0.0, 0.0) and lab_report.verdict(st) == "no"
    assert lab_report.seeds_to_resolve(st) is None


def test_corpus_top_tokens_pair_each_token_with_its_own_routing(trained):
    """The corpus sample is routed in windows (full ones in batches, the ragged tail alone): each
    token's expert choices stay paired with that token, as routing every window on its own gives."""
    from collections import Counter

    from minimoe.train.checkpoint import load_run

    run, data = trained
    model, tok, _, _ = load_run(run)
    ids = lab_inspect.corpus_ids(str(data), tok, 100)  # 3 windows of 32 and a tail of 4
    stats = lab_inspect.corpus_stats(model, tok, ids, seq_len=32, batch_size=1, top_n=100)
    want = {i: [Counter() for _ in range(4)] for i in (0, 1)}
    for start in range(0, 100, 32):
        window = ids[start : start + 32]
        for i, r in lab_inspect.route_ids(model, torch.tensor([window])).items():
            for t, row in zip(window, r.topk_idx.tolist()):
                for e in row:
                    want[i][e][t] += 1
    for i in (0, 1):
        for e in range(4):
            got = {x["id"]: x["count"] for x in stats["layers"][str(i)]["top_tokens"][e]}
            assert got == dict(want[i][e]), (i, e)


def test_flops_axis_scales_each_run_by_its_own_training_flops_per_token(trained):
    """Against training FLOPs, each run's training and validation points sit at its own tokens x its own
    training FLOPs per token (3 x forward: the backward pass too), not another run's; the training panel
    draws the cross-entropy (the total loss adds terms that differ between variants)."""
    data = lab_plot.load_run_data(trained[0], "a")
    twin = lab_plot.load_run_data(trained[0], "b")
    twin.train_flops_per_token *= 3  # a wider variant
    twin.train = [{**r, "loss": r["ce"] + 0.5} for r in twin.train]  # its aux/z/MTP terms add 0.5
    assert data.train_flops_per_token == pytest.approx(
        flops.training_flops(data.cfg, 1) / flops.tokens_per_step(data.cfg)
    )
    ax_t, ax_v = lab_plot.loss_figure([data, twin], "flops").get_axes()
    for ax, rows in ((ax_t, "train"), (ax_v, "evals")):
        for run, line in zip((data, twin), ax.lines):
            want = [r["tokens"] * run.train_flops_per_token for r in getattr(run, rows)]
            assert list(line.get_xdata()) == pytest.approx(want), (rows, run.label)
            if rows == "train":  # the training panel draws the cross-entropy, not the total loss
                assert list(line.get_ydata()) == [r["ce"] for r in run.train]


def test_figures_order_many_layers_by_number_and_share_one_colour_scale(trained):
    """With 12 layers, heatmap rows and MaxVio lines follow the layer number (not "10" before "2"); the
    heatmap panels share one colour scale (0 to the largest share of any panel); MTP modules are numbered
    from 1; the default steps are the first, middle and last logged ones."""
    data = lab_plot.load_run_data(trained[0], "a")
    assert lab_plot.pick_steps(data, None) == [2, 8, 12]  # loads logged every 2 steps
    data.cfg.model.num_hidden_layers = 12
    rows = []
    for s in (2, 4):
        lf = {str(i): [0.1 * s + 0.01 * i, 0.3, 0.3, 0.3] for i in range(12)}
        rows.append({"step": s, "tokens": 128 * s, "loss": 3.0, "load_frac": lf, "max_vio_mean": 0.1,
                     "max_vio": {str(i): 0.01 * i for i in range(12)}})  # fmt: skip
    data.train = rows
    hm = lab_plot.load_heatmap_figure(data, [2, 4])
    heat = [a for a in hm.get_axes() if a.get_images()]
    for ax, row in zip(heat, rows):
        img = ax.get_images()[0]
        assert img.get_array()[:, 0].tolist() == pytest.approx(
            [row["load_frac"][str(i)][0] for i in range(12)]
        )
        assert img.get_clim() == pytest.approx((0.0, 0.51))  # step 4's largest share, in both panels
        assert [t.get_text() for t in ax.get_yticklabels()] == [str(i) for i in range(12)]
    (ax,) = [a for a in lab_plot.maxvio_figure([data]).get_axes() if a.get_visible()]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"layer {i}" for i in range(12)] + ["mean over layers"]
    assert [line.get_ydata()[-1] for line in ax.lines[:12]] == pytest.approx([0.01 * i for i in range(12)])
    data.cfg.model.num_hidden_layers, data.cfg.model.mtp_depth = 2, 2
    assert [lab_plot.layer_label(data, k) for k in ("1", "2", "3")] == ["layer 1", "MTP 1", "MTP 2"]


def test_load_sweep_reads_paths_clock_and_seeds_as_documented(tmp_path, monkeypatch):
    """Data paths in the file are relative to the file; --data/--val-data relative to the working
    directory; a minutes budget without a clock is wall-clock; repeated seeds are refused."""
    (tmp_path / "sweeps").mkdir()
    (tmp_path / "work").mkdir()
    monkeypatch.chdir(tmp_path / "work")
    f = tmp_path / "sweeps" / "s.yaml"
    f.write_text("variants: {a: []}\nbudget: {minutes: 2}\ndata: d.txt\nval_data: v.txt\n")
    sweep = compare.load_sweep(f)
    assert (sweep.data, sweep.val_data) == (
        str(tmp_path / "sweeps" / "d.txt"),
        str(tmp_path / "sweeps" / "v.txt"),
    )
    assert sweep.clock == "wall"
    sweep = compare.load_sweep(f, data="d2.txt", val_data="v2.txt")
    assert (sweep.data, sweep.val_data) == (
        str(tmp_path / "work" / "d2.txt"),
        str(tmp_path / "work" / "v2.txt"),
    )
    f.write_text("variants: {a: []}\nbudget: {steps: 2}\nseeds: [1, 2, 1]\n")
    with pytest.raises(MinimoeError, match="seeds repeat"):
        compare.load_sweep(f)


def test_run_state_of_a_time_budget_counts_minutes(tmp_path):
    """A run stopped (not out of time) after 5 s of a 1-minute budget is unfinished: it resumes; one
    whose clock reached the budget is done."""
    run = tmp_path / "a" / "seed_1"
    _finished_run(run, 3, [(3, 3.0)])
    meta = run / "checkpoints" / "step_3" / "meta.json"
    meta.write_text(json.dumps({"step": 3, "elapsed_s": 5.0}))
    assert run_state(run, compare.TIME_BUDGET_MAX_STEPS, 1.0) == "partial"
    meta.write_text(json.dumps({"step": 3, "elapsed_s": 60.0}))
    assert run_state(run, compare.TIME_BUDGET_MAX_STEPS, 1.0) == "done"
    meta.write_text("{")  # a checkpoint whose meta cannot be read counts as no checkpoint
    assert run_state(run, compare.TIME_BUDGET_MAX_STEPS, 1.0) == "new"


def test_parallel_scheduling_trains_every_run_and_stops_when_a_worker_is_interrupted(tmp_path, monkeypatch):
    """--jobs 2 (worker processes replaced by threads, training by a stub): a single run to train still
    trains; a worker whose trainer took a stop signal stops the sweep (no later run starts)."""
    import concurrent.futures
    import signal

    monkeypatch.setattr(
        concurrent.futures,
        "ProcessPoolExecutor",
        lambda max_workers, **kw: concurrent.futures.ThreadPoolExecutor(max_workers),
    )
    monkeypatch.setattr(lab_runs, "write_report", lambda *a, **k: tmp_path / "report.md")
    monkeypatch.setattr(
        lab_runs,
        "_train_run",
        lambda kw, level: (
            1.0,
            0.0,
            "interrupted" if Path(kw["run_dir"]).parent.name == "a" else "max_steps",
        ),
    )
    base = json.dumps(TINY + ["model.vocab_size=320"])
    handler, events = signal.getsignal(signal.SIGINT), []
    for variants, raises, want in (
        ("  b: []\n", False, ["start b", "done b"]),
        ("  a: []\n  b: []\n  c: []\n", True, ["start a", "start b", "stopped a", "done b"]),
    ):
        (tmp_path / "s.yaml").write_text(
            f"base:\n  overrides: {base}\nbudget: {{steps: 3}}\nseeds: [1]\nvariants:\n{variants}"
        )
        events.clear()
        try:
            lab_runs.run_sweep(
                compare.load_sweep(tmp_path / "s.yaml"), tmp_path / "out", figures=False, jobs=2,
                on_event=lambda e, r, d: events.append(f"{e} {r.variant}"),
            )  # fmt: skip
            stopped = False
        except KeyboardInterrupt:
            stopped = True
        assert (stopped, sorted(events)) == (raises, sorted(want))
    assert signal.getsignal(signal.SIGINT) is handler  # the sweep's forwarding handler is gone


def test_worker_signals_and_their_forwarding(tmp_path):
    """A worker leaves the terminal's process group and ignores stop signals while idle; the sweep
    notes the first stop signal, raises on the second, and restores its own handlers afterwards."""
    import os
    import signal
    import subprocess
    import sys

    code = (
        "import os, signal\nfrom minimoe.lab.workers import worker_signals\nworker_signals()\n"
        "print(os.getpgrp() == os.getpid(), signal.getsignal(signal.SIGINT) is signal.SIG_IGN,"
        " signal.getsignal(signal.SIGTERM) is signal.SIG_IGN)\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60, env=env
    ).stdout
    assert out.split() == ["True", "True", "True"]
    from minimoe.lab.workers import signals_to_workers

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    stop: list[int] = []
    with signals_to_workers(stop):
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop == [signal.SIGTERM]
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert {s: signal.getsignal(s) for s in before} == before


def _nanogpt_headline():
    import importlib.util

    path = Path(__file__).parents[1] / "experiments" / "nanogpt_headline.py"
    spec = importlib.util.spec_from_file_location("nanogpt_headline", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_nanogpt_baseline_is_gpt2_shaped_and_causal():
    """The plain-nanoGPT baseline has GPT-2's parameters (12 d^2 per layer, learned positions, tied head,
    bias-free LayerNorms), attends only backwards, and follows nanoGPT's warmup-then-cosine schedule."""
    ng = _nanogpt_headline()
    torch.manual_seed(0)
    m = ng.NanoGPT()
    L, d, V, T = 6, 192, 256, ng.WINDOW
    assert sum(p.numel() for p in m.parameters()) == 12 * L * d * d + V * d + T * d + 2 * L * d + d
    x = torch.randint(0, V, (2, T))
    y = x.clone()
    y[:, 70:] = (y[:, 70:] + 1) % V
    with torch.no_grad():
        a, b = m(x), m(y)
    assert torch.equal(a[:, :70], b[:, :70]) and not torch.allclose(a[:, 70:], b[:, 70:])
    lr = [ng.cosine_lr(it, 1e-3, 1e-4, 100, 1100) for it in (0, 99, 100, 600, 1100, 5000)]
    assert lr == pytest.approx([1e-3 / 101, 1e-3 * 100 / 101, 1e-3, 5.5e-4, 1e-4, 1e-4])


def test_nanogpt_headline_scores_each_window_target_once():
    """Both models of the headline are scored by one function: consecutive windows of WINDOW targets, each
    target predicted from the ids before it in its window, a last partial window left out. Checked against a
    loop over every position with a model whose logits depend on the input id and the position in the window."""
    ng = _nanogpt_headline()
    W, V = ng.WINDOW, 11
    g = torch.Generator().manual_seed(3)
    table, pos = torch.randn(V, V, generator=g), torch.randn(W, V, generator=g)
    ids = torch.randint(0, V, (3 * W + 40,), generator=g).numpy()
    got = ng.held_out_nats(lambda x: table[x] + pos[: x.shape[1]], ids, batch=2)
    losses = [
        -torch.log_softmax(table[ids[w * W + p]] + pos[p], -1)[ids[w * W + p + 1]]
        for w in range(3)
        for p in range(W)
    ]
    assert got == pytest.approx(torch.stack(losses).mean().item(), rel=1e-6)


def test_nanogpt_headline_smoke(tmp_path):
    """The headline script end to end on a generated corpus, two steps per run: both models train side by
    side, are scored (on the held-out file's bytes as they are, a document separator written in it
    included), and the paired report, its figure and the resumable results file are written; a second
    call resumes (trains nothing) and reports the same seed; a seed whose runs finished but whose scores
    were lost is scored again, not retrained."""
    import os
    import subprocess
    import sys

    data, val = _corpus(tmp_path / "corpus.txt"), tmp_path / "val.txt"
    val.write_text(data.read_text()[:1500] + "<|endoftext|>" + data.read_text()[1500:3000])
    script = Path(__file__).parents[1] / "experiments" / "nanogpt_headline.py"
    args = [
        sys.executable,
        str(script),
        "--train",
        str(data),
        "--val",
        str(val),
        "--out",
        str(tmp_path / "out"),
    ]
    args += ["--seeds", "1", "--minutes", "1", "--max-steps", "2"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    first = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert first.returncode == 0, first.stderr[-2000:]
    (result,) = [json.loads(line) for line in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert result["nanogpt_tokens"] == 2 * 16 * 128 and result["tiny_tokens"] == 2 * 16 * 128
    assert 1.0 < result["nanogpt"] < 9.0 and 1.0 < result["tiny"] < 9.0  # bits/byte of a barely trained model
    assert (tmp_path / "out" / "nanogpt_headline.png").stat().st_size > 0
    again = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert again.returncode == 0 and "training both" not in again.stdout
    assert f"| 1 | {result['tiny']:.4f} | {result['nanogpt']:.4f} |" in again.stdout
    (tmp_path / "out" / "results.jsonl").unlink()
    rescored = subprocess.run(args, capture_output=True, text=True, env=env, timeout=600)
    assert rescored.returncode == 0 and "training both" not in rescored.stdout
    assert f"| 1 | {result['tiny']:.4f} | {result['nanogpt']:.4f} |" in rescored.stdout


def test_nanogpt_headline_on_more_threads_runs_each_alone_on_a_wall_clock(tmp_path, monkeypatch):
    """With --threads 2 the two runs take turns (the order alternating with the seed), each on two threads
    and a wall-clock budget: minimoe's command says so, nanoGPT's loop sets its threads and times the wall,
    and a results folder holding runs at another thread count is refused rather than mixed."""
    import sys

    ng = _nanogpt_headline()
    moe = ng.minimoe_command(Path("t"), Path("v"), Path("o"), 3, 10.0, None, threads=2)
    assert "train.threads=2" in moe and "train.clock=wall" in moe
    one = ng.minimoe_command(Path("t"), Path("v"), Path("o"), 3, 10.0, None)
    assert "train.threads=1" in one and "train.clock=cpu" in one
    assert ng.waves(["m"], ["g"], 1, 1) == [[["m"], ["g"]]]
    assert ng.waves(["m"], ["g"], 2, 1) == [[["m"]], [["g"]]] and ng.waves(["m"], ["g"], 2, 2) == [
        [["g"]],
        [["m"]],
    ]
    before = torch.get_num_threads()
    seen = []
    monkeypatch.setattr(ng.torch, "set_num_threads", seen.append)
    ng.train_nanogpt(_corpus(tmp_path / "c.txt"), tmp_path / "g", 1, 1.0, max_iters=2, threads=2)
    assert seen == [2] and torch.get_num_threads() == before
    summary = json.loads((tmp_path / "g" / "train.json").read_text())
    assert summary["clock"] == "wall" and summary["threads"] == 2 and summary["steps"] == 2
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "results.jsonl").write_text(json.dumps({"seed": 1, "threads": 1}) + "\n")
    argv = ["x", "--train", str(tmp_path / "c.txt"), "--out", str(tmp_path / "out"), "--threads", "2"]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit, match="another thread count"):
        ng.main()


def test_plan_decides_precision_auto_once_and_pins_it(tmp_path, monkeypatch):
    """train.precision=auto is timed once per device and thread count when the sweep is planned, and every
    run gets the answer as an explicit setting: two runs timing it in their own processes at once (or on a
    busy machine) could decide differently, one training in bf16 and the other in fp32."""
    from minimoe.train import precision as precision_lib

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(precision_lib, "native_bf16", lambda device: True)
    answers = iter([2.0, 0.5, 0.5, 0.5])  # bf16 pays at the first timing only
    timed: list[int] = []
    monkeypatch.setattr(
        precision_lib, "cpu_bf16_speedup", lambda threads: timed.append(threads) or next(answers)
    )
    _corpus(tmp_path / "corpus.txt")
    overrides = TINY + ["train.precision=auto", "train.threads=1"]
    (tmp_path / "s.yaml").write_text(
        "base:\n  overrides: " + json.dumps(overrides) + "\ndata: corpus.txt\nbudget: {steps: 2}\n"
        "seeds: [1, 2]\nvariants:\n  a: []\n  b: [model.n_routed_experts=0]\n"
    )
    runs = compare.plan(compare.load_sweep(tmp_path / "s.yaml"))
    assert timed == [1] and len(runs) == 4
    assert {r.cfg.train.precision for r in runs} == {"bf16"}
    assert all("train.precision=bf16" in r.overrides for r in runs)


def test_plan_prepares_the_data_even_where_the_sweep_sets_the_vocabulary(tmp_path, monkeypatch):
    """The tokenizer's training and the tokenizing happen when the sweep is planned, not inside the first
    run's clock (a time budget would charge them to that run alone), also where model.vocab_size is set
    and no vocabulary needs fitting."""
    from minimoe.train.run import data_cache_dir

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    _corpus(tmp_path / "corpus.txt")
    overrides = TINY + ["model.vocab_size=320"]
    (tmp_path / "s.yaml").write_text(
        "base:\n  overrides: " + json.dumps(overrides) + "\ndata: corpus.txt\nbudget: {steps: 2}\n"
        "seeds: [1]\nvariants:\n  a: []\n"
    )
    (run,) = compare.plan(compare.load_sweep(tmp_path / "s.yaml"))
    cache = Path(data_cache_dir(run.cfg.data, None))
    assert run.cfg.model.vocab_size == 320 and cache.is_dir() and any(cache.iterdir())
