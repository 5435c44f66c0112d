"""Evaluation at its edges: perplexity's --limit and folder totals, the context/continuation token
split when a BPE merge crosses the boundary, an empty continuation, generation seeds and per-file
references, when final-answer accuracy is reported, and lm-eval's top_k and stop strings."""

from __future__ import annotations

import math

import pytest
from test_eval import random_model, unigram_model, write_jsonl

from minimoe.data import Tokenizer, train_bpe
from minimoe.eval import metrics
from minimoe.eval.perplexity import evaluate_perplexity
from minimoe.eval.scoring import Score, encode_pair, score_pairs, token_logprobs
from minimoe.eval.tasks import evaluate_generation, generate_until


def test_perplexity_limit_scores_exactly_the_first_documents(tmp_path):
    model, tok = random_model(), Tokenizer.byte()
    docs = ["first doc", "second one", "third"]
    (tmp_path / "d.txt").write_text("\n<|endoftext|>\n".join(docs))
    res = evaluate_perplexity(model, tok, tmp_path / "d.txt", limit=1)
    ids = [tok.eos_id, *tok.encode(docs[0])]
    nll = -token_logprobs(model, ids).sum().item()  # slow reference: one plain forward pass
    assert (res["n"], res["tokens"], res["bytes"]) == (1, len(docs[0]), len(docs[0]))
    assert res["loss"] == pytest.approx(nll / len(docs[0]), rel=1e-5)
    assert evaluate_perplexity(model, tok, tmp_path / "d.txt", limit=2)["n"] == 2


def test_folder_totals_add_up_the_files(tmp_path):
    model, tok = random_model(), Tokenizer.byte()
    (tmp_path / "f").mkdir()
    (tmp_path / "f/a.txt").write_text("héllo wörld")  # 13 UTF-8 bytes, 11 characters
    (tmp_path / "f/b.txt").write_text("plain text here")
    res = evaluate_perplexity(model, tok, tmp_path / "f")
    per = res["per_file"]
    nll = sum(p["loss"] * p["tokens"] for p in per.values())
    assert res["bytes"] == 13 + 15 == sum(p["bytes"] for p in per.values())
    assert res["tokens"] == sum(p["tokens"] for p in per.values()) and res["n"] == 2
    assert res["bits_per_byte"] == pytest.approx(nll / math.log(2) / 28, rel=1e-6)


def test_encode_pair_keeps_the_contexts_own_tokens_when_a_merge_crosses_the_boundary():
    from lm_eval.api.model import TemplateLM
    from test_eval import _LmEvalTokenizerShim

    words = "the cat sat on the mat and the dog ran to the red ball while a bird sang Paris is nice".split()
    tok = train_bpe([" ".join(words * 20)], 300)
    for ctx, cont in [("Par", "is nice"), ("the ca", "t sat")]:
        c, k = encode_pair(tok, ctx, cont)
        assert tok.encode(ctx + cont)[: len(c)] != c  # the merge crosses the boundary
        assert c == tok.encode(ctx) and (c, k) == tuple(
            TemplateLM._encode_pair(_LmEvalTokenizerShim(tok), ctx, cont)
        )


def test_an_empty_continuation_scores_log_one_and_is_greedy():
    assert score_pairs(random_model(), [([1, 2], []), ([3], [4])])[0] == Score(0.0, True, 0)


def test_generation_example_i_samples_with_seed_plus_i(tmp_path):
    model, tok = random_model(), Tokenizer.byte()
    data = write_jsonl(tmp_path / "g.jsonl", [{"prompt": "Hi", "reference": "x"}] * 3)
    got = []
    evaluate_generation(
        model, tok, data, max_new_tokens=6, temperature=1.0, seed=5, on_prediction=lambda r, t: got.append(t)
    )
    want = [generate_until(model, tok, "Hi", 6, (), 1.0, 0, 1.0, seed=5 + i) for i in range(3)]
    assert got == want and len(set(want)) > 1  # same prompt, different samples


def test_generation_per_file_uses_each_files_own_references(tmp_path):
    model, _ = unigram_model({ord("a"): 5.0})  # greedily writes "aaaa"
    write_jsonl(tmp_path / "f/one.jsonl", [{"prompt": "p", "reference": "aaaa"}])
    write_jsonl(tmp_path / "f/two.jsonl", [{"prompt": "p", "reference": "bbbb"}])
    res = evaluate_generation(model, Tokenizer.byte(), tmp_path / "f", max_new_tokens=4)
    assert res["per_file"]["one.jsonl"]["exact_match"] == 1.0
    assert res["per_file"]["two.jsonl"]["exact_match"] == 0.0 and res["exact_match"] == 0.5


def test_answer_accuracy_needs_every_reference_marked_and_bleu_fills_with_the_first_reference():
    assert "answer_accuracy" not in metrics.generation_metrics(["18", "3"], [["#### 18"], ["three"]])
    assert "answer_accuracy" not in metrics.generation_metrics(["18"], [["#### 18", "eighteen"]])
    import sacrebleu

    hyps = ["the cat sat on the mat", "x y"]
    got = metrics.bleu(hyps, [["the cat sat on the mat", "the cat sat on a mat"], ["a b c d"]])
    want = sacrebleu.corpus_bleu(
        hyps, [["the cat sat on the mat", "a b c d"], ["the cat sat on a mat", "a b c d"]]
    )
    assert got["bleu"] == pytest.approx(want.score) and got["bleu_brevity_penalty"] == pytest.approx(want.bp)
    assert want.bp < 1  # an empty filler reference would be "closest" to "x y" and hide the penalty


def test_lm_eval_generation_honours_top_k_and_every_until_string():
    from types import SimpleNamespace

    from test_eval import UNIGRAM_PREFS

    from minimoe.eval.lm_eval import MinimoeLM

    tok, model = Tokenizer.byte(), random_model()
    lm = MinimoeLM(model=model, tokenizer=tok, max_length=32)
    greedy = generate_until(model, tok, "the", 8, (), 0.0)
    assert generate_until(model, tok, "the", 8, (), 1.0, seed=0) != greedy
    top1 = {"until": [], "max_gen_toks": 8, "do_sample": True, "temperature": 1.0, "top_k": 1}
    assert lm.generate_until([SimpleNamespace(args=("the", top1))]) == [greedy]  # top-1 sampling is greedy
    uni, _ = unigram_model(UNIGRAM_PREFS)  # writes "aaaa..."
    lm = MinimoeLM(model=uni, tokenizer=tok, max_length=32)
    req = SimpleNamespace(args=("x", {"until": ["zz", "aaa"], "max_gen_toks": 6}))
    assert lm.generate_until([req]) == [""]  # the second stop string cuts too
