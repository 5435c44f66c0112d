"""`open_source(spec)`: the Corpus for a data spec (a file, folder, JSONL/Parquet, token array, `hf:`
dataset or the built-in corpus). It sits above `corpus` and `hf_source`, which it chooses between."""

from __future__ import annotations

from pathlib import Path

from minimoe.data.corpus import (
    TOKEN_SUFFIXES,
    BuiltinCorpus,
    Corpus,
    FolderCorpus,
    JsonlCorpus,
    ParquetCorpus,
    TextFileCorpus,
    TokenArrayCorpus,
    checked_path,
)
from minimoe.data.records import JSON_SUFFIXES


def open_source(
    spec: str | Path | Corpus | None,
    text_field: str = "text",
    glob: str = "**/*",
    cache_dir: str | None = None,
) -> Corpus:
    """Open a document source.

    Args:
        spec: None (built-in corpus), a text file, a folder, a .jsonl/.ndjson/.json or .parquet file,
            a .npy/.bin token array, `hf:NAME_OR_PATH[?name=CONFIG&split=SPLIT]`, or a Corpus.
        text_field: the text field of JSON/Parquet/datasets records, in a folder's files too.
        glob: which files of a folder to read.
        cache_dir: the `datasets` cache for `hf:` sources (None = its default).
    Returns:
        The Corpus. Raises MinimoeError for a missing path.
    """
    if isinstance(spec, Corpus):
        return spec
    if spec is None:
        return BuiltinCorpus()
    if isinstance(spec, str) and spec.startswith("hf:"):
        from minimoe.data.hf_source import HFCorpus  # imports `datasets`: only when asked for

        return HFCorpus(spec, text_field=text_field, cache_dir=cache_dir)
    path = checked_path(spec)
    if path.is_dir():
        return FolderCorpus(path, glob, text_field=text_field)
    suffix = path.suffix.lower()
    if suffix in JSON_SUFFIXES:
        return JsonlCorpus(path, text_field)
    if suffix == ".parquet":
        return ParquetCorpus(path, text_field)
    if suffix in TOKEN_SUFFIXES:
        return TokenArrayCorpus(path)
    return TextFileCorpus(path)
