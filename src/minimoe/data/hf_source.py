"""Hugging Face `datasets` as a document source (`hf:NAME_OR_PATH[?name=CONFIG&split=SPLIT]`); the
`datasets` package (the `data` extra) is imported only when such a source is read."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl

from minimoe.data.corpus import Corpus
from minimoe.data.records import TEXT_FIELD_HINT, record_texts
from minimoe.errors import MinimoeError, require
from minimoe.files import visible_files


class HFCorpus(Corpus):
    """A Hugging Face `datasets` dataset: `hf:NAME_OR_PATH[?name=CONFIG&split=SPLIT]`.

    A local data file (.json/.jsonl/.csv/.parquet/.txt) or folder is read with datasets' packaged
    builders; a hub name needs the network.
    """

    kind = "hf"
    BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet", ".txt": "text"}
    SAVED = ("state.json", "dataset_dict.json")  # a folder written by save_to_disk (Dataset, DatasetDict)

    def __init__(self, spec: str, text_field: str = "text", cache_dir: str | None = None):
        target, _, query = spec[3:].partition("?")
        try:  # strict: a part without `=` (a typo such as `?split`) is an error, not dropped
            opts = dict(parse_qsl(query, keep_blank_values=True, strict_parsing=True))
        except ValueError:
            opts = {"": ""}
        unknown = set(opts) - {"name", "split", "revision"}
        if not target or unknown or not all(opts.values()):
            raise MinimoeError(f"data source {spec!r} must be hf:NAME_OR_PATH[?name=CONFIG&split=SPLIT]")
        local = Path(target).expanduser()
        if local.is_dir():
            # as datasets resolves a local folder: hidden files and folders left out
            files = sorted(p for _, p in visible_files(local))
            root: Path | None = local
        elif local.is_file():
            files, root = [local], None
        else:
            files, root = [], None
        params = {"target": target, "text_field": text_field, **opts}
        super().__init__(spec, files, root=root, params=params)
        self.local = local if (local.is_dir() or local.is_file()) else None
        self.target, self.opts, self.text_field, self.cache_dir = target, opts, text_field, cache_dir
        self._ds = None

    def dataset(self):
        """The loaded dataset split (loaded once per Corpus object)."""
        if self._ds is not None:
            return self._ds
        require("an hf: data source", "datasets")
        import datasets

        split = self.opts.get("split", "train")
        kwargs: dict[str, Any] = {"split": split, "cache_dir": self.cache_dir}
        try:
            if self.local is not None and self.local.is_file():
                builder = self.BUILDERS.get(self.local.suffix.lower())
                if builder is None:
                    raise MinimoeError(
                        f"{self.local} has a suffix datasets cannot read ({', '.join(self.BUILDERS)})"
                    )
                ds = datasets.load_dataset(builder, data_files=str(self.local), **kwargs)
            elif self.local is not None and any((self.local / f).is_file() for f in self.SAVED):
                ds = datasets.load_from_disk(str(self.local))  # Dataset(Dict).save_to_disk's folder
                if isinstance(ds, datasets.DatasetDict):
                    if split not in ds:
                        raise MinimoeError(f"{self.local} has no split {split!r} (it has: {', '.join(ds)})")
                    ds = ds[split]
            else:  # a local folder by its expanded path (datasets reads "~/x" as a hub name), or a hub name
                where = str(self.local) if self.local is not None else self.target
                ds = datasets.load_dataset(
                    where, self.opts.get("name"), revision=self.opts.get("revision"), **kwargs
                )
        except MinimoeError:
            raise
        except Exception as e:  # offline hub lookups, missing splits, bad files: all one sentence
            first = (str(e).strip().splitlines() or [type(e).__name__])[0]
            where = "local files" if self.local is not None else "the hub (this needs the network)"
            raise MinimoeError(
                f"could not load Hugging Face dataset {self.target!r} from {where}: {first}"
            ) from None
        if self.text_field not in ds.column_names:
            raise MinimoeError(
                f"dataset {self.target!r} has no column '{self.text_field}' (it has: {', '.join(ds.column_names)})"
                + TEXT_FIELD_HINT
            )
        self._ds = ds
        return ds

    def segments(self) -> Iterator[tuple[str, bool]]:
        ds = self.dataset()
        for batch in ds.select_columns([self.text_field]).iter(batch_size=1000):
            for value in batch[self.text_field]:
                yield from record_texts(value, self.target, self.text_field)

    def describe(self) -> dict[str, Any]:
        d = super().describe()
        if self.local is None:
            d["fingerprint"] = self.dataset()._fingerprint
        return d

    def content_hash(self) -> str:
        if self.local is not None:
            return super().content_hash()
        # hub dataset: datasets' fingerprint identifies the cached arrow data
        return hashlib.sha256(json.dumps([self.params, self.dataset()._fingerprint]).encode()).hexdigest()
