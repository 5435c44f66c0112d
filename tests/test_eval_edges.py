"""Evaluation at its edges: perplexity's --limit and folder totals, the context/continuation token
split when a BPE merge crosses the boundary, an empty continuation, generation seeds and per-file
references, when final-answer accuracy is reported, and lm-eval's top_k and stop strings; the default
window and stride, documents streamed in rounds, log-softmax chunks, greedy ties, choice ties and
acc_norm's normaliser, minimal pairs' totals, and lm-eval's context cut, request order and empty
continuation; the hidden files and folders a task folder leaves out."""

from __future__ import annotations

import math

import pytest
from test_eval import random_model, unigram_model, write_jsonl

from minimoe.data import Tokenizer, train_bpe
from minimoe.eval import metrics
from minimoe.eval.perplexity import evaluate_perplexity
from minimoe.eval.scoring import Score, encode_pair, score_pairs, token_logprobs
from minimoe.eval.tasks import evaluate_generation, generate_until, load_records, task_files


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


def test_perplexity_defaults_to_one_window_of_the_model_context_without_overlap(tmp_path):
    model, tok = random_model(), Tokenizer.byte()
    (tmp_path / "a.txt").write_text("".join(chr(97 + (i * 5) % 26) for i in range(150)))
    res = evaluate_perplexity(model, tok, tmp_path / "a.txt")
    assert (res["window"], res["stride"]) == (64, 64)  # the model context, no overlap
    explicit = evaluate_perplexity(model, tok, tmp_path / "a.txt", window=64, stride=64)
    assert res["loss"] == pytest.approx(explicit["loss"], rel=1e-6)


def test_score_pairs_splits_the_log_softmax_into_chunks_without_mixing_rows(monkeypatch):
    """A chunk of 3 rows at a time (LOGITS_PER_CHUNK) gives the same scores and greedy flags."""
    import torch

    from minimoe.eval import scoring

    model = random_model()
    ctx, greedy = [10, 20, 30], []
    for _ in range(4):  # a continuation of argmax tokens: greedy
        greedy.append(int(model(torch.tensor([ctx + greedy])).logits[0, -1].argmax()))
    pairs = [([1, 2, 3], [4, 5, 6, 7, 8]), (ctx, greedy), ([9], [11, 12]), ([40, 41], [42])]
    want = score_pairs(model, pairs, batch_size=2)
    assert [s.greedy for s in want] == [False, True, False, False]
    monkeypatch.setattr(scoring, "LOGITS_PER_CHUNK", 3 * model.lm_head.weight.shape[0])
    got = score_pairs(model, pairs, batch_size=2)
    assert [s.logprob for s in got] == pytest.approx([s.logprob for s in want], abs=1e-5)
    assert [(s.greedy, s.n_tokens) for s in got] == [(s.greedy, s.n_tokens) for s in want]


def test_choice_ties_go_to_the_first_choice_under_every_normalisation():
    from minimoe.eval.tasks import choice_correct

    # raw -3 = -3, per char and byte -1.5 = -1.5, per token -3 = -3: the first choice wins each tie
    first = choice_correct([-3.0, -3.0, -5.0], [1, 1, 1], ["ab", "cd", "e"], label=0)
    assert set(first.values()) == {1.0}
    assert set(choice_correct([-3.0, -3.0, -5.0], [1, 1, 1], ["ab", "cd", "e"], label=1).values()) == {0.0}


def test_accuracy_norm_divides_by_the_choice_not_the_delimiter(tmp_path):
    """lm-eval's acc_norm divides by len(choice): the target delimiter it scores is not counted."""
    from test_eval import UNIGRAM_PREFS

    from minimoe.eval.tasks import evaluate_multiple_choice

    model, logp = unigram_model(UNIGRAM_PREFS)
    ll = {c: sum(logp[ord(ch)].item() for ch in " " + c) for c in ("a", "bbb")}  # " a", " bbb"
    assert ll["a"] / 1 < ll["bbb"] / 3 and ll["a"] / 2 > ll["bbb"] / 4  # the delimiter would flip it
    rows = [{"context": "Q:", "choices": ["a", "bbb"], "label": 1}]
    res = evaluate_multiple_choice(model, Tokenizer.byte(), write_jsonl(tmp_path / "mc.jsonl", rows))
    assert (res["accuracy"], res["accuracy_norm"], res["accuracy_per_byte"]) == (0.0, 1.0, 1.0)


def test_minimal_pairs_compare_total_not_mean_log_probability(tmp_path):
    from minimoe.eval.tasks import evaluate_minimal_pairs

    model, _ = unigram_model({ord("a"): 4.0, ord("b"): 2.0})
    # "b" and "bb" have the same mean log-prob per token; the total prefers the shorter one
    rows = [{"sentence_good": "b", "sentence_bad": "bb"}, {"sentence_good": "bb", "sentence_bad": "b"}]
    res = evaluate_minimal_pairs(model, Tokenizer.byte(), write_jsonl(tmp_path / "p.jsonl", rows))
    assert res["accuracy"] == 0.5


def test_lm_eval_loglikelihood_cuts_the_context_to_max_length():
    from types import SimpleNamespace

    from minimoe.eval.lm_eval import MinimoeLM

    model, tok = random_model(), Tokenizer.byte()
    lm = MinimoeLM(model=model, tokenizer=tok, max_length=16)
    context = "the cat sat on the mat and the dog ran to"
    ctx, cont = encode_pair(tok, context, " the ball")
    want = token_logprobs(model, (ctx + cont)[-17:])[-len(cont) :].sum().item()  # the last 16 inputs
    uncut = token_logprobs(model, ctx + cont)[-len(cont) :].sum().item()
    assert want != pytest.approx(uncut, abs=1e-3)
    [(got, _)] = lm.loglikelihood([SimpleNamespace(args=(context, " the ball"))], disable_tqdm=True)
    assert got == pytest.approx(want, abs=1e-4)


def test_lm_eval_rolling_answers_each_request_in_order():
    from types import SimpleNamespace

    from minimoe.eval.lm_eval import MinimoeLM

    lm = MinimoeLM(model=random_model(), tokenizer=Tokenizer.byte(), batch_size=3, max_length=16)
    texts = ["hi", "the cat sat on the mat and the dog ran", "a middle text"]
    alone = [lm.loglikelihood_rolling([SimpleNamespace(args=(t,))], True)[0] for t in texts]
    together = lm.loglikelihood_rolling([SimpleNamespace(args=(t,)) for t in texts], True)
    assert together == pytest.approx(alone, abs=1e-5) and len(set(alone)) == 3


def test_lm_eval_empty_continuation_is_log_one_and_greedy():
    from types import SimpleNamespace

    from minimoe.eval.lm_eval import MinimoeLM

    lm = MinimoeLM(model=random_model(), tokenizer=Tokenizer.byte())
    assert lm.loglikelihood([SimpleNamespace(args=("pick", ""))], disable_tqdm=True) == [(0.0, True)]


def test_greedy_means_the_argmax_so_ties_go_to_the_lowest_id():
    """As lm-eval's HF model (`logits.argmax(-1) == continuation`): under a uniform model only token 0
    is the greedy choice."""
    import torch

    model = random_model()
    with torch.no_grad():
        model.lm_head.weight.zero_()  # every logit 0
    assert [s.greedy for s in score_pairs(model, [([1], [0]), ([1], [5]), ([1], [0, 0])])] == [
        True,
        False,
        True,
    ]


def test_choice_norm_counts_the_choices_own_whitespace():
    """acc_norm and acc_bytes divide by len(choice) as given, surrounding spaces included (lm-eval)."""
    from minimoe.eval.tasks import choice_correct

    # by length as given: -3/3 > -2.2/2 (choice 0); stripped it would be -3/2 < -2.2/2 (choice 1)
    got = choice_correct([-3.0, -2.2], [1, 1], [" ab", "cd"], label=0)
    assert (got["accuracy_norm"], got["accuracy_per_byte"]) == (1.0, 1.0)


def test_perplexity_streams_documents_in_rounds_without_losing_or_repeating_any(tmp_path, monkeypatch):
    """Small encode batches and rounds (DOCS_PER_ENCODE, WINDOWS_PER_ROUND) give the totals of one
    plain forward pass per document."""
    from minimoe.eval import perplexity

    monkeypatch.setattr(perplexity, "DOCS_PER_ENCODE", 2)
    monkeypatch.setattr(perplexity, "WINDOWS_PER_ROUND", 3)
    model, tok = random_model(), Tokenizer.byte()
    docs = ["one", "doc two", "the third document", "four", "five is last"]
    (tmp_path / "d.txt").write_text("\n<|endoftext|>\n".join(docs))
    res = evaluate_perplexity(model, tok, tmp_path / "d.txt", window=8, stride=4)
    n = sum(len(d) for d in docs)
    assert (res["n"], res["tokens"], res["bytes"]) == (5, n, n)
    nll = 0.0
    for d in docs:  # slow reference: each document is shorter than the model context
        nll -= token_logprobs(model, [tok.eos_id, *tok.encode(d)]).sum().item()
    full = evaluate_perplexity(model, tok, tmp_path / "d.txt")  # window 64: one pass per document
    assert full["loss"] == pytest.approx(nll / n, rel=1e-5)
    monkeypatch.setattr(perplexity, "WINDOWS_PER_ROUND", 512)
    assert res["loss"] == pytest.approx(
        evaluate_perplexity(model, tok, tmp_path / "d.txt", window=8, stride=4)["loss"], rel=1e-6
    )


def test_task_folders_leave_out_hidden_files_and_folders_as_training_folders_do(tmp_path):
    """A task folder read every .jsonl under it, so Jupyter's .ipynb_checkpoints/*-checkpoint.jsonl
    copies were evaluated a second time. Hidden files and folders are now left out by the rule training
    data folders (FolderCorpus) follow."""
    from minimoe.data.corpus import FolderCorpus

    row = {"prompt": "p", "reference": "aaaa"}
    for name in (
        "a.jsonl",
        "sub/b.jsonl",
        ".ipynb_checkpoints/a-checkpoint.jsonl",
        "sub/.c.jsonl",
        ".git/x/d.jsonl",
    ):
        write_jsonl(tmp_path / "f" / name, [row])
    files, root = task_files(tmp_path / "f")
    assert [f.relative_to(root).as_posix() for f in files] == ["a.jsonl", "sub/b.jsonl"]
    assert files == FolderCorpus(tmp_path / "f").files
    assert [r.file for r in load_records(tmp_path / "f").records] == ["a.jsonl", "sub/b.jsonl"]
    model, _ = unigram_model({ord("a"): 5.0})
    res = evaluate_generation(model, Tokenizer.byte(), tmp_path / "f", max_new_tokens=4)
    assert res["n"] == 2 and set(res["per_file"]) == {"a.jsonl", "sub/b.jsonl"}
