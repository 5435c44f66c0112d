"""Final-answer accuracy for GSM8K-style generation data: the number after "####" in the reference
against the last number the model writes, as a function and end to end through `minimoe eval`."""

from __future__ import annotations

import pytest
from test_eval import cli_json, save_run, unigram_model, write_jsonl

from minimoe.eval import metrics


@pytest.mark.parametrize(
    "text, answer",
    [
        ("Natalia sold 48/2 = 24 clips in May.\nAltogether she sold 48+24 = 72 clips.\n#### 72", "72"),
        ("She pays $1,000.00 in total, so the answer is 1,000.", "1000"),  # last number, commas dropped
        ("#### 1,234 and 5 more", "1234"),  # the first number after the mark, not the last
        ("step 1: 3 + 4 = 7. The answer is 7.5.", "7.5"),  # a full stop is not a decimal point
        ("the first 10 rows, then -3", "-3"),
        ("#### 18.0", "18"),
        ("no digits at all", None),
        ("#### none", None),
        ("first try #### 4\nchecked again #### 5", "5"),  # the last mark's answer
        ("#### -0.0", "0"),  # minus zero is zero
    ],
)
def test_final_answer(text, answer):
    assert metrics.final_answer(text) == answer


def test_answer_match_and_when_it_is_reported():
    assert metrics.answer_match("so she earns 18 dollars", "... #### 18") == 1.0
    assert metrics.answer_match("I do not know", "#### none") == 0.0  # no number on either side: no match
    assert metrics.answer_match("so she earns 18 dollars, not 20", "#### 18") == 0.0  # the last number counts
    assert metrics.answer_match("no idea", ["#### 3", "#### 4"]) == 0.0
    assert metrics.answer_match("it is 4", ["#### 3", "#### 4"]) == 1.0
    refs = [["#### 18"], ["x #### 3"]]
    out = metrics.generation_metrics(["she has 18", "The answer: 4"], refs)
    assert out["answer_accuracy"] == 0.5 and out["exact_match"] == 0.0
    assert "answer_accuracy" not in metrics.generation_metrics(["18"], [["18"]])  # not GSM8K-style


def test_cli_generation_reports_answer_accuracy(tmp_path, capsys):
    # a model that writes "7" at every step: "77" after two tokens
    model, _ = unigram_model({ord("7"): 5.0, ord("a"): 1.0})
    run = save_run(model, tmp_path / "run")
    rows = [
        {"question": "How many?", "answer": "Seven and seventy: 7 * 11 = 77\n#### 77"},
        {"question": "And now?", "answer": "It is #### 12"},
    ]
    data = write_jsonl(tmp_path / "gsm8k.jsonl", rows)
    argv = ["--task", "generation", "--data", data, "--max-new-tokens", 2]
    res = cli_json(capsys, run, *argv, "--field", "prompt=question", "--field", "reference=answer")
    assert res["answer_accuracy"] == 0.5 and res["exact_match"] == 0.0


def test_overlap_metrics_count_repeats_stem_words_and_take_the_best_reference():
    """SQuAD F1 over word bags (a repeated word counts twice), ROUGE with Porter stemming and the best of
    several references per example."""
    assert metrics.token_f1("cat cat", "cat cat dog") == pytest.approx(0.8)  # P 2/2, R 2/3
    assert metrics.rouge(["cats running"], [["cat run"]])["rouge1"] == pytest.approx(1.0)
    assert metrics.rouge(["the cat sat"], [["a dog ran", "the cat sat"]])["rougeL"] == pytest.approx(1.0)
