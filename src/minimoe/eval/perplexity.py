"""Perplexity and bits per byte of held-out text, with a strided sliding window over long documents.

Each document is scored on its own, after an end-of-text token (which precedes every document in
training), so every token of the text is predicted and counted. A document longer than the window
is covered by windows that start `stride` tokens apart; each window counts only the tokens the
previous one did not (as in Hugging Face's "Perplexity of fixed-length models" guide), so every
token is predicted exactly once, with at least `window - stride` tokens of context after the first
window. The last window is pulled back to end at the document's end with a full window of context,
as lm-evaluation-harness's rolling windows do. With stride = window the windows do not overlap.

Bits per byte divide the total negative log-likelihood by the UTF-8 bytes of the text, so models
with different tokenizers compare.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from minimoe.data.corpus import Corpus, FolderCorpus, TextFileCorpus
from minimoe.data.records import folder_file_is_records
from minimoe.data.sources import open_source
from minimoe.errors import MinimoeError
from minimoe.eval.scoring import model_context, prefix_id, score_pairs

# Windows gathered before a round of batched scoring (sorted by length inside a round).
WINDOWS_PER_ROUND = 512
DOCS_PER_ENCODE = 64


def rolling_windows(n_targets: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Windows covering the targets of a sequence `s` of `n_targets + 1` tokens (prefix + text).

    Args:
        n_targets: tokens to predict (s[1], ..., s[n_targets]).
        window: input tokens per window.
        stride: tokens between window starts, 1 <= stride <= window.
    Returns:
        (begin, end, n_scored) triples: the window reads s[begin:end] and predicts s[begin + 1 : end + 1],
        of which the last n_scored count. Each target is counted exactly once, in order.
    """
    if not 1 <= stride <= window:
        raise MinimoeError(f"stride ({stride}) must be between 1 and the window ({window})")
    out: list[tuple[int, int, int]] = []
    prev_end = 0
    for start in range(0, n_targets, stride):
        end = min(start + window, n_targets)
        out.append((max(0, end - window), end, end - prev_end))  # a short last window reaches back
        prev_end = end
        if end == n_targets:
            break
    return out


def window_pairs(ids: list[int], prefix: int, window: int, stride: int) -> list[tuple[list[int], list[int]]]:
    """(context, continuation) token pairs that score every token of `ids` once (see rolling_windows)."""
    s = [prefix, *ids]
    pairs = []
    for begin, end, n in rolling_windows(len(ids), window, stride):
        cut = end + 1 - n
        pairs.append((s[begin:cut], s[cut : end + 1]))
    return pairs


@dataclass
class _Totals:
    nll: float = 0.0  # nats
    tokens: int = 0
    bytes: int = 0
    documents: int = 0

    def result(self) -> dict:
        loss = self.nll / self.tokens if self.tokens else float("nan")
        return {
            "loss": loss,
            "perplexity": math.exp(loss) if self.tokens else float("nan"),
            "bits_per_byte": self.nll / math.log(2) / self.bytes if self.bytes else float("nan"),
            "tokens": self.tokens,
            "bytes": self.bytes,
            "tokens_per_byte": self.tokens / self.bytes if self.bytes else float("nan"),
            "n": self.documents,
        }


def _documents(corpus: Corpus, limit: int | None) -> Iterator[str]:
    for i, doc in enumerate(corpus.documents()):
        if limit is not None and i >= limit:
            return
        yield doc


def _score_corpus(model, tokenizer, corpus: Corpus, window, stride, batch_size, limit, bar) -> _Totals:
    """Stream the corpus's documents through rounds of batched window scoring."""
    tot = _Totals()
    prefix = prefix_id(tokenizer)
    pairs: list[tuple[list[int], list[int]]] = []
    pending_bytes = 0

    def flush() -> None:
        nonlocal pairs, pending_bytes
        # the bar moves with every batch of windows, each batch worth its share of the round's bytes (one
        # long document is one round of many windows: it must not sit at 0% until it is done)
        done, credited = 0, 0

        def on_batch(k: int) -> None:
            nonlocal done, credited
            done += k
            share = pending_bytes * done // len(pairs)
            bar.update(share - credited)
            credited = share

        scores = score_pairs(
            model,
            pairs,
            batch_size=batch_size,
            max_len=window,
            on_batch=on_batch if bar is not None else None,
        )
        for sc in scores:
            tot.nll -= sc.logprob
            tot.tokens += sc.n_tokens
        if bar is not None:
            bar.update(pending_bytes - credited)
        pairs, pending_bytes = [], 0

    docs: list[str] = []

    def encode_docs() -> None:
        nonlocal pending_bytes
        for doc, ids in zip(docs, tokenizer.encode_batch(docs)):
            n_bytes = len(doc.encode("utf-8"))
            tot.bytes += n_bytes
            tot.documents += 1
            pending_bytes += n_bytes
            if ids:
                pairs.extend(window_pairs(ids, prefix, window, stride))
            if len(pairs) >= WINDOWS_PER_ROUND:
                flush()
        docs.clear()

    for doc in _documents(corpus, limit):
        docs.append(doc)
        if len(docs) >= DOCS_PER_ENCODE:
            encode_docs()
    encode_docs()
    if pairs or pending_bytes:
        flush()
    return tot


def evaluate_perplexity(
    model,
    tokenizer,
    source: str | Path | Corpus,
    text_field: str = "text",
    window: int | None = None,
    stride: int | None = None,
    batch_size: int = 8,
    limit: int | None = None,
    progress: bool = False,
) -> dict:
    """Perplexity and bits per byte of a text source.

    Args:
        model: a Transformer in eval mode.
        tokenizer: its tokenizer.
        source: a text file, a folder (its JSON and Parquet files read by `text_field`), a
            .jsonl/.json/.parquet file (field `text_field`), `hf:...`, or a Corpus (see
            `minimoe.data.open_source`).
        window: input tokens per window (default and maximum: the model context).
        stride: tokens between window starts (default: window, i.e. no overlap).
        batch_size: windows per forward pass.
        limit: score only the first `limit` documents (of each file, for folders).
        progress: show a progress bar (stderr).
    Returns:
        {"loss" (mean nats per token), "perplexity", "bits_per_byte", "tokens", "bytes",
        "tokens_per_byte", "n" (documents), "window", "stride"} plus, for a folder, "per_file"
        mapping each file's relative path to the same metrics and "skipped" (binary, non-UTF-8 and
        blank files).
    """
    from tqdm.auto import tqdm

    corpus = open_source(source, text_field=text_field)
    if corpus.pretokenized:
        raise MinimoeError(
            f"{corpus.name} holds token ids; perplexity needs the text (bits per byte count its bytes)"
        )
    ctx = model_context(model)
    window = window or ctx
    if not 1 <= window <= ctx:
        raise MinimoeError(f"--window must be between 1 and the model context ({ctx}), got {window}")
    stride = stride or window
    if not 1 <= stride <= window:
        raise MinimoeError(f"--stride must be between 1 and the window ({window}), got {stride}")
    if limit is not None and limit <= 0:
        raise MinimoeError(f"--limit must be positive, got {limit}")
    known_size = isinstance(corpus, (TextFileCorpus, FolderCorpus)) and limit is None
    total = sum(f.stat().st_size for f in corpus.files) if known_size else None
    bar = tqdm(total=total, unit="B", unit_scale=True, desc="perplexity", disable=not progress, leave=False)
    try:
        if isinstance(corpus, FolderCorpus):
            res = _score_folder(model, tokenizer, corpus, window, stride, batch_size, limit, bar)
        else:
            tot = _score_corpus(model, tokenizer, corpus, window, stride, batch_size, limit, bar)
            if tot.documents == 0:
                raise MinimoeError(f"{corpus.name} contains no text")
            res = tot.result()
    finally:
        bar.close()
    res.update(window=window, stride=stride)
    return res


def _score_folder(model, tokenizer, corpus: FolderCorpus, window, stride, batch_size, limit, bar) -> dict:
    """Score each file of a folder on its own, record files (JSON, Parquet) by their text field as when
    given alone, ordinary JSON as text (`folder_file_is_records`); binary, non-UTF-8 and blank text
    files are skipped."""
    total, per_file, skipped = _Totals(), {}, []
    for f in corpus.files:
        rel = str(f.relative_to(corpus.root)) if corpus.root else f.name
        if folder_file_is_records(f, corpus.text_field):
            tot = _score_corpus(
                model, tokenizer, open_source(f, corpus.text_field), window, stride, batch_size, limit, bar
            )
            per_file[rel] = tot.result()
            _add(total, tot)
            if bar is not None:  # the bar counts file bytes; the records' text is fewer
                bar.update(max(0, f.stat().st_size - tot.bytes))
            continue
        data = f.read_bytes()
        try:
            text_ok = b"\0" not in data and bool(data.decode("utf-8").strip())
        except UnicodeDecodeError:
            text_ok = False
        if not text_ok:
            skipped.append(rel)
            if bar is not None:
                bar.update(len(data))
            continue
        tot = _score_corpus(model, tokenizer, TextFileCorpus(f), window, stride, batch_size, limit, bar)
        per_file[rel] = tot.result()
        _add(total, tot)
    if total.documents == 0:
        raise MinimoeError(f"{corpus.name} contains no text files")
    res = total.result()
    res.update(per_file=per_file, skipped=skipped)
    return res


def _add(total: _Totals, tot: _Totals) -> None:
    for k in ("nll", "tokens", "bytes", "documents"):
        setattr(total, k, getattr(total, k) + getattr(tot, k))
