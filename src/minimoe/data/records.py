"""Record files: JSON Lines, .json files of records and Parquet, one document per record's text field.

`json_records`/`iter_jsonl` parse JSON data (training data, eval task files and chat data all read
through them) and `record_texts` checks a record's text. `folder_file_is_records` decides how a folder
reads a file: a .json file beside code is often ordinary JSON (package.json), which is text.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from minimoe.errors import MinimoeError, require

# JSON records, one document per record's text field: JSON Lines, and .json files that hold JSON Lines or
# one JSON array of records (the two forms the Hugging Face json builder reads)
JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
RECORD_SUFFIXES = (*JSON_SUFFIXES, ".parquet")  # files whose documents are records, not the file's text

# what a missing text field's error adds: the two settings that choose another field
TEXT_FIELD_HINT = "; data.text_field=NAME (minimoe train) or --text-field NAME (minimoe eval) reads another"
# and, for a file inside a folder, how to leave it out instead
FOLDER_HINT = ", or data.glob=PATTERN reads only the folder's files that match"


def json_segments(path: Path, field: str, hint: str = TEXT_FIELD_HINT) -> Iterator[tuple[str, bool]]:
    """The `field` text of every record of a JSON data file (see `json_records`), as segments."""
    for where, rec in json_records(path):
        if not isinstance(rec, dict) or field not in rec:
            keys = ", ".join(map(str, rec)) if isinstance(rec, dict) else type(rec).__name__
            raise MinimoeError(f"{where} has no '{field}' field (it has: {keys}){hint}")
        yield from record_texts(rec[field], where, field)


def json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record) for each record of a JSON data file, `where` naming the file and line or record.

    JSON Lines; a .json file starting with `[` is one JSON array of records instead, read whole as the
    Hugging Face json builder reads it (a string item is the record {"text": item}).
    """
    if path.suffix.lower() != ".json":
        for n, rec in iter_jsonl(path):
            yield f"{path} line {n}", rec
        return
    with open(path, "rb") as f:
        array = f.read(1 << 16).removeprefix(b"\xef\xbb\xbf").lstrip().startswith(b"[")
    if not array:
        note = "; a .json data file holds JSON Lines or one JSON array of records"
        for n, rec in iter_jsonl(path, note=note):
            yield f"{path} line {n}", rec
        return
    try:
        with open(path, encoding="utf-8") as f:
            items = json.loads(f.read().removeprefix("\ufeff"))
    except UnicodeDecodeError:
        raise MinimoeError(f"{path} is not UTF-8 text; convert it to UTF-8 first") from None
    except json.JSONDecodeError as e:
        raise MinimoeError(f"{path} is not valid JSON (line {e.lineno}: {e.msg})") from None
    for i, item in enumerate(items, 1):
        yield f"{path} record {i}", {"text": item} if isinstance(item, str) else item


def iter_jsonl(path: Path, name: str | None = None, note: str = "") -> Iterator[tuple[int, Any]]:
    """(line number, parsed value) for each non-blank line of a JSON Lines file (a leading UTF-8
    byte-order mark is dropped). Training data, eval task files and chat data all read through it.

    Raises MinimoeError naming the file (as `name`, default its path) and line for invalid JSON (`note`
    appended), and the file for bytes that are not UTF-8. Callers check the shape of each value themselves.
    """
    name = name or str(path)
    try:
        with open(path, encoding="utf-8-sig") as f:  # a UTF-8 byte-order mark is not JSON, as in text files
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield n, json.loads(line)
                except json.JSONDecodeError as e:
                    raise MinimoeError(f"{name} line {n} is not valid JSON ({e.msg}){note}") from None
    except UnicodeDecodeError:
        raise MinimoeError(f"{name} is not UTF-8 text; convert it to UTF-8 first") from None


def record_texts(value: Any, where: str, field: str) -> Iterator[tuple[str, bool]]:
    if value is None:
        return
    if not isinstance(value, str):
        raise MinimoeError(f"{where}: field '{field}' holds {type(value).__name__}, not text")
    try:
        value.encode("utf-8")  # JSON may escape a lone surrogate ("\ud800"), which no tokenizer takes
    except UnicodeEncodeError as e:
        raise MinimoeError(
            f"{where}: field '{field}' holds an unpaired surrogate ({value[e.start]!r}), not valid Unicode text"
        ) from None
    if value.strip():
        yield value, True


def parquet_segments(path: Path, field: str, hint: str = TEXT_FIELD_HINT) -> Iterator[tuple[str, bool]]:
    """The `field` column of a Parquet file, one document per row, read in batches."""
    require("a Parquet data file", "pyarrow")
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises ArrowInvalid/OSError subclasses
        raise MinimoeError(f"{path} is not a readable Parquet file ({e})") from None
    names = pf.schema_arrow.names
    if field not in names:
        raise MinimoeError(f"{path} has no column '{field}' (it has: {', '.join(names)}){hint}")
    for batch in pf.iter_batches(columns=[field], batch_size=1024):
        for value in batch.column(0).to_pylist():
            yield from record_texts(value, str(path), field)


# how much of a folder's .json file is read at first to find its first record (more, doubling, only
# while that record is longer)
PEEK_CHARS = 1 << 16


def folder_file_is_records(path: Path, field: str) -> bool:
    """Whether a folder reads `path` as records (its `field` values) rather than as the file's text.

    .jsonl/.ndjson and .parquet files are records. A .json file is records only when it holds them:
    JSON Lines whose first value is an object with `field`, or one JSON array whose first item is one
    or a string (the record {"text": item}). Other JSON, such as a pretty-printed package.json or a
    tsconfig.json beside code, is text like the folder's other files, not a reason to refuse the
    folder; a .json file given alone is still records or refused (`json_records`).
    """
    suffix = path.suffix.lower()
    if suffix != ".json":
        return suffix in RECORD_SUFFIXES
    rec = _first_json_record(path)
    return isinstance(rec, dict) and field in rec


def _first_json_record(path: Path) -> Any:
    """The first record of a .json file as `json_records` gives it, read no further than needed; None
    when the file is not UTF-8 or its first line or array item is not JSON."""
    size, head = PEEK_CHARS, ""
    try:
        with open(path, encoding="utf-8-sig") as f:
            while True:
                part = f.read(size)
                head, done = head + part, len(part) < size
                body = head.lstrip()
                if body.startswith("["):
                    try:  # the first item alone; an error may only mean it goes on past `head`
                        item, _ = json.JSONDecoder().raw_decode(body, len(body) - len(body[1:].lstrip()))
                        return {"text": item} if isinstance(item, str) else item
                    except json.JSONDecodeError:
                        pass
                else:
                    line, newline, _ = body.partition("\n")
                    if newline or done:
                        try:
                            return json.loads(line)
                        except json.JSONDecodeError:
                            return None
                if done:
                    return None
                size *= 2
    except UnicodeDecodeError:
        return None
