"""Document sources: text files and folders, JSONL, Parquet, Hugging Face datasets, already-tokenized
arrays, and the built-in corpus (the Python standard library's own source).

`open_source(spec)` (in `sources.py`) returns a `Corpus`. A folder reads each file by its suffix: JSON
records and Parquet rows give their text field, other files (ordinary JSON too) are text. A text corpus yields *segments*
`(text, end_of_document)`: documents over `SEGMENT_CHARS` are cut at a newline into several segments,
so one huge file is tokenized in parallel and never held in memory whole; EOS goes only after the last
segment.
`describe()` lists the files with sizes and mtimes (a cheap change check) and `content_hash()`
hashes what the documents are made of (the cache key).
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from minimoe.data.records import (
    FOLDER_HINT,
    RECORD_SUFFIXES,
    TEXT_FIELD_HINT,
    folder_file_is_records,
    json_segments,
    parquet_segments,
)
from minimoe.errors import MinimoeError
from minimoe.files import visible_files

EOT = "<|endoftext|>"
# Documents longer than this many characters are tokenized in pieces cut at a newline.
SEGMENT_CHARS = 1 << 20
READ_CHARS = 1 << 22
TOKEN_SUFFIXES = (".npy", ".bin")

# Built-in corpus: stdlib *.py minus tests, GUI/demo code, vendored or deprecated trees and
# generated tables (encodings/ are charmap tables, pydoc_data/ is prose, _sysconfigdata* is
# machine-specific). What is left is 389 files, 7.8 MB of ordinary Python on CPython 3.11.
BUILTIN_SKIP_DIRS = frozenset(
    {
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "lib2to3",
        "distutils",
        "ensurepip",
        "encodings",
        "pydoc_data",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "__pycache__",
    }
)


# A separator line: "\n<|endoftext|>\n", or with "\r\n" line ends (the "\r" before it is
# dropped from the document's text), so CRLF files split too.
_SEP_RE = re.compile(r"\n" + re.escape(EOT) + r"\r?\n")
_SEP_MAX = len(EOT) + 4


def split_documents(chunks: Iterable[str], max_chars: int = SEGMENT_CHARS) -> Iterator[tuple[str, bool]]:
    """Split a text stream into documents at lines holding just `<|endoftext|>` (LF or CRLF line ends).

    Args:
        chunks: consecutive pieces of one file's text.
        max_chars: longer documents come out as several segments cut before a newline.
    Returns:
        An iterator of `(text, end_of_document)`. Whitespace-only documents are dropped; a file
        without separator lines is one document, its text unchanged.
    """
    # A virtual "\n" before the stream and after it lets separators on the first or last line
    # match too; each document then starts with exactly one "\n" that is not its own.
    buf, start, at_doc_start = "\n", 0, True
    for chunk in itertools.chain(chunks, [None]):
        final = chunk is None
        buf = buf[start:] + ("\n" if final else chunk)
        start = 0
        while m := _SEP_RE.search(buf, start):
            text = buf[start + 1 if at_doc_start else start : m.start()].removesuffix("\r")
            if not at_doc_start or text.strip():
                yield text, True
            start, at_doc_start = m.end() - 1, True  # keep the "\n": it starts the next doc
        if final:
            text = buf[start + 1 if at_doc_start else start : -1]
            if not at_doc_start or text.strip():
                yield text, True
            return
        while len(buf) - start > max_chars + _SEP_MAX:
            # No separator in buf[start:], so cutting before a newline cannot split one.
            i = buf.rfind("\n", start + 1, start + max_chars)
            i = start + max_chars if i < 0 else i
            yield buf[start + 1 if at_doc_start else start : i], False
            start, at_doc_start = i, False


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    return h.hexdigest()


def _stat(path: Path, root: Path | None = None) -> list:
    st = path.stat()
    return [str(path.relative_to(root)) if root else str(path), st.st_size, st.st_mtime_ns]


class Corpus:
    """A source of documents. Subclasses set `kind`, `name` and `files`, and yield segments."""

    kind: str = "corpus"
    pretokenized: bool = False

    def __init__(self, name: str, files: list[Path], root: Path | None = None, params: dict | None = None):
        self.name = name  # how messages refer to it
        self.files = files
        self.root = root
        self.params = params or {}
        # Files skipped while iterating a folder (binary, not UTF-8): counts and paths, filled by segments()
        self.skipped: dict[str, int] = {}
        self.skipped_files: list[str] = []

    def segments(self) -> Iterator[tuple[str, bool]]:
        """`(text, end_of_document)` pairs; see `split_documents`."""
        raise NotImplementedError

    def documents(self) -> Iterator[str]:
        """Whole documents (segments joined); for BPE training and tests."""
        parts: list[str] = []
        for text, end in self.segments():
            parts.append(text)
            if end:
                yield "".join(parts)
                parts = []

    def describe(self) -> dict[str, Any]:
        """Kind, parameters and files with size and mtime: equal descriptions mean unchanged input."""
        return {
            "kind": self.kind,
            "name": self.name,
            "params": self.params,
            "files": [_stat(f, self.root) for f in self.files],
        }

    def content_hash(self) -> str:
        """sha256 over the kind, parameters and the bytes of every file, in order."""
        h = hashlib.sha256(json.dumps([self.kind, self.params], sort_keys=True).encode())
        for f in self.files:
            h.update(str(f.relative_to(self.root) if self.root else f.name).encode() + b"\0")
            h.update(_file_hash(f).encode())
        return h.hexdigest()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r}, files={len(self.files)})"


class TextFileCorpus(Corpus):
    """One UTF-8 text file; documents separated by `<|endoftext|>` lines, else one document."""

    kind = "text"

    def __init__(self, path: Path):
        super().__init__(str(path), [path])

    def segments(self) -> Iterator[tuple[str, bool]]:
        path = self.files[0]
        with open(path, "rb") as f:
            if b"\0" in f.read(8192):
                raise MinimoeError(f"{path} is a binary file (it contains NUL bytes), not text")
        try:
            yield from split_documents(_read_chunks(path))
        except UnicodeDecodeError:
            raise MinimoeError(f"{path} is not UTF-8 text; convert it to UTF-8 first") from None


def _read_chunks(path: Path) -> Iterator[str]:
    # newline="": keep "\r\n" as written, so token counts and bytes match the file
    with open(path, encoding="utf-8", newline="") as f:
        first = True
        while chunk := f.read(READ_CHARS):
            if first and chunk.startswith("\ufeff"):
                chunk = chunk[1:]  # a UTF-8 byte-order mark is not text
            first = False
            yield chunk


def _glob_regex(pattern: str) -> re.Pattern:
    """A glob over '/'-separated relative paths: `**/` is zero or more folders, `*` and `?` stay
    within one name, `[...]` is a character class."""
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out.append("(?:.*/)?")
            i += 3
        elif pattern.startswith("**", i):
            out.append(".*")
            i += 2
        elif pattern[i] == "*":
            out.append("[^/]*")
            i += 1
        elif pattern[i] == "?":
            out.append("[^/]")
            i += 1
        elif pattern[i] == "[" and (j := pattern.find("]", i + 2)) > 0:
            body = pattern[i + 1 : j]
            out.append("[" + ("^" + body[1:] if body[0] == "!" else body).replace("\\", "\\\\") + "]")
            i = j + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    try:
        return re.compile("".join(out) + r"\Z")
    except re.error as e:  # a character class such as [z-a] or [!]
        raise MinimoeError(f"glob {pattern!r} is not a valid pattern ({e.msg})") from None


def _walk(root: Path, glob: str, skip_dirs: frozenset) -> list[Path]:
    """Files under `root` matching `glob`, sorted by relative path; hidden names and `skip_dirs` are left
    out (`visible_files`)."""
    match = _glob_regex(glob.removeprefix("./")).match
    found = [(rel, path) for rel, path in visible_files(root, skip_dirs) if match(rel)]
    return [p for _, p in sorted(found) if p.is_file()]


class FolderCorpus(Corpus):
    """Files under a folder matching a glob, in sorted order, each read by its suffix: JSON records and
    Parquet rows give their `text_field`, as the same file alone would; other files are text, where
    binary and non-UTF-8 files are skipped and counted in `skipped`. A .json file is records only when
    it holds records (`folder_file_is_records`); ordinary JSON beside code is text. Hidden files and
    folders (names starting with '.') are left out."""

    kind = "folder"

    def __init__(
        self,
        root: Path,
        glob: str = "**/*",
        name: str | None = None,
        skip_dirs: frozenset = frozenset(),
        text_field: str = "text",
    ):
        files = _walk(root, glob, skip_dirs)
        params = {"glob": glob}
        if any(f.suffix.lower() in RECORD_SUFFIXES for f in files):
            # what the records' documents are made of, and whether a .json file holds records at all
            params["text_field"] = text_field
        super().__init__(name or str(root), files, root=root, params=params)
        self.text_field = text_field

    def segments(self) -> Iterator[tuple[str, bool]]:
        self.skipped, self.skipped_files = {"binary": 0, "not_utf8": 0}, []
        for f in self.files:
            if folder_file_is_records(f, self.text_field):
                read = parquet_segments if f.suffix.lower() == ".parquet" else json_segments
                yield from read(f, self.text_field, TEXT_FIELD_HINT + FOLDER_HINT)
                continue
            data = f.read_bytes()
            if b"\0" in data:
                self.skipped["binary"] += 1
                self.skipped_files.append(f.relative_to(self.root).as_posix())
                continue
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self.skipped["not_utf8"] += 1
                self.skipped_files.append(f.relative_to(self.root).as_posix())
                continue
            yield from split_documents([text.removeprefix("\ufeff")])


class BuiltinCorpus(FolderCorpus):
    """The Python standard library's *.py files (see BUILTIN_SKIP_DIRS): present on every machine."""

    kind = "builtin"

    def __init__(self) -> None:
        root = Path(sysconfig.get_paths()["stdlib"])
        super().__init__(
            root, "**/*.py", name="the built-in corpus (Python stdlib)", skip_dirs=BUILTIN_SKIP_DIRS
        )
        self.files = [f for f in self.files if not f.name.startswith("_sysconfigdata")]
        self.params["python"] = ".".join(map(str, sys.version_info[:3]))


class JsonlCorpus(Corpus):
    """JSON records (JSON Lines, or a .json array of records): one document per record, from `text_field`."""

    kind = "jsonl"

    def __init__(self, path: Path, text_field: str = "text"):
        super().__init__(str(path), [path], params={"text_field": text_field})
        self.text_field = text_field

    def segments(self) -> Iterator[tuple[str, bool]]:
        return json_segments(self.files[0], self.text_field)


class ParquetCorpus(Corpus):
    """Parquet: one document per row, from the string column `text_field` (read in batches)."""

    kind = "parquet"

    def __init__(self, path: Path, text_field: str = "text"):
        super().__init__(str(path), [path], params={"text_field": text_field})
        self.text_field = text_field

    def segments(self) -> Iterator[tuple[str, bool]]:
        return parquet_segments(self.files[0], self.text_field)


class TokenArrayCorpus(Corpus):
    """Already-tokenized ids: a 1-D integer `.npy`, or a nanoGPT-style `.bin` of raw uint16.

    They bypass tokenization; pass the tokenizer they were made with.
    """

    kind = "tokens"
    pretokenized = True

    def __init__(self, path: Path):
        super().__init__(str(path), [path])

    def tokens(self) -> np.ndarray:
        """The ids, memory-mapped (not read into memory)."""
        path = self.files[0]
        if path.suffix == ".npy":
            try:
                arr = np.load(path, mmap_mode="r", allow_pickle=False)
            except ValueError as e:
                raise MinimoeError(f"{path} is not a readable .npy array ({e})") from None
            if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                raise MinimoeError(
                    f"{path} holds a {arr.ndim}-D {arr.dtype} array; token ids must be 1-D integers"
                )
        else:
            size = path.stat().st_size
            if size % 2:
                raise MinimoeError(
                    f"{path} has an odd size ({size} bytes); a .bin must be raw uint16 token ids"
                )
            if size == 0:
                raise MinimoeError(f"{path} contains no tokens")
            arr = np.memmap(path, dtype=np.uint16, mode="r")
        if arr.size == 0:
            raise MinimoeError(f"{path} contains no tokens")
        return arr

    def segments(self) -> Iterator[tuple[str, bool]]:
        raise MinimoeError(f"{self.name} holds token ids, not text")


def checked_path(spec: str | Path, what: str = "data path") -> Path:
    """`spec` as an absolute path to an existing regular file or folder, or MinimoeError: a missing
    path, a symlink loop, or a device, pipe or socket (reading /dev/zero would never end)."""
    import stat

    path = Path(spec).expanduser()
    try:
        mode = path.stat().st_mode
        path = path.resolve()
    except (OSError, RuntimeError) as e:  # Python 3.11 raises RuntimeError for a symlink loop in resolve()
        if isinstance(e, FileNotFoundError):
            raise MinimoeError(f"{what} {path} does not exist") from None
        if isinstance(e, RuntimeError) or getattr(e, "errno", None) == 40:  # ELOOP
            raise MinimoeError(f"{what} {path} is a symbolic link loop") from None
        raise MinimoeError(f"{what} {path} cannot be read ({e.strerror or e})") from None
    if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
        raise MinimoeError(
            f"{what} {path} is not a regular file or folder (a device, pipe or socket); give a file or folder"
        )
    return path
