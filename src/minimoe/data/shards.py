"""Tokenizing a corpus into token shards: text cut into tasks, encoded in a process pool (or in this
process), and appended to `{split}_{i:03d}.bin` files; pre-tokenized arrays are copied and checked;
a stream split moves the tail of the train tokens into validation shards."""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from minimoe.data.corpus import Corpus
from minimoe.data.tokenizer import Tokenizer
from minimoe.errors import MinimoeError

TASK_CHARS = 1 << 18  # characters of text per worker task: small enough to spread ~1 MB over 2 workers
SPLITS = ("train", "val")


class ShardWriter:
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


def text_tasks(corpus: Corpus, assign) -> Iterator[tuple[list[str], list[bool], list[int]]]:
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


def byte_count(tok: Tokenizer, ids: np.ndarray) -> int:
    """UTF-8 bytes that `ids` decode to (exact for the byte kind; BPE decodes in chunks)."""
    if tok.kind == "byte":
        return int(np.count_nonzero(ids < 256))
    step = 1 << 20
    return sum(len(tok.decode(ids[i : i + step].tolist()).encode("utf-8")) for i in range(0, len(ids), step))


def tokenize_corpus(corpus, tok, assign, writers, stats, dtype, workers, chars, progress) -> int:
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
    tasks = text_tasks(corpus, assign)
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
        # more processes than cores only add start-up and memory (data.workers=100000 would fork that many)
        pool = mp.get_context(method).Pool(
            min(workers, os.cpu_count() or 1), initializer=_init_worker, initargs=(tok.payload(), dtype.name)
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


def copy_tokens(corpus, tok: Tokenizer, writer: ShardWriter, stat: dict, progress: bool) -> int:
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


def move_tail(
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
    val_bytes = byte_count(tok, ids)
    stats["val"]["bytes"] = val_bytes
    if stats["train"]["bytes"] is not None:
        stats["train"]["bytes"] -= val_bytes
