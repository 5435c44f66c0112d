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
    """benchmarks/mtp_chain.py's two chained drafts per verify step: plain greedy decoding's tokens whatever
    the drafts (the module's own on a random model: rejected; the true tokens with every third spoiled: none,
    one or both kept), down to a prompt near the context's end; and every draft the module makes is what
    it gives without a cache over the same inputs (the committed positions' true inputs, and for a second
    draft the first one's output and the first draft one position on)."""
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
    # a final norm that is not all ones (the MTP module reads its output), and attention outputs large enough
    # that the context moves the argmax
    with torch.no_grad():
        model.norm.weight.uniform_(0.5, 1.5)
        for name, w in model.named_parameters():
            if name.endswith("o_proj.weight"):
                w.mul_(8)
    real, calls, state = chain._mtp, [], {}

    def recorded(model, cache, hidden, next_ids, start):
        h, draft = real(model, cache, hidden, next_ids, start)
        second = bool(calls) and hidden is calls[-1]["h"]  # fed the last call's output: a second draft
        calls.append({"h": h, "next": list(next_ids), "start": start, "second": second, "own": draft})
        if state["oracle"]:
            seq, at = state["seq"], start + len(next_ids) + 1  # the position this draft is for
            draft = seq[at] if at < len(seq) else draft
            draft = (draft + 1) % cfg.vocab_size if len(calls) % 3 == 0 else draft
        return h, draft

    monkeypatch.setattr(chain, "_mtp", recorded)
    for state["oracle"], want_kept in ((False, {0}), (True, {0, 1, 2})):
        kept: list[int] = []
        for prompt in ([5, 17, 3], [40, 2, 2, 9, 41, 8], [11], list(range(1, 56))):
            calls.clear()
            seq = state["seq"] = prompt + list(generate_tokens(model, prompt, 64, temperature=0.0))
            got = chain.chained_greedy(model, prompt, 20, kept)
            assert len(got) == min(20, 64 - len(prompt) - 1) and got == seq[len(prompt) :][: len(got)], prompt
            with torch.no_grad():  # each draft against the module without a cache
                main = model.norm(model(torch.tensor([seq])).hidden)  # (1, L, D)
                # positions whose entries are final: each call's positions follow from the ones before
                done = 0
                for i, c in enumerate(calls):
                    end = done + len(c["next"])  # positions [0, end) of the module's input
                    h_in, ids = main[:, :end].clone(), seq[1 : end + 1]
                    if c["second"]:  # one position on from the call before: its output, its draft
                        h_in[:, -1], ids = calls[i - 1]["h"][:, -1], seq[1:end] + c["next"]
                    else:
                        done = end
                    emb = model.embed_tokens(torch.tensor([ids]))
                    h, out, _ = model.mtp[0](h_in, emb, model.rope_cos[:end], model.rope_sin[:end])
                    torch.testing.assert_close(c["h"][0, -1], h[0, -1], msg=f"{prompt} {c['start']}")
                    assert int(model.lm_head(out[0, -1]).argmax()) == c["own"], (prompt, c["start"])
        assert want_kept <= set(kept), kept


def test_engine_decode_choices_section_prefills_once_and_once_per_choice(script, monkeypatch, tmp_path):
    """benchmarks/engine_decode.py's `choices` section: the shared turns prefill each request's prompt
    once, the separate turns once per choice (the sharing rule switched off, and back on after), and
    both give the same texts."""
    import torch

    from minimoe.config import ModelConfig
    from minimoe.data import Tokenizer
    from minimoe.infer.slots import Prefill
    from minimoe.model.transformer import Transformer

    engine_decode = script("engine_decode")
    rule = engine_decode.engine_module._shares_prefill
    cfg = ModelConfig(
        vocab_size=258, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=96,
        intermediate_size=48, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=16,
    )  # fmt: skip
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    text = tmp_path / "heldout.txt"
    text.write_text("Once upon a time a little dog ran to the red ball in the park. " * 40)
    adds = []
    add = Prefill.add
    monkeypatch.setattr(
        Prefill, "add", lambda self, ids, score=None: adds.append(len(ids)) or add(self, ids, score)
    )
    report = engine_decode.section_choices(model, Tokenizer.byte(), "random", str(text), quick=True)
    rows = [line for line in report.splitlines() if line.startswith("| 8 ") or line.startswith("| 32 ")]
    assert len(rows) == 3 and all(row.endswith("| yes |") for row in rows)
    # two turns each way per row: 1 + n prefills per pair of turns
    assert len(adds) == 2 * ((1 + 8) + (1 + 8) + (1 + 32))
    assert engine_decode.engine_module._shares_prefill is rule
