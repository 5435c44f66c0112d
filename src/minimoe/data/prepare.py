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
- `val_source` given: all of it is validation (e.g. a held-out file);
- enough documents (val_fraction * documents >= MIN_VAL_DOCS): whole documents, spread evenly
  (document i is validation when floor((i+1) f) > floor(i f)), so no document is cut;
- otherwise the last val_fraction of the token stream (one long book, tinyshakespeare).
"""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing as mp
import os
import re
import shutil
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from minimoe.data.corpus import Corpus, open_source
from minimoe.data.tokenizer import Tokenizer, resolve_tokenizer, train_bpe
from minimoe.errors import MinimoeError

FORMAT_VERSION = 1
SHARD_TOKENS = 64 * 2**20  # tokens per shard file (128 MiB as uint16)
# With fewer expected validation documents than this, one document's length would decide the
# size of the validation set, so the split falls back to the tail of the token stream.
MIN_VAL_DOCS = 8
TASK_CHARS = 1 << 18  # characters of text per worker task: small enough to spread ~1 MB over 2 workers
SPLITS = ("train", "val")
_SHARD_RE = re.compile(r"^(train|val)_\d{3,}\.bin$")
_OWN_NAMES = {"meta.json", "meta.json.tmp", "tokenizer"}


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
        meta, why = _read_trusted(d)
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


# ---------------------------------------------------------------------- trust checks


def _read_trusted(d: Path) -> tuple[dict | None, str]:
    """meta.json of `d` if every file it lists exists with its exact size, else (None, why)."""
    mp_ = d / "meta.json"
    if not mp_.is_file():
        return None, "no meta.json" if d.is_dir() else "the folder does not exist"
    try:
        meta = json.loads(mp_.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None, "meta.json is not valid JSON"
    if not isinstance(meta, dict) or meta.get("version") != FORMAT_VERSION:
        return None, f"meta.json is not format version {FORMAT_VERSION}"
    for rel, size in meta.get("files", {}).items():
        p = d / rel
        if not p.is_file() or p.stat().st_size != size:
            return None, f"{rel} is missing or not {size} bytes"
    return meta, ""


def _check_ours(d: Path) -> None:
    """Refuse to replace a folder holding files we did not write (it may be the user's)."""
    if not d.exists():
        return
    if not d.is_dir():
        raise MinimoeError(f"prepared-data path {d} is a file, not a folder")
    for p in d.iterdir():
        if p.name not in _OWN_NAMES and not _SHARD_RE.match(p.name):
            raise MinimoeError(
                f"{d} holds files minimoe did not write ({p.name}); choose an empty or new folder for prepared data"
            )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _clean_stale(d: Path) -> None:
    """Remove temp/old siblings left by runs whose process is gone (killed mid-write)."""
    pat = re.compile(rf"^\.{re.escape(d.name)}\.(tmp|old)-(\d+)-[0-9a-f]+$")
    for p in d.parent.iterdir() if d.parent.is_dir() else []:
        m = pat.match(p.name)
        if m and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True)


@contextlib.contextmanager
def _lock(d: Path) -> Iterator[None]:
    """An exclusive lock per prepared folder, so concurrent runs (e.g. torchrun ranks) prepare once."""
    try:
        import fcntl
    except ImportError:  # Windows: no advisory locks; rank 0 should prepare alone
        yield
        return
    d.parent.mkdir(parents=True, exist_ok=True)
    with open(d.parent / f".{d.name}.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _write_json_atomic(path: Path, obj: dict) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


# ---------------------------------------------------------------------- shard writing


class _ShardWriter:
    """Appends token ids to `{split}_{i:03d}.bin` files of at most `shard_tokens` tokens."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.dir, self.split, self.dtype, self.shard_tokens = directory, split, dtype, shard_tokens
        self.shards: list[list] = []  # [file name, tokens]
        self._f = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        pos = 0
        while pos < len(ids):
            if self._f is None or self.shards[-1][1] == self.shard_tokens:
                self._close_file()
                name = f"{self.split}_{len(self.shards):03d}.bin"
                self._f = open(self.dir / name, "wb")
                self.shards.append([name, 0])
            take = min(len(ids) - pos, self.shard_tokens - self.shards[-1][1])
            self._f.write(ids[pos : pos + take].tobytes())
            self.shards[-1][1] += take
            pos += take

    def _close_file(self) -> None:
        if self._f is not None:
            self._f.flush()
            os.fsync(self._f.fileno())  # shards must be on disk before meta.json says they are
            self._f.close()
            self._f = None

    def close(self) -> None:
        self._close_file()


# ---------------------------------------------------------------------- worker side

# Each worker process builds the tokenizer once from the payload the pool initializer hands it;
# this per-process slot is how multiprocessing.Pool passes state to its workers.
_WORKER: dict[str, Any] = {}


def _init_worker(payload: dict, dtype: str) -> None:
    _WORKER["tok"] = Tokenizer.from_payload(payload)
    _WORKER["dtype"] = np.dtype(dtype)


def _encode_task(task: tuple[list[str], list[bool], list[int]]) -> dict:
    return _encode(_WORKER["tok"], _WORKER["dtype"], task)


def _encode(tok: Tokenizer, dtype: np.dtype, task: tuple[list[str], list[bool], list[int]]) -> dict:
    """Tokenize one task; returns per-split ids (EOS after each document end) and counts."""
    texts, ends, splits = task
    arrays = tok.encode_arrays(texts)
    eos = np.array([tok.eos_id], dtype=np.int64)
    out: dict[str, Any] = {"max_id": -1, "chars": sum(map(len, texts))}
    for s in (0, 1):
        pieces, nbytes, ndocs = [], 0, 0
        for text, end, split, ids in zip(texts, ends, splits, arrays):
            if split != s:
                continue
            pieces.append(ids)
            if end:
                pieces.append(eos)
                ndocs += 1
            nbytes += len(text.encode("utf-8"))
        ids = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        if len(ids):
            out["max_id"] = max(out["max_id"], int(ids.max()))
        out[SPLITS[s]] = (ids.astype(dtype), nbytes, ndocs)
    return out


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


def _tasks(corpus: Corpus, assign) -> Iterator[tuple[list[str], list[bool], list[int]]]:
    texts: list[str] = []
    ends: list[bool] = []
    splits: list[int] = []
    size, doc = 0, 0
    for text, end in corpus.segments():
        texts.append(text)
        ends.append(end)
        splits.append(assign(doc))
        doc += end
        size += len(text)
        if size >= TASK_CHARS:
            yield texts, ends, splits
            texts, ends, splits, size = [], [], [], 0
    if texts:
        yield texts, ends, splits


def _byte_count(tok: Tokenizer, ids: np.ndarray) -> int:
    """UTF-8 bytes that `ids` decode to (exact for the byte kind; BPE decodes in chunks)."""
    if tok.kind == "byte":
        return int(np.count_nonzero(ids < 256))
    step = 1 << 20
    return sum(len(tok.decode(ids[i : i + step].tolist()).encode("utf-8")) for i in range(0, len(ids), step))


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

    with _lock(out_dir):
        meta, _ = _read_trusted(out_dir)
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
                _write_json_atomic(out_dir / "meta.json", meta)
                return PreparedData(out_dir, meta, cached=True)
        _check_ours(out_dir)
        _clean_stale(out_dir)
        content = content or _content_hash(corpus, val_corpus)
        tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        tmp.mkdir(parents=True)
        try:
            meta = _build(corpus, val_corpus, tok, spec, tmp, val_fraction, workers, shard_tokens, progress)
            meta.update(params=params, sources=sources, content_hash=content)
            meta["files"] = {
                p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()
            }
            _write_json_atomic(tmp / "meta.json", meta)  # last: it is what makes the folder trusted
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
    return PreparedData(out_dir, meta, cached=False)


def _bpe_vocab(spec: str) -> int:
    try:
        return int(spec.partition(":")[2].replace("_", ""))
    except ValueError:
        raise MinimoeError(
            f"tokenizer spec {spec!r} must be bpe:VOCAB with an integer VOCAB, e.g. bpe:4096"
        ) from None


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

    if tok is None:  # bpe:N, trained on the training documents only
        if corpus.pretokenized:
            raise MinimoeError(
                f"{corpus.name} is already tokenized; pass the tokenizer it was made with, not {spec}"
            )
        tok = train_bpe(_train_texts(corpus, assign), _bpe_vocab(spec))
    tok.save(tmp / "tokenizer")
    # ids < vocab_size <= 65536 fit in uint16
    dtype = np.dtype(np.uint16 if tok.vocab_size <= 65536 else np.uint32)
    writers = {s: _ShardWriter(tmp, s, dtype, shard_tokens) for s in SPLITS}
    stats = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in SPLITS}
    max_id = -1
    for c, forced in ((corpus, None), (val_corpus, "val")):
        if c is None:
            continue
        if c.pretokenized:
            max_id = max(
                max_id, _copy_tokens(c, tok, writers[forced or "train"], stats[forced or "train"], progress)
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
        max_id = max(max_id, _tokenize(c, tok, a, writers, stats, dtype, workers, chars, progress))
    for w in writers.values():
        w.close()
    if mode == "stream":
        _move_tail(tmp, tok, writers, stats, val_fraction, dtype)
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


def _skipped_note(c: Corpus) -> str:
    n = sum(c.skipped.values())
    return f" ({n} binary or non-UTF-8 files were skipped)" if n else ""


def _train_texts(corpus: Corpus, assign) -> Iterator[str]:
    doc = 0
    for text, end in corpus.segments():
        if assign(doc) == 0:
            yield text
        doc += end


def _tokenize(corpus, tok, assign, writers, stats, dtype, workers, chars, progress) -> int:
    """Tokenize a text corpus into the writers, in a process pool when there is enough text."""
    max_id = -1
    bar = tqdm(
        total=chars,
        unit="char",
        unit_scale=True,
        desc=f"tokenize {Path(corpus.name).name}",
        disable=not progress,
    )
    t0, n_tok = time.perf_counter(), 0
    tasks = _tasks(corpus, assign)
    with contextlib.ExitStack() as stack:
        # The byte kind encodes at memory speed (~30M tokens/s in one process), faster than
        # pickling its results back from workers, so only HF kinds use the pool.
        if workers > 1 and chars > TASK_CHARS and tok.kind != "byte":
            results = stack.enter_context(_pool(tok, dtype, workers)).imap(_encode_task, tasks)
        else:
            results = (_encode(tok, dtype, t) for t in tasks)
        for r in results:
            for s in SPLITS:
                ids, nbytes, ndocs = r[s]
                writers[s].write(ids)
                stats[s]["tokens"] += len(ids)
                stats[s]["bytes"] += nbytes
                stats[s]["documents"] += ndocs
                n_tok += len(ids)
            max_id = max(max_id, r["max_id"])
            bar.update(r["chars"])
            bar.set_postfix(tok_per_s=f"{n_tok / max(time.perf_counter() - t0, 1e-9):.3g}", refresh=False)
    bar.close()
    return max_id


@contextlib.contextmanager
def _pool(tok: Tokenizer, dtype: np.dtype, workers: int):
    # fork where the platform has it: fast start, and no re-import of the caller's __main__
    # (spawn would re-run an unguarded user script).
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    # HF tokenizers warns after a fork once its thread pool was used (e.g. by BPE training) unless
    # TOKENIZERS_PARALLELISM is set; workers are single-threaded on purpose (one per process).
    old = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = mp.get_context(method).Pool(
            workers, initializer=_init_worker, initargs=(tok.payload(), dtype.name)
        )
    finally:
        if old is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = old
    try:
        yield pool
    finally:
        pool.terminate()
        pool.join()


def _copy_tokens(corpus, tok: Tokenizer, writer: _ShardWriter, stat: dict, progress: bool) -> int:
    """Copy a pre-tokenized array into shards, checking its ids fit the tokenizer."""
    arr = corpus.tokens()
    step = 1 << 24
    max_id = -1
    for i in tqdm(range(0, len(arr), step), desc=f"copy {Path(corpus.name).name}", disable=not progress):
        chunk = np.asarray(arr[i : i + step])
        lo, hi = int(chunk.min()), int(chunk.max())
        if lo < 0:
            raise MinimoeError(f"{corpus.name} holds a negative token id ({lo})")
        if hi >= tok.vocab_size:
            raise MinimoeError(
                f"{corpus.name} holds token id {hi} but the tokenizer has {tok.vocab_size} entries; "
                "pass the tokenizer the array was made with"
            )
        max_id = max(max_id, hi)
        writer.write(chunk)
    stat["tokens"] += len(arr)
    return max_id


def _move_tail(
    tmp: Path, tok: Tokenizer, writers: dict, stats: dict, val_fraction: float, dtype: np.dtype
) -> None:
    """Stream split: move the last val_fraction of the train tokens into val shards."""
    total = stats["train"]["tokens"]
    k = int(total * val_fraction)
    if k == 0:
        return
    tail, need = [], k
    shards = writers["train"].shards
    while need > 0:
        name, n = shards[-1]
        take = min(need, n)
        path = tmp / name
        arr = np.fromfile(path, dtype=dtype)
        tail.append(arr[n - take :].copy())
        del arr
        os.truncate(path, (n - take) * dtype.itemsize)
        shards[-1][1] -= take
        if shards[-1][1] == 0:
            path.unlink()
            shards.pop()
        need -= take
    ids = np.concatenate(tail[::-1])
    val_writer = writers["val"]
    val_writer.write(ids)
    val_writer.close()
    stats["val"]["tokens"], stats["train"]["tokens"] = k, total - k
    val_bytes = _byte_count(tok, ids)
    stats["val"]["bytes"] = val_bytes
    if stats["train"]["bytes"] is not None:
        stats["train"]["bytes"] -= val_bytes
