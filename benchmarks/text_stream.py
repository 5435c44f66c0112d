"""What turning tokens into text costs per token as a sequence grows: `TextStream` (what `generate` and
`serve` stream through), which decodes a window of the newest tokens, against the same stream decoding
its whole token list at every token (what it did before).

    python benchmarks/text_stream.py           # the table, Markdown on stdout
    python benchmarks/text_stream.py --write   # also into BENCHMARKS.md

Both streams push the same tokens of generated-looking English (with accents and CJK, so characters
split across tokens) through a byte tokenizer and a byte-level BPE tokenizer trained on that text, with
one stop string that never matches (matching is part of a push). Each row is the mean cost of the pushes
between length/2 and length tokens, the median over rounds in which the two streams take turns; the
texts must come out equal. One process; the ratio is what to read (the machine is noisy).
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from decode import table  # noqa: E402

from minimoe.data import Tokenizer  # noqa: E402
from minimoe.data.tokenizer import train_bpe  # noqa: E402
from minimoe.infer.text import TextStream  # noqa: E402

BEGIN, END = "<!-- text_stream:begin -->", "<!-- text_stream:end -->"
WORDS = (
    "the a cat dog sat ran on under mat tree little big happy naïve café 日本 said and then . , ! ?".split()
)


def write_section(text: str) -> None:
    path = HERE.parent / "BENCHMARKS.md"
    doc = path.read_text(encoding="utf-8")
    if BEGIN not in doc or END not in doc:
        sys.exit(f"{path} has no {BEGIN} ... {END} section to write into")
    body = f"{BEGIN}\n{text}\n{END}"
    path.write_text(doc[: doc.index(BEGIN)] + body + doc[doc.index(END) + len(END) :], encoding="utf-8")


class WholeListStream(TextStream):
    """The stream as it was: the whole token list decoded at every push."""

    def _extend(self) -> str:
        return self._decode(self.ids)


def per_push_us(stream_cls, decode, ids: list[int]) -> tuple[float, str]:
    """Mean microseconds of a push over the second half of `ids`, and the final text."""
    ts = stream_cls(decode, stop=["<never>"])
    half = len(ids) // 2
    for t in ids[:half]:
        ts.push(t)
    t0 = time.perf_counter()
    for t in ids[half:]:
        ts.push(t)
    us = (time.perf_counter() - t0) / (len(ids) - half) * 1e6
    ts.flush()
    return us, ts.text


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--write", action="store_true", help="write the table into BENCHMARKS.md")
    args = p.parse_args()
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(20_000))
    tokenizers = {"byte": Tokenizer.byte(), "byte-level BPE (1,000)": train_bpe([text], vocab_size=1000)}
    rows = []
    for name, tok in tokenizers.items():
        ids_all = tok.encode(text)
        for length in (256, 1024, 4096, 16384):
            ids = ids_all[:length]
            old, new = [], []
            for _ in range(args.rounds):
                us_old, text_old = per_push_us(WholeListStream, tok.decode, ids)
                us_new, text_new = per_push_us(TextStream, tok.decode, ids)
                if text_old != text_new:
                    sys.exit(f"text_stream: the two streams' texts differ ({name}, {length} tokens)")
                old.append(us_old)
                new.append(us_new)
            ratio = statistics.median(o / n for o, n in zip(old, new))
            rows.append(
                [name, f"{length:,}", f"{statistics.median(old):,.1f}", f"{statistics.median(new):,.1f}",
                 f"**{ratio:,.1f}x**"]
            )  # fmt: skip
            print(" | ".join(rows[-1]), flush=True)
    out = (
        f"Measured {time.strftime('%Y-%m-%d %H:%M')}, {args.rounds} rounds, the two streams taking turns in each; "
        "microseconds per pushed token over the second half of a sequence of the given length, same final "
        "text.\n\n"
        + table(
            ["tokenizer", "tokens", "whole list us/token", "window us/token", "whole list / window"], rows
        )
    )
    print(out)
    if args.write:
        write_section(out)


if __name__ == "__main__":
    main()
