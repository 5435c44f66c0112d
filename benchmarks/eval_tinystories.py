"""Every `minimoe eval` task on real text: TinyStories validation stories turned into a cloze
multiple-choice task, word-order minimal pairs and a next-sentence generation task, plus perplexity.

    python benchmarks/eval_tinystories.py runs/tinystories
    python benchmarks/eval_tinystories.py runs/tinystories --n 100 --data ../shared/data/tinystories/valid.txt

Task files (written to --out, default RUN_DIR/eval/tinystories_tasks/; the same seed gives the same files):
  cloze.jsonl   context = the first sentences of a paragraph, choices = its next sentence and three
                sentences drawn from other paragraphs (label at a random position);
  pairs.jsonl   sentence_good = a sentence, sentence_bad = the same words with two neighbours swapped;
  nextsent.jsonl prompt = the first sentences of a paragraph, reference = its next sentence.
Prints one Markdown table; each row is the JSON that `minimoe eval --json` printed.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import subprocess
import sys
from pathlib import Path

SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/tinystories/valid.txt"


def paragraphs(text: str) -> list[list[str]]:
    """Paragraphs (blank-line separated) as lists of sentences of 4-30 words."""
    out = []
    for para in re.split(r"\n\s*\n", text):
        sents = [s.strip() for s in SENTENCE_END.split(" ".join(para.split())) if s.strip()]
        sents = [s for s in sents if 4 <= len(s.split()) <= 30]
        if len(sents) >= 3:
            out.append(sents)
    return out


def build_tasks(text: str, n: int, seed: int) -> dict[str, list[dict]]:
    rng = random.Random(seed)
    paras = paragraphs(text)
    rng.shuffle(paras)
    pool = [s for p in paras for s in p]
    cloze, pairs, gen = [], [], []
    for p in paras[:n]:
        k = rng.randint(1, len(p) - 1)
        context, answer = " ".join(p[:k]), p[k]
        choices = [answer] + rng.sample([s for s in pool if s not in p], 3)
        order = list(range(4))
        rng.shuffle(order)
        cloze.append({"context": context, "choices": [choices[i] for i in order], "label": order.index(0)})
        gen.append({"prompt": context, "reference": answer})
        words = answer.split()
        j = rng.randint(1, len(words) - 2)
        if words[j] != words[j + 1]:
            bad = words[:j] + [words[j + 1], words[j]] + words[j + 2 :]
            pairs.append({"sentence_good": answer, "sentence_bad": " ".join(bad)})
    return {"cloze": cloze, "pairs": pairs, "nextsent": gen}


def run_eval(run_dir: str, *args: str) -> dict:
    cmd = [sys.executable, "-m", "minimoe", "eval", run_dir, *args, "--json", "--no-progress"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(proc.stderr.strip())
    return json.loads(proc.stdout)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir")
    ap.add_argument(
        "--data", default=str(DEFAULT_DATA), help="TinyStories-style text with blank-line paragraphs"
    )
    ap.add_argument("--n", type=int, default=200, help="paragraphs to draw examples from")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="folder for the task files")
    ap.add_argument("--stride", type=int, default=None, help="perplexity stride (default: the window)")
    args = ap.parse_args()
    # checked before the task folder is made inside the run
    for path, what in ((args.run_dir, "the run"), (args.data, "the text (--data)")):
        if not Path(path).exists():
            sys.exit(f"eval_tinystories: {what} {path} does not exist")
    out = Path(args.out or Path(args.run_dir) / "eval" / "tinystories_tasks")
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in build_tasks(Path(args.data).read_text(encoding="utf-8"), args.n, args.seed).items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    ppl_args = ["--task", "perplexity", "--data", args.data] + (
        ["--stride", str(args.stride)] if args.stride else []
    )
    rows = [
        ("perplexity", run_eval(args.run_dir, *ppl_args), ("loss", "perplexity", "bits_per_byte", "tokens")),
        (
            "multiple-choice (cloze, 4 choices)",
            run_eval(args.run_dir, "--task", "multiple-choice", "--data", str(out / "cloze.jsonl")),
            ("accuracy", "accuracy_norm", "accuracy_per_byte", "accuracy_per_token", "n"),
        ),
        (
            "minimal pairs (swapped neighbours)",
            run_eval(args.run_dir, "--task", "minimal-pairs", "--data", str(out / "pairs.jsonl")),
            ("accuracy", "accuracy_stderr", "n"),
        ),
        (
            "generation (next sentence, greedy)",
            run_eval(
                args.run_dir,
                "--task",
                "generation",
                "--data",
                str(out / "nextsent.jsonl"),
                "--max-new-tokens",
                "40",
                "--stop",
                "\n",
            ),  # fmt: skip
            ("bleu", "chrf", "rougeL", "f1", "exact_match", "n"),
        ),
    ]
    step = rows[0][1]["checkpoint"]["step"]
    print(f"| task (step {step}) | metrics | seconds |\n| --- | --- | --- |")
    for name, res, keys in rows:
        shown = ", ".join(f"{k} {res[k]:.4g}" if isinstance(res[k], float) else f"{k} {res[k]}" for k in keys)
        print(f"| {name} | {shown} | {res['seconds']:.0f} |")


if __name__ == "__main__":
    main()
