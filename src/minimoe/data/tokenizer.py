"""Tokenizers: byte-level (native), BPE trained on the user's data, and any pretrained tokenizer.json.

All three share one wrapper, `Tokenizer`, saved as a Hugging Face `tokenizer.json` plus a small
`minimoe_tokenizer.json` with what HF files do not pin down (kind, EOS/BOS/PAD, chat template).
The byte kind is encoded natively (`str.encode`), but its saved `tokenizer.json` is an exact HF
equivalent (byte vocabulary in id order, no merges, no regex split), so exports load anywhere.

Special-token strings that occur in the text (e.g. a literal `<|endoftext|>`) are matched as the
special token by every kind, as Hugging Face `tokenizers` does by default.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import numpy as np

from minimoe.data.pretrained import KNOWN, is_named, named_tokenizer_path
from minimoe.errors import MinimoeError
from minimoe.files import read_json_object

Kind = Literal["byte", "bpe", "pretrained"]

EOT = "<|endoftext|>"
PAD = "<|pad|>"
HF_FILE = "tokenizer.json"
META_FILE = "minimoe_tokenizer.json"
META_FORMAT = 1
# Tried in order when neither our metadata nor tokenizer_config.json names the EOS token.
EOS_CANDIDATES = (EOT, "</s>", "<eos>", "<|end_of_text|>", "<|im_end|>", "<|eot_id|>")


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table, as HF's ByteLevel uses it."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    bs += list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


@lru_cache(maxsize=1)
def _unicode_to_bytes() -> dict[str, int]:
    """GPT-2's printable character -> byte table, the inverse of `_bytes_to_unicode`."""
    return {c: b for b, c in _bytes_to_unicode().items()}


def _byte_level_hf():
    """An HF tokenizer that gives exactly the native byte ids: id b for byte b, 256 EOT, 257 PAD."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer

    table = _bytes_to_unicode()
    hf = HFTokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    # use_regex=False: no word split, so every byte stays its own token; no prefix space.
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    hf.decoder = decoders.ByteLevel()
    hf.add_special_tokens([AddedToken(EOT, special=True), AddedToken(PAD, special=True)])
    return hf


class Tokenizer:
    """One tokenizer interface over the byte, trained-BPE and pretrained kinds.

    Build one with `Tokenizer.byte()`, `train_bpe(...)`, `Tokenizer.load(path)` or `resolve_tokenizer(spec)`.
    `eos_id` is always set (documents are separated by it); `pad_id` falls back to `eos_id`; `bos_id` may be None.
    """

    def __init__(
        self,
        kind: Kind,
        hf: Any | None,
        eos_token: str,
        bos_token: str | None = None,
        pad_token: str | None = None,
        chat_template: str | None = None,
    ) -> None:
        self.kind: Kind = kind
        self._hf = hf
        self.chat_template = chat_template
        self.eos_token = eos_token
        self.bos_token = bos_token
        self.pad_token = pad_token if pad_token is not None else eos_token
        if kind == "byte":
            self._specials = {EOT: 256, PAD: 257}
            self.vocab_size = 258
        else:
            # a tokenizer.json may be saved with truncation or padding on (for some fine-tuning job);
            # they would cut every document to max_length or pad it with PAD ids, so they are turned off
            hf.no_truncation()
            hf.no_padding()
            vocab = hf.get_vocab(with_added_tokens=True)
            # max id + 1, not len(vocab): some tokenizer.json files leave holes in the id range.
            self.vocab_size = max(vocab.values()) + 1
            self._specials = {t.content: i for i, t in hf.get_added_tokens_decoder().items() if t.special}
        self.eos_id = self._token_id(eos_token, "eos")
        self.bos_id = self._token_id(bos_token, "bos") if bos_token is not None else None
        self.pad_id = self._token_id(self.pad_token, "pad")
        # byte kind: one regex that splits out special-token strings, as HF matches them in text
        self._special_re = (
            re.compile("(" + "|".join(re.escape(s) for s in self._specials) + ")") if kind == "byte" else None
        )

    def _token_id(self, token: str, role: str) -> int:
        if self.kind == "byte":
            tid = self._specials.get(token)
        else:
            tid = self._hf.token_to_id(token)
        if tid is None:
            raise MinimoeError(f"the {role} token {token!r} is not in the tokenizer's vocabulary")
        return int(tid)

    # ------------------------------------------------------------------ constructors

    @classmethod
    def byte(cls) -> Tokenizer:
        """Byte-level tokenizer: ids 0-255 are the UTF-8 bytes, 256 `<|endoftext|>`, 257 `<|pad|>`."""
        return cls("byte", None, eos_token=EOT, pad_token=PAD)

    @classmethod
    def load(cls, path: str | Path) -> Tokenizer:
        """Load a tokenizer saved by `save`, or any pretrained `tokenizer.json`: the file, or a folder holding
        it (with our metadata or HF's `tokenizer_config.json` beside it, if any). MinimoeError if it is neither."""
        p = Path(path)
        if not p.exists():
            raise MinimoeError(f"tokenizer path {p} does not exist")
        folder, file = (p, p / HF_FILE) if p.is_dir() else (p.parent, p)
        meta_path = folder / META_FILE
        # our metadata applies to the tokenizer.json saved next to it
        if meta_path.is_file() and file.name == HF_FILE:
            meta = read_json_object(meta_path)
            if meta.get("kind") == "byte":
                tok = cls.byte()
                tok.chat_template = meta.get("chat_template")
                return tok
            hf = _read_hf(file)
            return cls(
                meta.get("kind", "pretrained"),
                hf,
                eos_token=meta["eos_token"],
                bos_token=meta.get("bos_token"),
                pad_token=meta.get("pad_token"),
                chat_template=meta.get("chat_template"),
            )
        hf = _read_hf(file)
        eos, bos, pad, template = _hf_special_tokens(hf, folder)
        return cls("pretrained", hf, eos_token=eos, bos_token=bos, pad_token=pad, chat_template=template)

    # ------------------------------------------------------------------ encode / decode

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; no BOS/EOS is added."""
        return self.encode_array(text).tolist()

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """`encode` for many texts (HF kinds run them in one Rust call)."""
        return [a.tolist() for a in self.encode_arrays(texts)]

    def encode_array(self, text: str) -> np.ndarray:
        """Token ids of `text` as an int64 numpy array (the fast path for data preparation)."""
        return self.encode_arrays([text])[0]

    def encode_arrays(self, texts: list[str]) -> list[np.ndarray]:
        """Token ids of each text as int64 numpy arrays."""
        if self.kind == "byte":
            return [self._encode_bytes(t) for t in texts]
        # encode_batch_fast (tokenizers >= 0.20) skips computing offsets we never use
        fn = getattr(self._hf, "encode_batch_fast", self._hf.encode_batch)
        encs = fn(texts, add_special_tokens=False)
        return [np.asarray(e.ids, dtype=np.int64) for e in encs]

    def encode_offsets(self, text: str) -> tuple[np.ndarray, np.ndarray]:
        """Token ids of `text` and each token's (start, end) character span in it, an (N, 2) array.

        A byte token's span is its character's (every byte of a multi-byte character gets the whole
        character); HF kinds give the spans their tokenizer reports (a token may span nothing).
        """
        if self.kind != "byte":
            enc = self._hf.encode(text, add_special_tokens=False)
            spans = np.asarray(enc.offsets, dtype=np.int64).reshape(-1, 2)
            return np.asarray(enc.ids, dtype=np.int64), spans
        ids, spans, at = [], [], 0
        for piece, special in self._byte_pieces(text):
            if special is not None:
                ids.append(np.array([special], dtype=np.int64))
                spans.append(np.array([[at, at + len(piece)]], dtype=np.int64))
            else:
                b = np.frombuffer(piece.encode("utf-8"), dtype=np.uint8)
                char = at + np.cumsum((b & 0xC0) != 0x80) - 1  # a UTF-8 continuation byte is 10xxxxxx
                ids.append(b.astype(np.int64))
                spans.append(np.stack([char, char + 1], axis=1))
            at += len(piece)
        if not ids:
            return np.zeros(0, dtype=np.int64), np.zeros((0, 2), dtype=np.int64)
        return np.concatenate(ids), np.concatenate(spans)

    def _byte_pieces(self, text: str) -> Iterator[tuple[str, int | None]]:
        """The non-empty pieces of `text` for the byte kind, each with its special token's id, or None
        for plain text (its UTF-8 bytes are its ids): special-token strings split out as HF matches them."""
        for piece in self._special_re.split(text) if "<|" in text else [text]:
            if piece:
                yield piece, self._specials.get(piece)

    def _encode_bytes(self, text: str) -> np.ndarray:
        if "<|" not in text:  # cheap test: no special-token string can be present
            return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int64)
        parts = [
            np.array([special], dtype=np.int64) if special is not None
            else np.frombuffer(piece.encode("utf-8"), dtype=np.uint8).astype(np.int64)
            for piece, special in self._byte_pieces(text)
        ]  # fmt: skip
        return np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`. Ids outside the vocabulary are dropped (as HF does); invalid UTF-8
        becomes U+FFFD."""
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # numpy arrays, torch tensors
        if self.kind != "byte":
            return self._hf.decode(ids, skip_special_tokens=skip_special_tokens)
        try:  # byte ids only, the common case, without numpy's cost per call (a stream decodes a few ids)
            return bytes(ids).decode("utf-8", errors="replace")
        except (ValueError, TypeError):  # special ids or ids outside the vocabulary
            pass
        arr = np.asarray(ids, dtype=np.int64)
        by_id = {v: k for k, v in self._specials.items()}
        special = np.isin(arr, list(by_id))
        if skip_special_tokens or not special.any():
            return _utf8(arr)
        out, start = [], 0
        for j in np.flatnonzero(special).tolist():
            out += [_utf8(arr[start:j]), by_id[int(arr[j])]]
            start = j + 1
        out.append(_utf8(arr[start:]))
        return "".join(out)

    @property
    def special_tokens(self) -> dict[str, int]:
        """The special tokens' strings and ids (EOS and PAD of the byte kind; a tokenizer.json's added
        special tokens)."""
        return dict(self._specials)

    def id_to_token(self, i: int) -> str | None:
        """The vocabulary string of id `i` (byte kind: the byte as GPT-2's printable character)."""
        if self.kind == "byte":
            if 0 <= i < 256:
                return _bytes_to_unicode()[i]
            return {v: k for k, v in self._specials.items()}.get(i)
        return self._hf.id_to_token(i)

    def token_bytes(self, i: int) -> bytes:
        """The bytes token `i` adds to decoded text: part of a character for a byte-level (or byte-fallback
        `<0xNN>`) token that splits one, a special token's string; another decoder's text of it after a
        plain token (SentencePiece's and WordPiece's decoders drop or add a space by position)."""
        if self.kind == "byte" and 0 <= i < 256:
            return bytes([i])
        token = self.id_to_token(i)
        if token is None or token in self._specials:
            return (token or "").encode()
        if type(self._hf.decoder).__name__ == "ByteLevel":  # vocabulary strings in GPT-2's byte alphabet
            inverse = _unicode_to_bytes()
            if all(c in inverse for c in token):
                return bytes(inverse[c] for c in token)
        if re.fullmatch("<0x[0-9A-F]{2}>", token) and getattr(self._hf.model, "byte_fallback", False):
            return bytes([int(token[3:5], 16)])
        a = self.encode("a")[-1:]  # a plain token: what `i` adds after it is its text inside a text
        head, both = self.decode(a, False), self.decode(a + [i], False)
        return (both[len(head) :] if a and both.startswith(head) else self.decode([i], False)).encode()

    # ------------------------------------------------------------------ persistence

    def to_hf_json(self) -> str:
        """The HF `tokenizer.json` text of this tokenizer (exactly equivalent for the byte kind)."""
        hf = _byte_level_hf() if self.kind == "byte" else self._hf
        return hf.to_str()

    def metadata(self) -> dict[str, Any]:
        """What `minimoe_tokenizer.json` holds."""
        return {
            "format": META_FORMAT,
            "kind": self.kind,
            "vocab_size": self.vocab_size,
            "eos_token": self.eos_token,
            "eos_id": self.eos_id,
            "bos_token": self.bos_token,
            "bos_id": self.bos_id,
            "pad_token": self.pad_token,
            "pad_id": self.pad_id,
            "chat_template": self.chat_template,
        }

    def save(self, directory: str | Path) -> Path:
        """Write `tokenizer.json` and `minimoe_tokenizer.json` into `directory` (created).

        Returns:
            The directory.
        """
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        (d / HF_FILE).write_text(self.to_hf_json(), encoding="utf-8")
        (d / META_FILE).write_text(json.dumps(self.metadata(), indent=2), encoding="utf-8")
        return d

    def hash(self) -> str:
        """sha256 of the serialized tokenizer and its special-token ids (a cache key).

        The chat template is left out: it does not change how text is tokenized.
        """
        meta = {k: v for k, v in self.metadata().items() if k != "chat_template"}
        h = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
        h.update(self.to_hf_json().encode())
        return h.hexdigest()

    def payload(self) -> dict[str, Any]:
        """A picklable description that `Tokenizer.from_payload` rebuilds (sent to worker processes)."""
        return {"meta": self.metadata(), "hf": None if self.kind == "byte" else self._hf.to_str()}

    @classmethod
    def from_payload(cls, payload: dict[str, Any]) -> Tokenizer:
        meta = payload["meta"]
        if meta["kind"] == "byte":
            return cls.byte()
        from tokenizers import Tokenizer as HFTokenizer

        return cls(
            meta["kind"],
            HFTokenizer.from_str(payload["hf"]),
            eos_token=meta["eos_token"],
            bos_token=meta["bos_token"],
            pad_token=meta["pad_token"],
            chat_template=meta["chat_template"],
        )

    def __repr__(self) -> str:
        return f"Tokenizer(kind={self.kind!r}, vocab_size={self.vocab_size}, eos_id={self.eos_id})"


# ---------------------------------------------------------------------- helpers


def _utf8(ids: np.ndarray) -> str:
    """Text of byte ids; other ids are dropped and invalid UTF-8 becomes U+FFFD."""
    return ids[(ids >= 0) & (ids < 256)].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


def _read_hf(file: Path):
    from tokenizers import Tokenizer as HFTokenizer

    if not file.is_file():
        raise MinimoeError(f"{file} does not exist (a pretrained tokenizer needs a tokenizer.json)")
    try:
        return HFTokenizer.from_file(str(file))
    except Exception as e:  # tokenizers raises a bare Exception on malformed files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MinimoeError(f"{file} is not a valid Hugging Face tokenizer.json ({first})") from None


def _token_content(v: Any) -> str | None:
    """tokenizer_config.json writes special tokens either as a string or as {"content": ...}."""
    if isinstance(v, str):
        return v
    if isinstance(v, dict) and isinstance(v.get("content"), str):
        return v["content"]
    return None


def _hf_special_tokens(hf: Any, folder: Path) -> tuple[str, str | None, str | None, str | None]:
    """EOS, BOS, PAD and chat template of a pretrained tokenizer, from the HF config files when
    present (EOS else by well-known names)."""
    cfg: dict = {}
    for name in ("special_tokens_map.json", "tokenizer_config.json"):  # the latter wins
        f = folder / name
        if f.is_file():
            try:
                cfg.update(json.loads(f.read_text(encoding="utf-8")))
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise MinimoeError(f"{f} is not valid JSON") from None

    def known(tok: str | None) -> str | None:
        return tok if tok is not None and hf.token_to_id(tok) is not None else None

    eos = known(_token_content(cfg.get("eos_token")))
    if eos is None:
        eos = next((c for c in EOS_CANDIDATES if hf.token_to_id(c) is not None), None)
    if eos is None:
        raise MinimoeError(
            f"the tokenizer in {folder} has no end-of-text token (looked for eos_token in "
            f"tokenizer_config.json and for {', '.join(EOS_CANDIDATES)})"
        )
    bos = known(_token_content(cfg.get("bos_token")))
    pad = known(_token_content(cfg.get("pad_token")))
    if pad is None and hf.padding is not None:
        pad = known(hf.padding.get("pad_token"))
    return eos, bos, pad, _hf_chat_template(cfg.get("chat_template"), folder)


def _hf_chat_template(template: Any, folder: Path) -> str | None:
    """The chat template transformers uses by default: `chat_template.jinja` (where recent transformers
    save it), else tokenizer_config.json's string, or the one named "default" in its list."""
    f = folder / "chat_template.jinja"
    if f.is_file():
        try:
            return f.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise MinimoeError(f"{f} is not UTF-8 text") from None
    if isinstance(template, list):
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    return template if isinstance(template, str) else None


def train_bpe(
    texts: Iterable[str], vocab_size: int, min_frequency: int = 2, show_progress: bool = False
) -> Tokenizer:
    """Train a byte-level BPE tokenizer (GPT-2 style) with HF `tokenizers`.

    Args:
        texts: the training documents.
        vocab_size: the wanted vocabulary size including the 256 byte tokens and the specials
            `<|endoftext|>` and `<|pad|>`; the result is smaller when the text has too few
            distinct merges.
        min_frequency: a pair must occur this often to be merged.
        show_progress: the trainer's own progress bar.
    Returns:
        A Tokenizer of kind "bpe", with `<|endoftext|>` = 0 and `<|pad|>` = 1.
    """
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    specials = [EOT, PAD]
    if vocab_size < 256 + len(specials):
        raise MinimoeError(f"bpe vocab size ({vocab_size}) must be at least {256 + len(specials)}")
    hf = HFTokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,
        # all 256 bytes, so any text encodes without unknown tokens
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=show_progress,
    )
    seen = [0]

    def counted() -> Iterator[str]:
        for t in texts:
            seen[0] += len(t)
            yield t

    hf.train_from_iterator(counted(), trainer=trainer)
    if seen[0] == 0:
        raise MinimoeError("the BPE training text contains no text")
    return Tokenizer("bpe", hf, eos_token=EOT, pad_token=PAD)


def resolve_tokenizer(spec: str, texts_for_training: Callable[[], Iterator[str]] | None = None) -> Tokenizer:
    """Build a tokenizer from a spec string.

    Args:
        spec: `byte`, `bpe:VOCAB` (train on `texts_for_training()`), a path to a
            tokenizer.json file or a folder holding one, or a pretrained tokenizer found locally by
            name (`gpt2`, `smollm2`, `deepseek-moe`) or repo id (`hf:ORG/NAME`); see data/pretrained.py.
        texts_for_training: returns a fresh iterator of training documents; needed for `bpe:`.
    Returns:
        The tokenizer. Raises MinimoeError for a malformed spec or a missing path.
    """
    s = spec.strip()
    if s == "byte":
        return Tokenizer.byte()
    if s.startswith("bpe:") or s == "bpe":
        try:
            vocab = int(s[4:].replace("_", ""))
        except ValueError:
            raise MinimoeError(
                f"tokenizer spec {spec!r} must be bpe:VOCAB with an integer VOCAB, e.g. bpe:4096"
            ) from None
        if texts_for_training is None:
            raise MinimoeError(f"tokenizer {spec!r} is trained on the data, but no training text was given")
        return train_bpe(texts_for_training(), vocab)
    p = Path(s).expanduser()
    if p.exists():
        return Tokenizer.load(p)
    if is_named(s):  # gpt2, smollm2, deepseek-moe, hf:ORG/NAME: found locally, never downloaded
        return Tokenizer.load(named_tokenizer_path(s))
    raise MinimoeError(
        f"tokenizer {spec!r} is not 'byte', 'bpe:VOCAB', a known name ({', '.join(KNOWN)}), 'hf:ORG/NAME' "
        "or an existing tokenizer.json file or folder"
    )
