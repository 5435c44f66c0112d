"""Tokenize a corpus once into memory-mapped token shards plus `meta.json`.

Layout of a prepared folder:

    meta.json                 written last; lists every file with its exact byte size
    tokenizer/                the tokenizer the shards were made with (Tokenizer.save)
    train_000.bin, ...        raw token ids, uint16 when the vocabulary fits, else uint32
    val_000.bin, ...

Everything is written into a temporary sibling folder and renamed into place, so an interrupted
run leaves nothing a later run trusts: a folder is trusted only if meta.json exists, has our
format version and every file it lists has exactly the listed size. Re-running with the same
sources (same content), tokenizer and split parameters returns the existing data untouched.

Train/validation split, in order of preference:
- `val_source` given: all of it is validation (e.g. a held-out file), and its files are left out of
  a training folder that holds them;
- enough documents (val_fraction * documents >= MIN_VAL_DOCS): whole documents, spread evenly
  (document i is validation when floor((i+1) f) > floor(i f)), so no document is cut;
- otherwise the last val_fraction of the token stream (one long book, tinyshakespeare).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from minimoe.data.cache import FORMAT_VERSION, check_ours, clean_stale, lock, read_trusted, write_json_atomic
from minimoe.data.corpus import Corpus, FolderCorpus
from minimoe.data.shards import SPLITS, ShardWriter, copy_tokens, move_tail, tokenize_corpus
from minimoe.data.sources import open_source
from minimoe.data.tokenizer import Tokenizer, resolve_tokenizer, train_bpe
from minimoe.errors import MinimoeError

log = logging.getLogger(__name__)

SHARD_TOKENS = 64 * 2**20  # tokens per shard file (128 MiB as uint16)
# With fewer expected validation documents than this, one document's length would decide the
# size of the validation set, so the split falls back to the tail of the token stream.
MIN_VAL_DOCS = 8
# A stream split's tokenizer learns from this share of the text before the validation tail.
STREAM_BPE_MARGIN = 0.95


@dataclass
class PreparedData:
    """A trusted prepared folder: shard paths, token and byte counts, and its tokenizer.

    Attributes:
        dir: the folder.
        meta: the parsed meta.json.
        cached: True when `prepare` found it already up to date and did no work.
    """

    dir: Path
    meta: dict[str, Any]
    cached: bool = False

    @classmethod
    def load(cls, directory: str | Path) -> PreparedData:
        """Open a prepared folder, checking every listed file's size. Raises MinimoeError if the
        folder is missing or incomplete."""
        d = Path(directory)
        meta, why = read_trusted(d)
        if meta is None:
            raise MinimoeError(f"{d} holds no complete prepared data ({why}); prepare it again")
        return cls(d, meta)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.meta["dtype"])

    def shard_paths(self, split: str) -> list[Path]:
        """The shard files of `split` ("train" or "val"), in order."""
        return [self.dir / s["file"] for s in self.meta["splits"][split]["shards"]]

    def num_tokens(self, split: str) -> int:
        return int(self.meta["splits"][split]["tokens"])

    def describe_split(self, split: str) -> str:
        """What `split` was made from, for messages: "the val split of notes.txt (held out from it)",
        or the prepared folder where meta.json names no source."""
        sources = self.meta.get("sources") or {}
        own = sources.get(split)
        if own:
            return f"the {split} split of {own.get('name')}"
        train = sources.get("train")
        if split == "val" and train:
            return f"the val split of {train.get('name')} (held out from it)"
        return f"the {split} split of {self.dir}"

    def num_bytes(self, split: str) -> int | None:
        """UTF-8 bytes of the text behind `split` (None when unknown: pre-tokenized train data)."""
        return self.meta["splits"][split]["bytes"]

    def tokens_per_byte(self, split: str) -> float | None:
        """Tokens per UTF-8 byte: bits per byte = (mean CE in nats / ln 2) * tokens_per_byte."""
        b = self.num_bytes(split)
        return self.num_tokens(split) / b if b else None

    def memmaps(self, split: str) -> list[np.memmap]:
        """Read-only memory maps of the shards of `split`."""
        return [np.memmap(p, dtype=self.dtype, mode="r") for p in self.shard_paths(split)]

    def tokenizer(self) -> Tokenizer:
        """The tokenizer the shards were made with (checked against the hash in meta.json)."""
        tok = Tokenizer.load(self.dir / "tokenizer")
        if tok.hash() != self.meta["tokenizer"]["hash"]:
            raise MinimoeError(
                f"the tokenizer in {self.dir / 'tokenizer'} is not the one the shards were made with"
            )
        return tok


# ---------------------------------------------------------------------- prepare


def _count(corpus: Corpus) -> tuple[int, int]:
    """Documents and characters of a text corpus (a cheap pass before tokenizing)."""
    docs = chars = 0
    for text, end in corpus.segments():
        docs += end
        chars += len(text)
    return docs, chars


def _is_val(i: int, f: float) -> bool:
    """Document i goes to validation: spreads exactly floor(n f) of n documents evenly."""
    return math.floor((i + 1) * f) > math.floor(i * f)


def prepare(
    source: str | Path | Corpus | None,
    tokenizer: Tokenizer | str,
    out_dir: str | Path,
    val_fraction: float = 0.01,
    workers: int = 2,
    *,
    val_source: str | Path | Corpus | None = None,
    text_field: str = "text",
    glob: str = "**/*",
    shard_tokens: int = SHARD_TOKENS,
    progress: bool = True,
    hf_cache_dir: str | None = None,
) -> PreparedData:
    """Tokenize `source` into shards under `out_dir`, or return the existing ones if up to date.

    Args:
        source: a data spec for `open_source` (None = built-in corpus) or a Corpus.
        tokenizer: a Tokenizer, or a spec for `resolve_tokenizer` (`bpe:N` trains on the
            training documents; a cached run reuses the tokenizer saved with the shards).
        out_dir: the prepared folder (created; replaced when the input changed).
        val_fraction: share held out for validation when there is no `val_source`; 0 = none.
        workers: tokenizer processes; 0 or 1 tokenizes in this process.
        val_source: an explicit validation source (then val_fraction is not used).
        text_field, glob, hf_cache_dir: passed to `open_source`.
        shard_tokens: the most tokens per shard file.
        progress: show a tqdm progress bar.
    Returns:
        The PreparedData; `.cached` tells whether the existing data was reused.
    """
    out_dir = Path(out_dir)
    if not 0 <= val_fraction < 1:
        raise MinimoeError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if shard_tokens <= 0:
        raise MinimoeError(f"shard_tokens must be positive, got {shard_tokens}")
    corpus = open_source(source, text_field=text_field, glob=glob, cache_dir=hf_cache_dir)
    val_corpus = (
        None
        if val_source is None
        else open_source(val_source, text_field=text_field, glob=glob, cache_dir=hf_cache_dir)
    )
    if val_corpus is not None:
        corpus = _leave_out_val_files(corpus, val_corpus)
    spec = tokenizer.strip() if isinstance(tokenizer, str) else None
    tok: Tokenizer | None
    if spec is not None and (spec == "bpe" or spec.startswith("bpe:")):
        _bpe_vocab(spec)  # a malformed spec fails now, not after counting the corpus
        tok = None  # trained below, unless the cached run already has it
    elif spec is not None:
        tok = resolve_tokenizer(spec)
    else:
        tok = tokenizer  # type: ignore[assignment]
    params = {
        "val_fraction": None if val_corpus is not None else val_fraction,
        "min_val_docs": MIN_VAL_DOCS,
        "shard_tokens": shard_tokens,
    }
    sources = json.loads(
        json.dumps({"train": corpus.describe(), "val": val_corpus and val_corpus.describe()})
    )

    with lock(out_dir):
        meta, _ = read_trusted(out_dir)
        same_setup = (
            meta is not None
            and meta.get("params") == params
            and (
                meta["tokenizer"]["hash"] == tok.hash()
                if tok is not None
                else meta["tokenizer"].get("spec") == spec
            )
        )
        content = None
        if same_setup:
            if meta["sources"] == sources:
                return PreparedData(out_dir, meta, cached=True)
            content = _content_hash(corpus, val_corpus)
            if meta["content_hash"] == content:
                meta["sources"] = sources  # touched but unchanged: remember the new mtimes
                write_json_atomic(out_dir / "meta.json", meta)
                return PreparedData(out_dir, meta, cached=True)
        check_ours(out_dir)
        clean_stale(out_dir)
        content = content or _content_hash(corpus, val_corpus)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            meta = _build(corpus, val_corpus, tok, spec, tmp, val_fraction, workers, shard_tokens, progress)
            meta.update(params=params, sources=sources, content_hash=content)
            meta["files"] = {
                p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            write_json_atomic(tmp / "meta.json", meta)  # last: it is what makes the folder trusted
            if out_dir.exists():
                old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}-{uuid.uuid4().hex[:8]}"
                os.rename(out_dir, old)
                os.rename(tmp, out_dir)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.rename(tmp, out_dir)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    for c in (corpus, val_corpus):
        if c is not None and c.skipped_files:  # said once, when the folder is read (meta.json counts them)
            names = ", ".join(c.skipped_files[:5]) + (", ..." if len(c.skipped_files) > 5 else "")
            n = len(c.skipped_files)
            log.warning(
                "%s: %d binary or non-UTF-8 file%s skipped: %s", c.name, n, "s" if n > 1 else "", names
            )
    return PreparedData(out_dir, meta, cached=False)


def _bpe_vocab(spec: str) -> int:
    try:
        return int(spec.partition(":")[2].replace("_", ""))
    except ValueError:
        raise MinimoeError(
            f"tokenizer spec {spec!r} must be bpe:VOCAB with an integer VOCAB, e.g. bpe:4096"
        ) from None


def _leave_out_val_files(corpus: Corpus, val_corpus: Corpus) -> Corpus:
    """The training corpus without the validation source's files, so held-out text is never trained on.

    Paths are compared resolved (symlinks, `..`). A folder that shares files comes back as a copy
    listing the rest; its file list is what `describe()` and `content_hash()` cover, so the prepared
    data's identity follows the files left.
    Raises MinimoeError where nothing can be left out: both sources are one file, the training source
    is a single file inside the validation data, or `datasets` reads the training folder whole.
    """
    val_files = {f.resolve() for f in val_corpus.files}
    shared = [f for f in corpus.files if f.resolve() in val_files]
    if not shared:
        return corpus
    if not isinstance(corpus, FolderCorpus):
        if len(corpus.files) == 1 and len(val_files) == 1:
            raise MinimoeError(
                f"the training data and the validation data are the same file ({shared[0]}); "
                "give validation data held out from the training data"
            )
        if len(corpus.files) == 1:
            raise MinimoeError(
                f"the training data {corpus.name} is one of the validation files of {val_corpus.name}; "
                "give validation data held out from the training data"
            )
        raise MinimoeError(
            f"the validation data {val_corpus.name} is inside the training data {corpus.name}, which is "
            "read whole; move the validation files out of the training folder"
        )
    corpus = copy.copy(corpus)
    corpus.files = [f for f in corpus.files if f.resolve() not in val_files]
    if not corpus.files:
        raise MinimoeError(
            f"the training folder {corpus.name} holds nothing but the validation data {val_corpus.name}; "
            "give training files besides the validation files"
        )
    return corpus


def _content_hash(corpus: Corpus, val_corpus: Corpus | None) -> str:
    return corpus.content_hash() + ("" if val_corpus is None else ":" + val_corpus.content_hash())


def _build(
    corpus: Corpus,
    val_corpus: Corpus | None,
    tok: Tokenizer | None,
    spec: str | None,
    tmp: Path,
    val_fraction: float,
    workers: int,
    shard_tokens: int,
    progress: bool,
) -> dict:
    """Tokenize into `tmp`; returns meta.json's content except params/sources/hash/files."""
    # Decide the split before tokenizing: document mode needs the document count.
    n_docs, n_chars = (0, 0) if corpus.pretokenized else _count(corpus)
    if not corpus.pretokenized and n_docs == 0:
        raise MinimoeError(f"{corpus.name} contains no text{_skipped_note(corpus)}")
    if val_corpus is not None:
        mode = "explicit"
    elif val_fraction == 0:
        mode = "none"
    elif not corpus.pretokenized and n_docs * val_fraction >= MIN_VAL_DOCS:
        mode = "document"
    else:
        mode = "stream"
    assign = (lambda i: int(_is_val(i, val_fraction))) if mode == "document" else (lambda i: 0)

    limit = None
    if tok is None:  # bpe:N, trained on the training documents only
        for c in (corpus, val_corpus):  # ids made with another tokenizer mean nothing to a new one
            if c is not None and c.pretokenized:
                raise MinimoeError(
                    f"{c.name} is already tokenized; pass the tokenizer it was made with, not {spec}"
                )
        # a stream split's validation tail is cut in tokens, after tokenizing: the tokenizer learns from
        # the text before it, with a margin for a tail that tokenizes shorter than the average
        limit = int(n_chars * (1 - val_fraction) * STREAM_BPE_MARGIN) if mode == "stream" else None
        tok = train_bpe(_train_texts(corpus, assign, limit), _bpe_vocab(spec))
    while True:
        tok.save(tmp / "tokenizer")
        dtype, writers, stats, max_id = _write_splits(
            corpus, val_corpus, tok, mode, assign, n_chars, tmp, val_fraction, workers, shard_tokens, progress
        )
        if limit is None:
            break
        # a tail that tokenizes much shorter than the average reaches back past the margin into the text
        # the tokenizer learned from: learn again from the text before the tail only, and tokenize again
        # (the limit shrinks every round)
        start = n_chars - _split_chars(tmp, tok, writers["val"], dtype)
        if start >= limit:
            break
        for p in tmp.glob("*.bin"):
            p.unlink()
        limit = int(start * STREAM_BPE_MARGIN)
        tok = train_bpe(_train_texts(corpus, assign, limit), _bpe_vocab(spec))
    for s in SPLITS:
        stats[s]["shards"] = [{"file": n, "tokens": t} for n, t in writers[s].shards if t > 0]
    if stats["train"]["tokens"] == 0:
        raise MinimoeError(f"{corpus.name} contains no text")
    return {
        "version": FORMAT_VERSION,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "tokenizer": {
            "kind": tok.kind,
            "spec": spec,
            "hash": tok.hash(),
            "vocab_size": tok.vocab_size,
            "eos_id": tok.eos_id,
            "bos_id": tok.bos_id,
            "pad_id": tok.pad_id,
        },
        "dtype": dtype.name,
        "split_mode": mode,
        "splits": stats,
        "documents": stats["train"]["documents"] + stats["val"]["documents"],
        "max_token_id": max_id,
        "skipped_files": {
            c.name: c.skipped for c in (corpus, val_corpus) if c is not None and any(c.skipped.values())
        },
    }


def _write_splits(
    corpus, val_corpus, tok, mode, assign, n_chars, tmp, val_fraction, workers, shard_tokens, progress
) -> tuple[np.dtype, dict, dict, int]:
    """Tokenize (or copy) the sources into shards under `tmp`; dtype, writers, stats and the largest id."""
    # ids < vocab_size <= 65536 fit in uint16
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    writers = {s: ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    stats = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in SPLITS}
    max_id = -1
    for c, forced in ((corpus, None), (val_corpus, "val")):
        if c is None:
            continue
        if c.pretokenized:
            max_id = max(
                max_id, copy_tokens(c, tok, writers[forced or "train"], stats[forced or "train"], progress)
            )
            stats[forced or "train"]["bytes"] = None
            continue
        if c is val_corpus:
            n_c = _count(c)
            if n_c[0] == 0:
                raise MinimoeError(f"{c.name} contains no text{_skipped_note(c)}")
            chars, a = n_c[1], (lambda i: 1)
        else:
            chars, a = n_chars, assign
        max_id = max(max_id, tokenize_corpus(c, tok, a, writers, stats, dtype, workers, chars, progress))
    for w in writers.values():
        w.close()
    if mode == "stream":
        move_tail(tmp, tok, writers, stats, val_fraction, dtype)
    return dtype, writers, stats, max_id


def _split_chars(tmp: Path, tok: Tokenizer, writer: ShardWriter, dtype: np.dtype) -> int:
    """Characters of text that a split's shards decode to (EOS is no text)."""
    step = 1 << 20
    n = 0
    for name, _ in writer.shards:
        ids = np.fromfile(tmp / name, dtype=dtype)
        n += sum(len(tok.decode(ids[i : i + step].tolist())) for i in range(0, len(ids), step))
    return n


def _skipped_note(c: Corpus) -> str:
    n = sum(c.skipped.values())
    return f" ({n} binary or non-UTF-8 files were skipped)" if n else ""


def _train_texts(corpus: Corpus, assign, limit: int | None = None) -> Iterator[str]:
    """The training documents' text (`assign(doc) == 0`), the first `limit` characters only if given."""
    doc, left = 0, limit
    for text, end in corpus.segments():
        if assign(doc) == 0:
            if left is not None:
                text = text[:left]
                left -= len(text)
            if text:
                yield text
            if left == 0:
                return
        doc += end
