"""Evaluation: perplexity and bits per byte, multiple-choice and minimal-pair log-likelihood tasks,
generation metrics (BLEU, ROUGE, F1), and an lm-evaluation-harness adapter (`minimoe.eval.lm_eval`,
imported on demand because lm_eval is an optional dependency).

Typical use::

    from minimoe.train.checkpoint import load_run
    from minimoe.eval import evaluate_perplexity

    model, tok, cfg, meta = load_run("runs/tinystories")
    evaluate_perplexity(model, tok, "valid.txt", stride=128)["bits_per_byte"]
"""

from minimoe.eval.perplexity import evaluate_perplexity, rolling_windows
from minimoe.eval.runner import evaluate_run
from minimoe.eval.scoring import Score, encode_pair, score_pairs
from minimoe.eval.tasks import evaluate_generation, evaluate_minimal_pairs, evaluate_multiple_choice

__all__ = [
    "Score",
    "encode_pair",
    "evaluate_generation",
    "evaluate_minimal_pairs",
    "evaluate_multiple_choice",
    "evaluate_perplexity",
    "evaluate_run",
    "rolling_windows",
    "score_pairs",
]
