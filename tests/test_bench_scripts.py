"""The scripts in benchmarks/: what their reports say, and that what they cannot run (a run or a text that
is not there, as on a fresh clone) ends in one sentence, not a traceback.

Correctness only: no test here asserts a timing."""

from __future__ import annotations

import importlib
import subprocess
import sys
from argparse import Namespace
from dataclasses import replace
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def script(monkeypatch):
    """Import benchmarks/NAME.py as a module, the folder on sys.path as the scripts import each other."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    return importlib.import_module


def _refusal(argv: list[str]) -> str:
    """Run a benchmark script that should refuse; its one-line message."""
    proc = subprocess.run([sys.executable, *argv], capture_output=True, text=True, timeout=60)
    err = proc.stderr.strip()
    assert proc.returncode != 0 and "Traceback" not in err and err.count("\n") == 0, err
    return err


def test_decode_cache_table_names_the_attention_it_ran(script, monkeypatch):
    """`tiny` is MHA since the preset left MLA: the KV-cache table names the model's own attention."""
    from minimoe.model.transformer import Transformer
    from minimoe.presets import get_preset

    decode = script("decode")
    monkeypatch.setattr(decode, "median_rates", lambda fns, repeats: {"cache": 2.0, "recompute": 1.0})
    assert "`tiny` preset (MHA, " in decode.section_cache(quick=True)
    mla = replace(get_preset("tiny"), attn_type="mla", mtp_depth=0)
    monkeypatch.setattr(
        decode, "random_model", lambda preset, n: Transformer(replace(mla, max_position_embeddings=n))
    )
    assert "`tiny` preset (MLA, " in decode.section_cache(quick=True)


def test_decode_scripts_refuse_a_missing_run_in_one_sentence(script, tmp_path):
    """decode.py and engine_decode.py (which loads through decode.py) with --run-dir naming no run."""
    decode = script("decode")
    args = Namespace(run_dir=str(tmp_path / "none"), quick=True, work_dir=str(tmp_path / "work"))
    with pytest.raises(SystemExit) as e:
        decode.trained_model(args)
    assert "does not exist" in str(e.value.code) and "\n" not in str(e.value.code)


def test_eval_tinystories_refuses_a_missing_run_or_text(tmp_path):
    """Checked before the task folder is written into the run: nothing is made for a run that is not there."""
    run = tmp_path / "run"
    err = _refusal([str(BENCHMARKS / "eval_tinystories.py"), str(run), "--data", str(tmp_path / "none.txt")])
    assert f"the run {run} does not exist" in err and not run.exists()
    run.mkdir()
    err = _refusal([str(BENCHMARKS / "eval_tinystories.py"), str(run), "--data", str(tmp_path / "none.txt")])
    assert "none.txt does not exist" in err and not (run / "eval").exists()


def test_serve_load_refuses_a_missing_run(tmp_path):
    err = _refusal([str(BENCHMARKS / "serve_load.py"), "--run-dir", str(tmp_path / "none")])
    assert "does not exist" in err


def test_serve_load_stops_when_the_server_exits_before_it_listens(tmp_path):
    """A folder that is not a run: `minimoe serve` refuses it, and the load generator says so at once
    instead of waiting two minutes for an address that never comes."""
    (tmp_path / "empty").mkdir()
    argv = [sys.executable, str(BENCHMARKS / "serve_load.py"), "--run-dir", str(tmp_path / "empty")]
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr
    assert "exited with status 2 before it listened" in proc.stderr


def test_hf_continuous_settings_are_spelled_as_the_workers_read_them(script):
    """ "unset" stays lowercase (fair.omp_env leaves the variable out for it; "UNSET" would reach libgomp as
    an invalid value); a setting that is not POLICY/THREADS is one sentence."""
    from minimoe.bench.fair import omp_env

    hf_continuous = script("hf_continuous")
    settings = hf_continuous.parse_settings("unset/1, passive/2,ACTIVE/1")
    assert settings == [("unset", 1), ("PASSIVE", 2), ("ACTIVE", 1)]
    assert "OMP_WAIT_POLICY" not in omp_env(*settings[0])
    for bad in ("ACTIVE", "fast/1", "PASSIVE/0", "PASSIVE/x"):
        with pytest.raises(SystemExit, match="is not POLICY/THREADS"):
            hf_continuous.parse_settings(bad)


def test_omp_policy_calls_the_machine_shared_only_when_it_was(script):
    omp_policy = script("omp_policy")
    assert "**The machine was shared**" in omp_policy.load_sentence(3.0, 4.0)
    idle = omp_policy.load_sentence(0.0, 2.0)
    assert "shared" not in idle and "idle at the start" in idle


def test_autocast_parts_names_the_moe_layer_it_ran(script):
    """The MoE row's label comes from the preset measured, not from `tiny`'s shape."""
    from minimoe.presets import get_preset

    autocast_parts = script("autocast_parts")
    tiny, small = get_preset("tiny"), get_preset("small")
    assert autocast_parts.moe_name(tiny) == (
        f"MoE layer ({tiny.n_routed_experts} x {tiny.moe_intermediate_size} top-{tiny.num_experts_per_tok}"
        f" + {tiny.n_shared_experts} shared)"
    )
    assert autocast_parts.moe_name(small) != autocast_parts.moe_name(tiny)


def test_text_stream_benchmark_streams_agree(script):
    """The benchmark's whole-list stream (the old behaviour) and `TextStream` give the same text."""
    from minimoe.data import Tokenizer

    text_stream = script("text_stream")
    tok = Tokenizer.byte()
    ids = tok.encode("naïve café 日本 " * 20)
    _, old = text_stream.per_push_us(text_stream.WholeListStream, tok.decode, ids)
    _, new = text_stream.per_push_us(text_stream.TextStream, tok.decode, ids)
    assert old == new == tok.decode(ids)


def test_mtp_chain_prototype_decodes_what_plain_greedy_decodes(script, monkeypatch):
    """benchmarks/mtp_chain.py's two chained drafts per verify step give plain greedy decoding's tokens
    whatever the drafts: a random model (drafts rejected), one whose blocks are identities so that every
    draft is right (both kept at every verify), the same with every other second draft spoiled (one
    kept), and a prompt near the context's end (two positions kept for the drafts)."""
    import torch

    from minimoe.config import ModelConfig
    from minimoe.infer.generate import generate_tokens
    from minimoe.model.transformer import Transformer

    chain = script("mtp_chain")
    cfg = ModelConfig(
        vocab_size=61, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=64,
        kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8, intermediate_size=48,
        n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, mtp_depth=1,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).double().eval()
    prompts = [[5, 17, 3], [40, 2, 2, 9, 41, 8], [11], list(range(1, 56))]

    def kept_by_verify(model) -> set[int]:
        kept: list[int] = []
        for p in prompts:
            got = chain.chained_greedy(model, p, 20, kept)
            want = list(generate_tokens(model, p, 20, temperature=0.0))
            assert len(got) == min(20, 64 - len(p) - 2) and got == want[: len(got)], p
        return set(kept)

    assert 0 in kept_by_verify(model)
    with torch.no_grad():  # every block the identity: each position predicts what its token alone says
        for name, w in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                w.zero_()
        eh = model.mtp[0].eh_proj.weight  # the MTP module's input: the embedding's half alone
        eh.zero_()
        eh[:, : cfg.hidden_size] = torch.eye(cfg.hidden_size, dtype=eh.dtype)
    assert kept_by_verify(model) == {2}
    real, calls = chain._mtp, []

    def spoil_every_other_second_draft(model, cache, hidden, next_ids, start):
        h, draft = real(model, cache, hidden, next_ids, start)
        # a second draft: one token past the prompt's call (every verify here keeps a first draft, so the
        # calls after one have two or three tokens)
        if start and len(next_ids) == 1:
            calls.append(1)
            draft = (draft + len(calls) % 2) % cfg.vocab_size
        return h, draft

    monkeypatch.setattr(chain, "_mtp", spoil_every_other_second_draft)
    assert kept_by_verify(model) == {1, 2}
