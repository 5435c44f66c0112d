"""Evaluation: continuation scoring, sliding-window perplexity, multiple choice, minimal pairs,
generation metrics, the `minimoe eval` CLI and the lm-evaluation-harness adapter."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from minimoe.cli.main import main
from minimoe.config import ModelConfig, RunConfig, TrainConfig
from minimoe.data import Tokenizer, train_bpe
from minimoe.data.chat_template import SFT_CHAT_TEMPLATE
from minimoe.errors import MinimoeError
from minimoe.eval import metrics
from minimoe.eval.perplexity import evaluate_perplexity, rolling_windows, window_pairs
from minimoe.eval.scoring import encode_pair, score_pairs, token_logprobs
from minimoe.eval.tasks import evaluate_minimal_pairs, evaluate_multiple_choice
from minimoe.model.transformer import Transformer
from minimoe.train.checkpoint import save_checkpoint
from tiny import TINY_TRAIN

V = 320  # 258 byte tokens rounded up to 64, as training does
UNIGRAM_PREFS = {ord("a"): 4.0, ord("b"): 2.0, ord("z"): -3.0, ord("\n"): 1.0}


def tiny_cfg(**kw) -> ModelConfig:
    base = dict(
        vocab_size=V, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, kv_lora_rank=16, qk_nope_head_dim=8,
        qk_rope_head_dim=8, v_head_dim=8, intermediate_size=64, moe_intermediate_size=16,
        n_routed_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
    )  # fmt: skip
    base.update(kw)
    return ModelConfig(**base)


def random_model(seed: int = 0, **kw) -> Transformer:
    torch.manual_seed(seed)
    model = Transformer(tiny_cfg(**kw)).eval()
    with torch.no_grad():  # larger weights than the init, so log-probs differ clearly between tokens
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.3)
    return model


def unigram_model(prefs: dict[int, float]) -> tuple[Transformer, torch.Tensor]:
    """A Transformer that ignores its input: every block's output projections are zero, so the last
    hidden state is the token embedding, and every token has the same embedding e_0. The logits are
    then lm_head[:, 0] * norm(e_0)[0] at every position: a unigram model with known log-probs.

    Returns:
        (model, (V,) log-probabilities of the next token at any position).
    """
    model = Transformer(tiny_cfg()).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "down_proj")):
                p.zero_()
        model.embed_tokens.weight.zero_()
        model.embed_tokens.weight[:, 0] = 1.0
        model.lm_head.weight.zero_()
        for t, v in prefs.items():
            model.lm_head.weight[t, 0] = v
        h0 = model.norm(model.embed_tokens.weight[:1])[0, 0]
        logp = F.log_softmax((model.lm_head.weight[:, 0] * h0).double(), dim=-1)
    return model, logp


def save_run(model: Transformer, run_dir: Path, step: int = 7, tokenizer: Tokenizer | None = None) -> Path:
    cfg = RunConfig(model=model.cfg, train=TrainConfig(seq_len=32))
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(text)
    meta = {"step": step, "tokens": 0, "val_loss": None}
    save_checkpoint(run_dir, step, model, {}, meta, text, tokenizer or Tokenizer.byte(), is_best=True)
    return run_dir


def write_jsonl(path: Path, rows: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def cli_json(capsys, *argv) -> dict:
    assert main(["eval", *map(str, argv), "--json", "--no-progress"]) == 0
    out = capsys.readouterr().out
    return json.loads(out)


def cli_error(capsys, *argv) -> str:
    assert main(["eval", *map(str, argv), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


# ---------------------------------------------------------------------- scoring


class _LmEvalTokenizerShim:
    """Just enough of a TemplateLM for lm_eval's own _encode_pair to run on our tokenizer."""

    backend = "causal"

    def __init__(self, tok):
        self.tok = tok

    def tok_encode(self, s, add_special_tokens=None):
        return self.tok.encode(s)


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_encode_pair_splits_like_lm_eval(kind):
    from lm_eval.api.model import TemplateLM

    words = "the cat sat on the mat and the dog ran to the red ball while a bird sang Paris is nice".split()
    tok = Tokenizer.byte() if kind == "byte" else train_bpe([" ".join(words * 20)], 300)
    shim = _LmEvalTokenizerShim(tok)
    cases = [("The cat sat on the ", "mat"), ("Paris is", " nice"), ("a  \n", "b c"), ("the", " red ball")]
    for ctx, cont in cases:
        assert encode_pair(tok, ctx, cont) == tuple(TemplateLM._encode_pair(shim, ctx, cont))
    ctx_ids, cont_ids = encode_pair(tok, "Paris is ", "nice")
    assert tok.decode(cont_ids) == " nice" and tok.decode(ctx_ids) == "Paris is"
    assert encode_pair(tok, "", "hi") == ([tok.eos_id], tok.encode("hi"))  # empty context: end-of-text


def test_continuation_loglik_equals_plain_forward():
    model = random_model()
    tok = Tokenizer.byte()
    g = torch.Generator().manual_seed(1)
    pairs = []
    for n_ctx, n_cont in [(1, 1), (5, 3), (20, 9), (100, 4), (3, 64), (63, 1), (0, 5)]:
        ctx = torch.randint(0, 256, (n_ctx,), generator=g).tolist() or [tok.eos_id]
        pairs.append((ctx, torch.randint(0, 256, (n_cont,), generator=g).tolist()))
    pairs.append(encode_pair(tok, "Once upon a time ", "there was"))
    # the context is cut from the left to fit 64 inputs
    want = [token_logprobs(model, (ctx + cont)[-65:])[-len(cont) :].sum().item() for ctx, cont in pairs]
    for bs in (1, 3, 16):
        scores = score_pairs(model, pairs, batch_size=bs)
        assert [s.logprob for s in scores] == pytest.approx(want, abs=1e-4)
        assert [s.n_tokens for s in scores] == [len(cont) for _, cont in pairs]
    # greedy: a continuation made of the argmax tokens is greedy, another one is not
    ctx = [10, 20, 30]
    x = torch.tensor([ctx])
    best = int(model(x).logits[0, -1].argmax())
    worst = int(model(x).logits[0, -1].argmin())
    assert [s.greedy for s in score_pairs(model, [(ctx, [best]), (ctx, [worst])])] == [True, False]


def test_continuation_longer_than_context_is_an_error():
    from minimoe.errors import MinimoeError

    with pytest.raises(MinimoeError, match="does not fit the model context of 64"):
        score_pairs(random_model(), [([1], list(range(65)))])


# ---------------------------------------------------------------------- perplexity


@pytest.mark.parametrize("n", [1, 5, 16, 17, 40, 48])
@pytest.mark.parametrize("window,stride", [(16, 16), (16, 5), (16, 1), (7, 3)])
def test_rolling_windows_score_each_token_once(n, window, stride):
    wins = rolling_windows(n, window, stride)
    scored = [t for b, e, k in wins for t in range(e - k + 1, e + 1)]
    assert scored == list(range(1, n + 1))
    for b, e, k in wins:
        assert 0 <= b < e and e - b <= window and 1 <= k <= e - b
        if b > 0:  # after the first window every scored token sees >= window - stride tokens of context
            assert e - k + 1 - b >= window - stride


@pytest.mark.parametrize("n", [1, 15, 16, 17, 40])
def test_disjoint_windows_match_lm_eval(n):
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    ids = list(range(100, 100 + n))
    ours = window_pairs(ids, 0, 16, 16)
    theirs = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, 0, 16, 1)]
    assert [(list(a), list(b)) for a, b in theirs] == ours


def test_stride_equal_to_window_is_the_non_overlapping_computation(tmp_path):
    model = random_model()
    tok = Tokenizer.byte()
    text = "".join(chr(97 + (i * 7) % 26) for i in range(128))  # 128 targets = 2 windows of 64
    (tmp_path / "a.txt").write_text(text)
    res = evaluate_perplexity(model, tok, tmp_path / "a.txt", window=64, stride=64)
    ids = torch.tensor([[tok.eos_id, *tok.encode(text)]])  # (1, 129)
    nll = sum(
        F.cross_entropy(model(ids[:, i : i + 64]).logits[0], ids[0, i + 1 : i + 65], reduction="sum").item()
        for i in (0, 64)
    )
    assert res["tokens"] == 128 and res["bytes"] == 128 and res["n"] == 1
    assert res["loss"] == pytest.approx(nll / 128, rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / 128, rel=1e-5)
    # overlapping windows see more context: same tokens, a different loss
    res2 = evaluate_perplexity(model, tok, tmp_path / "a.txt", window=64, stride=16, batch_size=3)
    assert res2["tokens"] == 128 and res2["loss"] != pytest.approx(res["loss"], rel=1e-6)


def test_uniform_model_has_perplexity_vocab_size(tmp_path):
    model = random_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: uniform over the V outputs
    docs = ["Hello there.", "A second, longer document " * 9, "x"]
    (tmp_path / "d.txt").write_text("\n<|endoftext|>\n".join(docs))
    res = evaluate_perplexity(model, Tokenizer.byte(), tmp_path / "d.txt", window=32, stride=8)
    assert res["perplexity"] == pytest.approx(V, rel=1e-5)
    assert res["bits_per_byte"] == pytest.approx(math.log2(V), rel=1e-5)  # ASCII: one byte per token
    assert res["n"] == 3 and res["tokens"] == res["bytes"] == sum(len(d) for d in docs)


# Three documents with 2-, 3- and 4-byte UTF-8 characters, and their UTF-8 bytes counted by hand:
# "naïve café, déjà vu: 東京 and 🙂 " = 6 + 1 + 5 + 1 + 1 + 6 + 1 + 3 + 1 + 6 + 1 + 3 + 1 + 4 + 1 = 41
# (ï é à: 2 bytes; 東 京: 3; 🙂: 4), six times: 246. "plain ascii text here " = 22, five times: 110.
# "Ünïcödé — “quotes” 中文 " = 11 + 1 + 3 + 1 + 3 + 6 + 3 + 1 + 6 + 1 = 36, four times: 144.
MULTIBYTE_DOCS = [
    "naïve café, déjà vu: 東京 and 🙂 " * 6,
    "plain ascii text here " * 5,
    "Ünïcödé — “quotes” 中文 " * 4,
]
MULTIBYTE_BYTES = 246 + 110 + 144


def test_bits_per_byte_with_bpe_counts_utf8_bytes(tmp_path, capsys):
    """With a BPE tokenizer tokens are not bytes: bits per byte is the summed NLL in bits over the
    hand-counted UTF-8 bytes. A uniform model makes the NLL tokens * ln V exactly."""
    assert sum(len(d.encode("utf-8")) for d in MULTIBYTE_DOCS) == MULTIBYTE_BYTES  # the hand count
    tok = train_bpe(MULTIBYTE_DOCS, 300, min_frequency=2)
    n_tokens = sum(len(tok.encode(d)) for d in MULTIBYTE_DOCS)
    assert n_tokens < 0.6 * MULTIBYTE_BYTES  # merges happened: a token count would be far off
    model = random_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0: uniform over the V outputs
    (tmp_path / "held_out.txt").write_text("\n<|endoftext|>\n".join(MULTIBYTE_DOCS), encoding="utf-8")
    run = save_run(model, tmp_path / "run", tokenizer=tok)
    res = cli_json(capsys, run, "--task", "perplexity", "--data", tmp_path / "held_out.txt")
    assert (res["tokens"], res["bytes"], res["n"]) == (n_tokens, MULTIBYTE_BYTES, 3)
    assert res["bits_per_byte"] == pytest.approx(n_tokens * math.log2(V) / MULTIBYTE_BYTES, rel=1e-5)
    assert res["tokens_per_byte"] == pytest.approx(n_tokens / MULTIBYTE_BYTES)


def test_perplexity_sources_and_per_file(tmp_path):
    model, logp = unigram_model({ord("a"): 3.0})
    tok = Tokenizer.byte()
    (tmp_path / "f").mkdir()
    (tmp_path / "f/one.txt").write_text("aaaa")
    (tmp_path / "f/two.txt").write_text("abab")
    (tmp_path / "f/bin.dat").write_bytes(b"\0\1\2")
    res = evaluate_perplexity(model, tok, tmp_path / "f")
    a, b = logp[ord("a")].item(), logp[ord("b")].item()
    assert res["per_file"]["one.txt"]["loss"] == pytest.approx(-a, abs=1e-5)
    assert res["per_file"]["two.txt"]["loss"] == pytest.approx(-(a + b) / 2, abs=1e-5)
    assert res["loss"] == pytest.approx(-(6 * a + 2 * b) / 8, abs=1e-5)
    assert res["skipped"] == ["bin.dat"] and res["n"] == 2
    write_jsonl(tmp_path / "t.jsonl", [{"body": "aaaa"}, {"body": "abab"}])
    res2 = evaluate_perplexity(model, tok, tmp_path / "t.jsonl", text_field="body")
    assert res2["loss"] == pytest.approx(res["loss"], abs=1e-6) and res2["n"] == 2
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    pq.write_table(pa.table({"body": ["aaaa", "abab"]}), tmp_path / "t.parquet")
    res3 = evaluate_perplexity(model, tok, tmp_path / "t.parquet", text_field="body")
    assert res3["loss"] == pytest.approx(res["loss"], abs=1e-6)


def test_perplexity_of_a_folder_scores_record_files_by_their_text_field(tmp_path):
    """A .jsonl file in a folder is scored on its records' text, as when given alone, not its markup."""
    model, _ = unigram_model({ord("a"): 3.0})
    tok = Tokenizer.byte()
    (tmp_path / "f").mkdir()
    write_jsonl(tmp_path / "f" / "r.jsonl", [{"body": "aaaa"}, {"body": "abab"}])
    (tmp_path / "f" / "t.txt").write_text("abba")
    res = evaluate_perplexity(model, tok, tmp_path / "f", text_field="body")
    alone = evaluate_perplexity(model, tok, tmp_path / "f" / "r.jsonl", text_field="body")
    assert res["per_file"]["r.jsonl"]["loss"] == pytest.approx(alone["loss"], abs=1e-6)
    assert (res["per_file"]["r.jsonl"]["bytes"], res["n"], res["bytes"]) == (8, 3, 12)


def test_perplexity_of_a_folder_scores_ordinary_json_files_as_text(tmp_path):
    """A package.json in a folder of code is text, scored as the file's bytes, not refused as bad records."""
    model, _ = unigram_model({ord("a"): 3.0})
    tok = Tokenizer.byte()
    (tmp_path / "f").mkdir()
    package = json.dumps({"name": "a", "private": True}, indent=2)
    (tmp_path / "f" / "package.json").write_text(package)
    (tmp_path / "f" / "m.py").write_text("abba")
    res = evaluate_perplexity(model, tok, tmp_path / "f")
    assert res["per_file"]["package.json"]["bytes"] == len(package)
    assert res["bytes"] == len(package) + 4


# ---------------------------------------------------------------------- tasks


def test_multiple_choice_and_minimal_pairs_with_known_answers(tmp_path):
    A, B, Z = ord("a"), ord("b"), ord("z")
    model, logp = unigram_model({A: 4.0, B: 2.0, Z: -3.0})
    tok = Tokenizer.byte()
    rows = [
        {"context": "pick", "choices": ["zzz", "aaa", "bbb"], "label": 1},  # raw and normalised: aaa
        {"context": "pick", "choices": ["bbbbbbbbbb", "a"], "label": 1},  # raw: a; per char: a
        {"context": "pick", "choices": ["a", "bbb"], "label": 1},  # wrong for every criterion
    ]
    res = evaluate_multiple_choice(model, tok, write_jsonl(tmp_path / "mc.jsonl", rows))
    assert res["n"] == 3 and res["accuracy"] == pytest.approx(2 / 3)
    assert res["accuracy_norm"] == pytest.approx(2 / 3) and res["accuracy_per_byte"] == pytest.approx(2 / 3)
    assert "per_file" not in res
    # the unigram model scores a continuation as the sum of its tokens' log-probs (" " delimiter too)
    got = score_pairs(model, [encode_pair(tok, "pick", " aaa")])[0].logprob
    assert got == pytest.approx((logp[ord(" ")] + 3 * logp[A]).item(), abs=1e-5)

    # per-token normalisation picks differently from the raw sum when lengths differ
    res = evaluate_multiple_choice(
        model,
        tok,
        write_jsonl(tmp_path / "len.jsonl", [{"context": "x", "choices": ["z", "bbbb"], "label": 1}]),
    )
    assert res["accuracy"] == 0.0 and res["accuracy_per_token"] == 1.0 and res["accuracy_norm"] == 1.0

    good_bad = [
        {"sentence_good": "aaa", "sentence_bad": "aza"},
        {"sentence_good": "ab", "sentence_bad": "bb"},
    ]
    folder = tmp_path / "blimp"
    write_jsonl(folder / "p1.jsonl", good_bad)
    write_jsonl(folder / "p2.jsonl", [{"sentence_good": "zz", "sentence_bad": "aa"}])
    res = evaluate_minimal_pairs(model, tok, folder)
    assert res["n"] == 3 and res["accuracy"] == pytest.approx(2 / 3)
    assert res["per_file"] == {"p1.jsonl": {"accuracy": 1.0, "n": 2}, "p2.jsonl": {"accuracy": 0.0, "n": 1}}
    assert res["accuracy_macro"] == pytest.approx(0.5)
    renamed = [{"g": r["sentence_good"], "b": r["sentence_bad"]} for r in good_bad]
    res = evaluate_minimal_pairs(
        model,
        tok,
        write_jsonl(tmp_path / "r.jsonl", renamed),
        fields={"sentence_good": "g", "sentence_bad": "b"},
    )
    assert res["accuracy"] == 1.0


# ---------------------------------------------------------------------- metrics


def test_metrics_match_the_packages():
    import sacrebleu
    from rouge_score import rouge_scorer

    hyps = ["the cat sat on the mat", "a dog ran in the park today", "hello"]
    refs = ["the cat is on the mat", "the dog ran in the park", "hello world"]
    got = metrics.bleu(hyps, [[r] for r in refs])
    assert got["bleu"] == pytest.approx(sacrebleu.corpus_bleu(hyps, [refs]).score)
    assert got["chrf"] == pytest.approx(sacrebleu.corpus_chrf(hyps, [refs]).score)
    # a repeated reference changes nothing, so examples may have different numbers of references
    two = metrics.bleu(hyps, [[refs[0], "a cat on a mat"], [refs[1]], [refs[2]]])
    both = sacrebleu.corpus_bleu(hyps, [refs, ["a cat on a mat", refs[1], refs[2]]]).score
    assert two["bleu"] == pytest.approx(both)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL", "rougeLsum"], use_stemmer=True)
    r = metrics.rouge(hyps, [[x] for x in refs])
    for k in ("rouge1", "rouge2", "rougeL", "rougeLsum"):
        assert r[k] == pytest.approx(sum(scorer.score(t, h)[k].fmeasure for h, t in zip(hyps, refs)) / 3)
    # SQuAD: normalisation drops case, punctuation and articles
    assert metrics.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert metrics.exact_match("the Eiffel Tower.", "Eiffel tower") == 1.0
    assert metrics.exact_match("Eiffel", ["Paris", "Eiffel Tower"]) == 0.0
    # pred "eiffel tower in paris" vs ref "eiffel tower": 2 common, P = 2/4, R = 2/2 -> F1 = 2/3
    assert metrics.token_f1("The Eiffel Tower, in Paris", "Eiffel Tower") == pytest.approx(2 / 3)
    assert metrics.token_f1("x", ["y", "x y"]) == pytest.approx(2 / 3)  # best reference
    assert (
        metrics.token_f1("the", "a") == 1.0 and metrics.token_f1("the", "cat") == 0.0
    )  # empty after normalising


# ---------------------------------------------------------------------- CLI


@pytest.fixture()
def unigram_run(tmp_path) -> Path:
    model, _ = unigram_model(UNIGRAM_PREFS)
    return save_run(model, tmp_path / "run")


def test_cli_perplexity_json_and_results_file(tmp_path, capsys, unigram_run):
    text = tmp_path / "valid.txt"
    text.write_text("ab" * 100)
    res = cli_json(
        capsys, unigram_run, "--task", "perplexity", "--data", text, "--window", 32, "--stride", 16
    )
    for key in (
        "loss",
        "perplexity",
        "bits_per_byte",
        "tokens",
        "bytes",
        "n",
        "data",
        "checkpoint",
        "config",
    ):
        assert key in res, key
    assert res["tokens"] == res["bytes"] == 200 and res["checkpoint"]["step"] == 7
    assert res["settings"]["window"] == 32 and res["settings"]["stride"] == 16
    assert res["perplexity"] == pytest.approx(math.exp(res["loss"]))
    files = list((unigram_run / "eval").glob("perplexity-valid-step7-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text()) == res
    # the table
    out = tmp_path / "r.json"
    assert (
        main(["eval", str(unigram_run), "--task", "perplexity", "--data", str(text), "--out", str(out)]) == 0
    )
    table = capsys.readouterr().out
    assert "bits_per_byte" in table and "perplexity" in table and out.exists()
    # a folder gives per-file results
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs/x.txt").write_text("aaaa")
    (tmp_path / "docs/y.txt").write_text("bbbb")
    res = cli_json(capsys, unigram_run, "--task", "perplexity", "--data", tmp_path / "docs", "--out", out)
    assert set(res["per_file"]) == {"x.txt", "y.txt"} and res["n"] == 2


def test_cli_jsonl_tasks(tmp_path, capsys, unigram_run):
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"ctx": "q", "endings": ["zz", "aa"], "gold": 1}] * 3)
    res = cli_json(
        capsys, unigram_run, "--task", "multiple-choice", "--data", mc, "--field", "context=ctx",
        "--field", "choices=endings", "--field", "label=gold", "--batch-size", 2,
    )  # fmt: skip
    assert res["accuracy"] == 1.0 and res["accuracy_norm"] == 1.0 and res["n"] == 3
    assert len(res["data"]["sha256"]) == 64
    mp = write_jsonl(tmp_path / "mp.jsonl", [{"good": "aab", "bad": "azb"}])
    res = cli_json(
        capsys,
        unigram_run,
        "--task",
        "minimal-pairs",
        "--data",
        mp,
        "--field-good",
        "good",
        "--field-bad",
        "bad",
    )
    assert res["accuracy"] == 1.0 and res["n"] == 1
    # the unigram model greedily writes "aaaa..."; stop at "\n" never fires (it prefers "a")
    gen = write_jsonl(
        tmp_path / "gen.jsonl",
        [{"prompt": "Say a:", "reference": "aaaa"}, {"prompt": "Say b:", "reference": ["bbbb", "aaaa"]}],
    )
    preds = tmp_path / "preds.jsonl"
    res = cli_json(
        capsys,
        unigram_run,
        "--task",
        "generation",
        "--data",
        gen,
        "--max-new-tokens",
        4,
        "--predictions",
        preds,
    )
    assert res["exact_match"] == 1.0 and res["f1"] == 1.0 and res["bleu"] >= 0 and res["rougeL"] == 1.0
    rows = [json.loads(line) for line in preds.read_text().splitlines()]
    assert [r["generation"] for r in rows] == ["aaaa", "aaaa"] and rows[1]["line"] == 2
    res = cli_json(
        capsys, unigram_run, "--task", "generation", "--data", gen, "--max-new-tokens", 6, "--stop", "aaa",
        "--stop", "\\n",
    )  # fmt: skip
    assert res["exact_match"] == 0.0  # generation cut before the stop string: empty
    assert res["settings"]["stop"] == ["aaa", "\n"]  # a shell's "\n" means the newline


def test_cli_failed_generation_keeps_the_previous_predictions(tmp_path, capsys, unigram_run, monkeypatch):
    """--predictions was opened with "w" before the model loaded: a run that failed emptied the previous
    predictions. Rows now go to a temporary file that replaces FILE only when the evaluation succeeds."""
    import minimoe.eval.tasks as tasks

    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Say a:", "reference": "aaaa"}] * 2)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("previous\n")
    calls = []

    def fail_second(*args, **kw):
        calls.append(1)
        if len(calls) == 2:
            raise MinimoeError("the second example failed")
        return "aaaa"

    monkeypatch.setattr(tasks, "generate_until", fail_second)
    argv = [unigram_run, "--task", "generation", "--data", gen, "--max-new-tokens", 4, "--predictions", preds]
    assert "the second example failed" in cli_error(capsys, *argv)
    assert preds.read_text() == "previous\n" and sorted(tmp_path.iterdir()) == [gen, preds, unigram_run]
    monkeypatch.undo()
    cli_json(capsys, *argv)
    assert [json.loads(line)["generation"] for line in preds.read_text().splitlines()] == ["aaaa"] * 2
    assert sorted(tmp_path.iterdir()) == [gen, preds, unigram_run]


def test_cli_predictions_to_a_fifo_or_pipe_are_written_to_it(tmp_path, capsys, unigram_run):
    """A FIFO or /dev/fd/N (a pipe, as /dev/stdout is when piped) is written directly: a temporary file
    renamed onto it would replace the FIFO by a regular file, and cannot sit beside /dev/fd/N at all."""
    import stat

    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Say a:", "reference": "aaaa"}] * 2)
    argv = [unigram_run, "--task", "generation", "--data", gen, "--max-new-tokens", 4, "--predictions"]

    def drain(fd: int) -> list[str]:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        os.close(fd)
        return [json.loads(line)["generation"] for line in b"".join(chunks).decode().splitlines()]

    fifo = tmp_path / "preds.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)  # open now, so opening the FIFO to write never waits
    cli_json(capsys, *argv, fifo)
    assert drain(reader) == ["aaaa"] * 2 and stat.S_ISFIFO(os.stat(fifo).st_mode)
    assert sorted(tmp_path.iterdir()) == [gen, fifo, unigram_run]
    r, w = os.pipe()
    try:
        cli_json(capsys, *argv, f"/dev/fd/{w}")
    finally:
        os.close(w)
    assert drain(r) == ["aaaa"] * 2


def test_cli_predictions_write_failure_is_one_sentence_and_leaves_no_temp_file(
    tmp_path, capsys, unigram_run, monkeypatch
):
    """A failed flush (a full disk, a file size limit) raised again from the cleanup's close(), so a raw OSError
    hid the sentence and the temporary file beside FILE stayed; now it is one sentence and no file."""
    import builtins
    import errno

    import minimoe.cli.eval as cli_eval

    def disk_full():
        raise OSError(errno.ENOSPC, "No space left on device")

    def open_failing(file, mode="r", *args, **kw):
        f = builtins.open(file, mode, *args, **kw)
        if "w" in mode and Path(file).parent == tmp_path:  # the predictions file or its temporary file
            f.flush = disk_full
        return f

    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Say a:", "reference": "aaaa"}] * 2)
    preds = tmp_path / "preds.jsonl"
    preds.write_text("previous\n")
    monkeypatch.setattr(cli_eval, "open", open_failing, raising=False)
    argv = [unigram_run, "--task", "generation", "--data", gen, "--max-new-tokens", 4, "--predictions", preds]
    err = cli_error(capsys, *argv)
    assert (
        err == f"minimoe eval: error: cannot write predictions (no space left on the device holding {preds})"
    )
    assert preds.read_text() == "previous\n" and sorted(tmp_path.iterdir()) == [gen, preds, unigram_run]


def test_cli_predictions_onto_the_task_data_are_refused_before_any_work(
    tmp_path, capsys, unigram_run, monkeypatch
):
    """--predictions equal to --data (or inside a --data folder) replaced the task data with generations;
    it is refused in one sentence before the run loads, and the data stays as it was."""
    import minimoe.eval.runner

    def started(*a, **k):
        raise AssertionError("the evaluation ran before --predictions was checked")

    monkeypatch.setattr(minimoe.eval.runner, "evaluate_run", started)
    gen = write_jsonl(tmp_path / "tasks/gen.jsonl", [{"prompt": "Say a:", "reference": "aaaa"}])
    before = gen.read_text()
    (tmp_path / "link.jsonl").symlink_to(gen)
    for data, preds, message in [
        (gen, gen, "is the --data file itself"),
        (gen, tmp_path / "link.jsonl", "is the --data file itself"),  # a link to it writes the data
        (gen.parent, gen, "is inside the --data folder"),
        (gen.parent, gen.parent / "sub/new.jsonl", "is inside the --data folder"),
    ]:
        err = cli_error(capsys, unigram_run, "--task", "generation", "--data", data, "--predictions", preds)
        assert f"--predictions {preds} {message}" in err
        assert gen.read_text() == before and sorted(gen.parent.iterdir()) == [gen]


@pytest.mark.parametrize(
    "template,prompt,turn_end",
    [
        (None, "user: Say a:\nassistant:", ()),  # a pre-training run: the plain lines serve uses
        (SFT_CHAT_TEMPLATE, "<|user|>\nSay a:<|endoftext|><|assistant|>\n", ()),  # the turn ends at EOS
        # a template closing turns with another special token: generation stops there too
        ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{{ pad_token }}{% endfor %}"
         "{% if add_generation_prompt %}<assistant>{% endif %}", "<user>Say a:<|pad|><assistant>", (257,)),
    ],
)  # fmt: skip
def test_generation_with_chat_asks_each_prompt_as_a_user_turn(
    tmp_path, monkeypatch, template, prompt, turn_end
):
    """`chat=True`: each prompt goes to the model as serve's chat completions would send it (a user turn
    in the run's template, the generation prompt added) and stops at the template's end of turn; without
    it the prompt goes as it is."""
    import minimoe.eval.tasks as tasks

    tok = Tokenizer.byte()
    tok.chat_template = template
    assert tok.special_tokens["<|pad|>"] == tok.pad_id == 257
    asked = []

    def fake_generate(model, tokenizer, text, *args, stop_ids=(), **kw):
        asked.append((text, tuple(stop_ids)))
        return "aaaa"

    monkeypatch.setattr(tasks, "generate_until", fake_generate)
    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Say a:", "reference": "aaaa"}])
    assert tasks.evaluate_generation(None, tok, data, chat=True)["exact_match"] == 1.0
    tasks.evaluate_generation(None, tok, data)
    assert asked == [(prompt, turn_end), ("Say a:", ())]


def test_generate_until_stops_at_the_extra_stop_ids():
    """The end-of-turn ids `chat` adds stop generation as end-of-text does (left out of the text)."""
    from minimoe.eval.tasks import generate_until

    model, _ = unigram_model(UNIGRAM_PREFS)  # greedy: "aaaa..."
    tok = Tokenizer.byte()
    assert generate_until(model, tok, "x", 4) == "aaaa"
    assert generate_until(model, tok, "x", 4, stop_ids=(tok.encode("a")[0],)) == ""


def test_cli_generation_chat_is_recorded_and_only_for_generation(tmp_path, capsys, unigram_run):
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": "Say a:", "reference": "aaaa"}])
    res = cli_json(
        capsys, unigram_run, "--task", "generation", "--data", gen, "--max-new-tokens", 4, "--chat"
    )
    assert res["settings"]["chat"] is True and res["exact_match"] == 1.0
    plain = cli_json(capsys, unigram_run, "--task", "generation", "--data", gen, "--max-new-tokens", 4)
    assert "chat" not in plain["settings"]
    text = tmp_path / "t.txt"
    text.write_text("ab" * 50)
    assert "--chat applies only to --task generation" in cli_error(
        capsys, unigram_run, "--task", "perplexity", "--data", text, "--chat"
    )


def test_cli_trained_model_prefers_the_corpus(tmp_path, capsys, monkeypatch):
    """A model trained for a few steps on one repeated sentence picks it in multiple choice and
    minimal pairs, and reaches a low perplexity on it."""
    from minimoe.train.run import train_from_config

    monkeypatch.setenv("MINIMOE_CACHE", str(tmp_path / "cache"))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("the cat sat on the mat.\n" * 300)
    overrides = [
        *TINY_TRAIN,
        "train.eval_batches=1", "train.max_steps=30", "train.eval_every=30", "train.lr=1e-2",
        f"data.path={corpus}",
    ]  # fmt: skip
    train_from_config(overrides=overrides, run_dir=tmp_path / "run", progress=False)
    run = tmp_path / "run"
    mc = write_jsonl(
        tmp_path / "mc.jsonl",
        [
            {"context": "the cat sat on the", "choices": ["mat.", "qjx!"], "label": 0},
            {"context": "the cat", "choices": ["xyz on", "sat on"], "label": 1},
        ],
    )
    assert cli_json(capsys, run, "--task", "multiple-choice", "--data", mc)["accuracy"] == 1.0
    mp = write_jsonl(
        tmp_path / "mp.jsonl",
        [{"sentence_good": "the cat sat on the mat.", "sentence_bad": "the mat sat on the cat."}],
    )
    assert cli_json(capsys, run, "--task", "minimal-pairs", "--data", mp)["accuracy"] == 1.0
    (tmp_path / "held_out.txt").write_text("the cat sat on the mat.\n" * 4)
    res = cli_json(capsys, run, "--task", "perplexity", "--data", tmp_path / "held_out.txt")
    assert res["bits_per_byte"] < 3.0 and res["tokens"] == 96  # untrained: log2(320) = 8.3


@pytest.mark.parametrize(
    "rows,extra,message",
    [
        (None, [], "is empty"),
        (
            ['{"context": "a", "choices": ["b", "c"], "label": 0}', "{not json"],
            [],
            "line 2 is not valid JSON",
        ),
        ([{"context": "a", "label": 0}], [], "line 1 has no 'choices' field"),
        ([{"context": "a", "endings": ["b", "c"], "label": 0}], [], "--field choices=NAME"),
        ([{"context": "a", "choices": ["b", "c"], "label": 2}], [], "label 2 is not an index"),
        ([{"context": "a", "choices": ["b", ""], "label": 0}], [], "choice 1 is empty"),
        # the run trained on 32 tokens: the default context; 81 tokens fit no context of the model's 64
        (
            [{"context": "a", "choices": ["b", "x" * 40], "label": 0}],
            [],
            "longer than the 32 tokens the model reads",
        ),
        (
            [{"context": "a", "choices": ["b", "x" * 80], "label": 0}],
            ["--context", "64"],
            "longer than the 64 tokens",
        ),
        (
            [{"context": "a", "choices": ["b", "c"], "label": 0}],
            ["--context", "65"],
            "between 1 and the model context (64), got 65",
        ),
        ([{"context": "a", "choices": ["b", "c"], "label": 0}], ["--window", "8"], "--window applies only"),
        ([{"context": "a", "choices": ["b", "c"], "label": 0}], ["--field", "prompt=x"], "does not apply"),
    ],
)
def test_cli_bad_multiple_choice_input(tmp_path, capsys, unigram_run, rows, extra, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(
        "" if rows is None else "\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows)
    )
    err = cli_error(capsys, unigram_run, "--task", "multiple-choice", "--data", path, *extra)
    assert message in err and "Traceback" not in err


def test_no_task_reads_past_the_runs_training_length_unless_asked(tmp_path, capsys, monkeypatch):
    """The run trained on 32 tokens of a 64-position model: multiple choice and minimal pairs score at
    most 32 positions by default (as perplexity's windows and the lm-eval adapter do), so a long context
    loses its start; `--context 64` reads them all. Generation reads the model's context, as `minimoe
    generate` does, so a budget past the training length is no error; `--context` sets it there too."""
    import minimoe.eval.scoring as scoring
    import minimoe.eval.tasks as tasks

    run = save_run(random_model(3), tmp_path / "run")
    read = []
    real_score, real_generate = scoring.score_pairs, tasks.generate_until

    def score_pairs(model, pairs, batch_size=16, max_len=None, on_batch=None):
        read.append(max_len)
        return real_score(model, pairs, batch_size, max_len, on_batch)

    def generate_until(*args, context=None, **kw):
        read.append(context)
        return real_generate(*args, context=context, **kw)

    monkeypatch.setattr(tasks, "score_pairs", score_pairs)
    monkeypatch.setattr(tasks, "generate_until", generate_until)
    long = "the cat sat on the mat and the dog ran to the red ball "  # 55 bytes
    mc = write_jsonl(tmp_path / "mc.jsonl", [{"context": long, "choices": [" a", " b"], "label": 0}])
    mp = write_jsonl(tmp_path / "mp.jsonl", [{"sentence_good": "a cat", "sentence_bad": "cat a"}])
    gen = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": long, "reference": "x"}])
    cases = [("multiple-choice", mc), ("minimal-pairs", mp), ("generation", gen)]
    for task, data in cases:
        cli_json(
            capsys,
            run,
            "--task",
            task,
            "--data",
            data,
            *(["--max-new-tokens", "4"] if task == "generation" else []),
        )
    assert read == [32, 32, None]  # generation: the model's context, as `minimoe generate`
    # with --max-new-tokens past the training length (the default, 64, is the whole context here)
    cli_json(capsys, run, "--task", "generation", "--data", gen, "--max-new-tokens", "40", "--context", "48")
    assert read[-1] == 48
    default = cli_json(capsys, run, "--task", "multiple-choice", "--data", mc)
    whole = cli_json(capsys, run, "--task", "multiple-choice", "--data", mc, "--context", "64")
    assert (
        read[-2:] == [32, 64] and default["settings"]["context"] == 32 and whole["settings"]["context"] == 64
    )


def test_cli_bad_input_other_tasks(tmp_path, capsys, unigram_run):
    long = write_jsonl(tmp_path / "long.jsonl", [{"sentence_good": "a" * 70, "sentence_bad": "b"}])
    assert "line 1: 'sentence_good' is 70 tokens, longer than the 32 tokens the model reads" in cli_error(
        capsys, unigram_run, "--task", "minimal-pairs", "--data", long
    )
    missing = write_jsonl(tmp_path / "m.jsonl", [{"prompt": "x"}])
    assert "has no 'reference' field" in cli_error(
        capsys, unigram_run, "--task", "generation", "--data", missing
    )
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    assert "contains no text" in cli_error(capsys, unigram_run, "--task", "perplexity", "--data", empty)
    assert "does not exist" in cli_error(
        capsys, unigram_run, "--task", "perplexity", "--data", tmp_path / "nope"
    )
    assert "--stride must be between 1 and the window (16)" in cli_error(
        capsys, unigram_run, "--task", "perplexity", "--data", tmp_path / "long.jsonl", "--text-field",
        "sentence_good", "--window", 16, "--stride", 20,
    )  # fmt: skip
    assert "holds no complete checkpoint" in cli_error(
        capsys, tmp_path, "--task", "perplexity", "--data", empty
    )


# ---------------------------------------------------------------------- lm-evaluation-harness


def _lm_eval_tasks(folder: Path, data: Path) -> None:
    mc = {
        "task": "mm_mc", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data / "mc.jsonl")}},
        "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "context",
        "doc_to_choice": "choices", "doc_to_target": "label",
        "metric_list": [{"metric": "acc"}, {"metric": "acc_norm"}],
    }  # fmt: skip
    ppl = {
        "task": "mm_ppl", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data / "text.jsonl")}},
        "test_split": "test", "output_type": "loglikelihood_rolling", "doc_to_text": "",
        "doc_to_target": "{{text}}", "metric_list": [{"metric": "bits_per_byte"}, {"metric": "byte_perplexity"}],
    }  # fmt: skip
    gen = {
        "task": "mm_gen", "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(data / "gen.jsonl")}},
        "test_split": "test", "output_type": "generate_until", "doc_to_text": "{{prompt}}",
        "doc_to_target": "{{reference}}", "generation_kwargs": {"until": ["b"], "max_gen_toks": 5, "do_sample": False},
        "metric_list": [{"metric": "exact_match"}],
    }  # fmt: skip
    folder.mkdir()
    for cfg in (mc, ppl, gen):
        (folder / f"{cfg['task']}.yaml").write_text(yaml.safe_dump(cfg))


def _lm_eval_data(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    mc_rows = [
        {"context": "pick", "choices": ["zzz", "aaa", "bbb"], "label": 1},
        {"context": "pick", "choices": ["bbbbbbbbbb", "a"], "label": 1},
        {"context": "pick", "choices": ["a", "bbb"], "label": 1},
        {"context": "pick", "choices": ["zb", "bz"], "label": 0},
    ]
    write_jsonl(data / "mc.jsonl", mc_rows)
    texts = ["aabba ab", "zzz a b", "a" * 150]  # the last is longer than the 64-token context
    write_jsonl(data / "text.jsonl", [{"text": t} for t in texts])
    # greedy unigram output is "aaaaa"; the stop string "b" never appears, so 5 tokens come back
    write_jsonl(
        data / "gen.jsonl", [{"prompt": "x", "reference": "aaaaa"}, {"prompt": "y", "reference": "bb"}]
    )
    _lm_eval_tasks(tmp_path / "tasks", data)
    return data


def test_lm_eval_adapter_agrees_with_minimoe(tmp_path, unigram_run, monkeypatch):
    """lm_eval's evaluator drives the registered `minimoe` model through all three request types
    (multiple_choice -> loglikelihood, loglikelihood_rolling, generate_until) on local task YAMLs,
    and its numbers equal minimoe's own evaluation of the same data."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import minimoe.eval.lm_eval  # noqa: F401 - registers "minimoe"

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    data = _lm_eval_data(tmp_path)
    # include_defaults=False skips indexing lm_eval's ~15k built-in task files (the CLI test pays that)
    tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    out = lm_eval.simple_evaluate(
        model="minimoe", model_args=f"path={unigram_run}", tasks=["mm_mc", "mm_ppl", "mm_gen"],
        batch_size=3, device="cpu", task_manager=tm,
    )  # fmt: skip
    results = out["results"]
    model, _ = unigram_model(UNIGRAM_PREFS)
    tok = Tokenizer.byte()
    ours = evaluate_multiple_choice(model, tok, data / "mc.jsonl")
    assert results["mm_mc"]["acc,none"] == pytest.approx(ours["accuracy"]) == 0.75
    assert results["mm_mc"]["acc_norm,none"] == pytest.approx(ours["accuracy_norm"])
    # stride = window: lm-eval's disjoint windows, of the run's training length (32)
    ppl = evaluate_perplexity(model, tok, data / "text.jsonl", window=32)
    assert results["mm_ppl"]["bits_per_byte,none"] == pytest.approx(ppl["bits_per_byte"], rel=1e-5)
    assert results["mm_gen"]["exact_match,none"] == pytest.approx(0.5)


def test_lm_eval_generation_reads_at_most_max_length_positions(monkeypatch):
    """generate_until keeps the prompt's last max_length - max_gen_toks tokens, as lm-eval's hf model
    does (and as loglikelihood keeps max_length): the model never reads past max_length positions."""
    from lm_eval.api.instance import Instance

    import minimoe.infer.generate as gen_lib
    from minimoe.eval.lm_eval import MinimoeLM

    fed = []
    real = gen_lib.generate_tokens

    def spy(model, ids, **kw):
        fed.append((len(ids), kw["max_new_tokens"]))
        yield from real(model, ids, **kw)

    monkeypatch.setattr(gen_lib, "generate_tokens", spy)
    lm = MinimoeLM(model=random_model(), tokenizer=Tokenizer.byte(), max_length=16)
    for max_gen_toks in (4, 40):
        request = Instance(
            "generate_until", {}, ("x" * 50, {"until": ["\n"], "max_gen_toks": max_gen_toks}), 0
        )
        lm.generate_until([request], disable_tqdm=True)
    assert fed == [(12, 4), (1, 15)]


@pytest.mark.slow
def test_lm_eval_command_line(tmp_path, unigram_run):
    """`python -m minimoe.eval.lm_eval --model minimoe ...` is lm_eval's own command line with the
    model registered (about 10 s of it is lm_eval indexing its built-in tasks)."""
    _lm_eval_data(tmp_path)
    env = dict(
        os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", HF_DATASETS_CACHE=str(tmp_path / "hf")
    )
    out_dir = tmp_path / "out"
    cmd = [
        sys.executable, "-m", "minimoe.eval.lm_eval", "--model", "minimoe", "--model_args",
        f"path={unigram_run}", "--batch_size", "4", "--tasks", "mm_mc,mm_ppl,mm_gen", "--include_path",
        str(tmp_path / "tasks"), "--output_path", str(out_dir),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result_files = list(out_dir.rglob("results_*.json"))
    assert len(result_files) == 1, proc.stderr[-2000:]
    results = json.loads(result_files[0].read_text())["results"]
    assert results["mm_mc"]["acc,none"] == pytest.approx(0.75)
    assert results["mm_gen"]["exact_match,none"] == pytest.approx(0.5)
    model, _ = unigram_model(UNIGRAM_PREFS)  # what the run holds (the adapter test above checks that)
    ppl = evaluate_perplexity(model, Tokenizer.byte(), tmp_path / "data" / "text.jsonl", window=32)
    assert results["mm_ppl"]["bits_per_byte,none"] == pytest.approx(ppl["bits_per_byte"], rel=1e-5)
    assert "minimoe" in proc.stdout  # lm_eval's results table names the model


def test_lm_eval_bad_model_args_is_one_sentence(tmp_path, unigram_run):
    from minimoe.errors import MinimoeError
    from minimoe.eval.lm_eval import MinimoeLM

    with pytest.raises(MinimoeError, match="unknown minimoe model_args: pretrained"):
        MinimoeLM.create_from_arg_string(f"path={unigram_run},pretrained=x")
    with pytest.raises(MinimoeError, match="needs model_args path=RUN_DIR"):
        MinimoeLM()
    lm = MinimoeLM.create_from_arg_string(f"path={unigram_run}", {"batch_size": "auto", "device": None})
    assert lm.batch_size == 8 and lm.max_length == 32  # the run's train.seq_len


@pytest.mark.slow
def test_exported_model_gives_the_same_numbers_with_lm_eval_hf(tmp_path, monkeypatch):
    """The README's second route: `minimoe export` then lm_eval's own `hf` backend. Per-request
    log-likelihoods equal the `minimoe` adapter's on a model where attention and routing matter."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    import minimoe.eval.lm_eval  # noqa: F401
    from minimoe.hf.export import export_model

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "hf"))
    torch.manual_seed(0)
    model = Transformer(tiny_cfg()).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.1)
    run = save_run(model, tmp_path / "run")
    export_model(model, Tokenizer.byte(), tmp_path / "exported")
    _lm_eval_data(tmp_path)
    resps = {}
    # hf reads max_position_embeddings (64); minimoe would default to the training length (32)
    for name, args in [
        ("minimoe", f"path={run},max_length=64"),
        ("hf", f"pretrained={tmp_path / 'exported'},dtype=float32"),
    ]:
        tm = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
        out = lm_eval.simple_evaluate(
            model=name, model_args=args, tasks=["mm_mc", "mm_ppl"], batch_size=3, device="cpu",
            task_manager=tm, log_samples=True,
        )  # fmt: skip
        # each request's response: [(loglikelihood, is_greedy)] or [loglikelihood] (rolling)
        resps[name] = {
            t: [
                r[0][0] if isinstance(r[0], tuple | list) else r[0]
                for s in out["samples"][t]
                for r in s["resps"]
            ]
            for t in ("mm_mc", "mm_ppl")
        }
    for t in ("mm_mc", "mm_ppl"):
        ours, theirs = resps["minimoe"][t], resps["hf"][t]
        assert len(ours) == len(theirs) == {"mm_mc": 9, "mm_ppl": 3}[t]
        assert ours == pytest.approx(theirs, rel=1e-4, abs=1e-3), t


# ---------------------------------------------------------------------- edges of scoring and tasks


class _MarkedBytes:
    """Byte ids, except that "§" is the end-of-text token (id 300)."""

    eos_id = 300

    def encode(self, s: str) -> list[int]:
        return [self.eos_id if c == "§" else ord(c) for c in s]


def test_empty_context_uses_end_of_text_unless_the_continuation_starts_with_it():
    tok = _MarkedBytes()
    assert encode_pair(tok, "", "hi") == ([300], [104, 105])
    assert encode_pair(tok, "  ", "hi") == ([300], [32, 32, 104, 105])  # whitespace-only context
    assert encode_pair(tok, "", "§hi") == ([300], [104, 105])  # not scored twice


def test_choice_normalisations_divide_by_chars_bytes_and_tokens():
    """acc_norm divides by characters, acc_bytes by UTF-8 bytes, per token by tokens: on choices where
    the three disagree, each picks its own answer."""
    from minimoe.eval.tasks import choice_correct

    # per char: -2 vs -1.25 (choice 1); per byte: -1 vs -1.25 (choice 0); per token: -3 vs -5 (choice 0)
    got = choice_correct([-6.0, -5.0], [2, 1], ["ééé", "abcd"], label=1)
    assert got == {
        "accuracy": 1.0,
        "accuracy_norm": 1.0,
        "accuracy_per_byte": 0.0,
        "accuracy_per_token": 0.0,
    }


def test_join_choice_adds_the_delimiter_only_between_non_space_edges():
    from minimoe.eval.tasks import join_choice

    assert join_choice("Q:", "A") == " A"
    assert join_choice("Q:", " A") == " A"  # the choice brings its own space
    assert join_choice("Q: ", "A") == "A"
    assert join_choice("", "A") == "A"
    assert join_choice("Q:", "A", delimiter="\n") == "\nA"


def test_minimal_pair_ties_count_as_wrong_and_stderr_uses_n_minus_1(tmp_path):
    """The good sentence must score strictly higher (a tie is a miss), and accuracy_stderr is the
    sample standard deviation over sqrt(n)."""
    from minimoe.eval.tasks import stderr_of_mean

    model, _ = unigram_model({ord("a"): 4.0, ord("b"): 2.0})
    rows = [
        {"sentence_good": "ab", "sentence_bad": "ba"},  # same tokens: equal under a unigram model
        {"sentence_good": "aa", "sentence_bad": "bb"},
        {"sentence_good": "aa", "sentence_bad": "ab"},
    ]
    res = evaluate_minimal_pairs(model, Tokenizer.byte(), write_jsonl(tmp_path / "p.jsonl", rows))
    assert res["accuracy"] == pytest.approx(2 / 3)
    want = math.sqrt(((0 - 2 / 3) ** 2 + 2 * (1 - 2 / 3) ** 2) / 2) / math.sqrt(3)
    assert res["accuracy_stderr"] == pytest.approx(want)
    assert stderr_of_mean([1.0, 2.0, 4.0]) == pytest.approx(math.sqrt(7 / 3) / math.sqrt(3))


def test_generate_until_cuts_at_the_earliest_stop_and_fits_the_prompt(monkeypatch):
    """Stops that complete on the same token: the text ends before the one that starts first. A long
    prompt keeps its last context - max_new_tokens tokens."""
    import minimoe.infer.generate as gen
    from minimoe.eval.tasks import generate_until

    tok = Tokenizer.byte()
    model = random_model()
    seen = []

    def fake(model, ids, max_new_tokens, **kw):
        seen.append(list(ids))
        yield from tok.encode("one two three four")[:max_new_tokens]

    monkeypatch.setattr(gen, "generate_tokens", fake)
    assert generate_until(model, tok, "go", 30, stop=["e", "two th"]) == "on"
    assert generate_until(model, tok, "go", 30, stop=["ee", "two three"]) == "one "
    assert generate_until(model, tok, "go", 30, stop=["zzz"]) == "one two three four"
    prompt = "".join(chr(97 + i % 26) for i in range(100))
    generate_until(model, tok, prompt, 10)
    assert seen[-1] == tok.encode(prompt)[-(64 - 10) :]


def test_lm_eval_adapter_requests_directly():
    """The adapter's three request types against minimoe's own scoring and generation: loglikelihood
    returns (sum of log-probs, is greedy); rolling sums lm-eval's disjoint windows; generate_until
    takes `until` as one string or a list and decodes greedily unless do_sample."""
    from types import SimpleNamespace

    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from minimoe.eval.lm_eval import MinimoeLM
    from minimoe.eval.tasks import generate_until

    req = lambda *args: SimpleNamespace(args=args)  # noqa: E731
    tok = Tokenizer.byte()
    uni, _ = unigram_model(UNIGRAM_PREFS)
    lm = MinimoeLM(model=uni, tokenizer=tok, batch_size=2)
    got = lm.loglikelihood([req("pick", "a"), req("pick", "b"), req("pick", " aa")])
    want = score_pairs(uni, [encode_pair(tok, "pick", c) for c in ("a", "b", " aa")])
    assert got == [(s.logprob, s.greedy) for s in want]
    assert [g for _, g in got] == [True, False, False]
    out = lm.generate_until([req("x", {"until": "ab", "max_gen_toks": 5}), req("x", {"until": ["a"]})])
    assert out == ["aaaaa", ""]
    # `max_gen_toks: null` in a task's generation_kwargs means the model's default, as absent does
    short = MinimoeLM(model=uni, tokenizer=tok, max_gen_toks=3)
    assert short.generate_until([req("x", {"until": ["b"], "max_gen_toks": None})]) == ["aaa"]

    model = random_model()
    lm = MinimoeLM(model=model, tokenizer=tok, batch_size=3, max_length=16)
    text = "the cat sat on the mat and the dog ran"
    ids = tok.encode(text)
    windows = [make_disjoint_window(w) for w in get_rolling_token_windows(ids, tok.eos_id, 16, 1)]
    want = sum(token_logprobs(model, list(c) + list(p))[-len(p) :].sum().item() for c, p in windows)
    assert lm.loglikelihood_rolling([req(text)]) == [pytest.approx(want, abs=1e-4)]
    kw = {"until": [], "max_gen_toks": 8, "temperature": 1.0}
    greedy = generate_until(model, tok, "the", 8, (), 0.0)
    assert lm.generate_until([req("the", {**kw, "do_sample": False})]) == [greedy]
    sampled = generate_until(model, tok, "the", 8, (), 1.0, seed=0)
    assert sampled != greedy
    assert lm.generate_until([req("the", {**kw, "do_sample": True})]) == [sampled]


def test_lm_eval_repeats_draw_different_samples_and_greedy_reads_its_temperature(caplog):
    """lm-eval hands a task's `repeats` (GSM8K self-consistency: 64) over as copies of one request:
    sampled, they must not all be the same draw. Request i samples as minimoe's own generation task
    does with seed + i. A greedy request's `temperature: 0.0` (GSM8K's generation_kwargs) is read, not
    reported as an ignored argument."""
    from types import SimpleNamespace

    from minimoe.eval.lm_eval import MinimoeLM
    from minimoe.eval.tasks import generate_until

    tok = Tokenizer.byte()
    model = random_model()
    lm = MinimoeLM(model=model, tokenizer=tok, max_length=32)
    req = SimpleNamespace(
        args=("the", {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0})
    )
    got = lm.generate_until([req] * 4, disable_tqdm=True)
    assert got == [generate_until(model, tok, "the", 8, (), 1.0, seed=i) for i in range(4)]
    assert len(set(got)) > 1
    gsm8k = {"until": ["\n"], "max_gen_toks": 8, "do_sample": False, "temperature": 0.0}
    greedy = SimpleNamespace(args=("the", gsm8k))
    with caplog.at_level("WARNING", logger="minimoe.eval.lm_eval"):
        assert lm.generate_until([greedy], disable_tqdm=True) == [
            generate_until(model, tok, "the", 8, ["\n"])
        ]
    assert "ignores" not in caplog.text
