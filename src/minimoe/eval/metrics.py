"""Text-overlap metrics for generation tasks: BLEU and chrF (sacrebleu), ROUGE (rouge-score),
token F1 / exact match with SQuAD-style answer normalisation, and final-answer accuracy for GSM8K-style
data (references end in "#### 42"; a model's answer is the last number it writes).

Scales follow each package: BLEU and chrF 0-100 (sacrebleu), ROUGE F-measures 0-1 (rouge-score),
F1 and exact match 0-1 (means over examples, like accuracy).
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = frozenset(string.punctuation)
ROUGE_TYPES = ("rouge1", "rouge2", "rougeL", "rougeLsum")
ANSWER_MARK = "####"  # GSM8K: the reference's reasoning, then "#### <final answer>"
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower case, drop punctuation and the articles a/an/the,
    collapse whitespace."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised reference, else 0.0."""
    refs = [references] if isinstance(references, str) else references
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(r) for r in refs))


def token_f1(prediction: str, references: str | Sequence[str]) -> float:
    """SQuAD token F1 between normalised word bags, the best over references.

    When either side normalises to no words, F1 is 1.0 if both do and 0.0 otherwise (SQuAD v2).
    """
    refs = [references] if isinstance(references, str) else references
    pred = normalize_answer(prediction).split()
    best = 0.0
    for r in refs:
        ref = normalize_answer(r).split()
        if not pred or not ref:
            best = max(best, float(pred == ref))
            continue
        same = sum((Counter(pred) & Counter(ref)).values())
        if same:
            precision, recall = same / len(pred), same / len(ref)
            best = max(best, 2 * precision * recall / (precision + recall))
    return best


def final_answer(text: str) -> str | None:
    """The final numeric answer of a GSM8K-style text, normalised; None when it holds no number.

    The first number after the last "####" when the text has one (a GSM8K reference), else the last
    number in the text (a model's worked answer). Thousands commas and a trailing ".0" go, so
    "$1,000.00" and "1000" are the same answer.
    """
    if ANSWER_MARK in text:
        found = _NUMBER.findall(text.rsplit(ANSWER_MARK, 1)[1])[:1]
    else:
        found = _NUMBER.findall(text)[-1:]
    if not found:
        return None
    num = found[0].replace(",", "")
    if "." in num:
        num = num.rstrip("0").rstrip(".")
    return "0" if num in ("-0", "") else num


def answer_match(prediction: str, references: str | Sequence[str]) -> float:
    """1.0 if the prediction's final number equals that of any reference, else 0.0 (`final_answer`)."""
    refs = [references] if isinstance(references, str) else references
    pred = final_answer(prediction)
    return float(pred is not None and any(pred == final_answer(r) for r in refs))


def _reference_streams(references: Sequence[Sequence[str]]) -> list[list[str]]:
    """Per-hypothesis reference lists -> sacrebleu's reference streams (one list per reference slot).

    Examples with fewer references repeat their first one: BLEU clips n-gram counts by the maximum
    over references and takes the closest reference length, so a duplicate changes nothing.
    """
    width = max(len(r) for r in references)
    return [[r[j] if j < len(r) else r[0] for r in references] for j in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Corpus BLEU and chrF with sacrebleu's defaults (13a tokenisation, exponential smoothing).

    Args:
        hypotheses: one generated text per example.
        references: one or more reference texts per example.
    Returns:
        {"bleu": 0-100, "bleu_brevity_penalty", "chrf": 0-100}.
    """
    import sacrebleu

    streams = _reference_streams(references)
    b = sacrebleu.corpus_bleu(list(hypotheses), streams)
    c = sacrebleu.corpus_chrf(list(hypotheses), streams)
    return {"bleu": float(b.score), "bleu_brevity_penalty": float(b.bp), "chrf": float(c.score)}


def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """Mean ROUGE-1/2/L/Lsum F-measures (rouge-score, Porter stemming); the best reference per example."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    sums = dict.fromkeys(ROUGE_TYPES, 0.0)
    for hyp, refs in zip(hypotheses, references):
        scores = scorer.score_multi(list(refs), hyp)
        for k in ROUGE_TYPES:
            sums[k] += scores[k].fmeasure
    n = max(len(hypotheses), 1)
    return {k: v / n for k, v in sums.items()}


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU, chrF, ROUGE, token F1 and exact match of generated texts against references, plus
    "answer_accuracy" (`answer_match`) when every reference marks its final answer with "####"."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    n = max(len(hypotheses), 1)
    out = bleu(hypotheses, references)
    out.update(rouge(hypotheses, references))
    out["f1"] = sum(token_f1(h, r) for h, r in zip(hypotheses, references)) / n
    out["exact_match"] = sum(exact_match(h, r) for h, r in zip(hypotheses, references)) / n
    if references and all(ANSWER_MARK in r for refs in references for r in refs):
        out["answer_accuracy"] = sum(answer_match(h, r) for h, r in zip(hypotheses, references)) / n
    return out
