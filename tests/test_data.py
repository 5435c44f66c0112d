"""minimoe.data: tokenizers, sources, prepare (cache, atomicity, splits) and loaders.

All data is generated here; only the GPT-2 tokenizer test reads /work/shared and skips without it.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from minimoe.data import (
    EvalWindows,
    PreparedData,
    Tokenizer,
    TokenWindows,
    open_source,
    prepare,
    resolve_tokenizer,
    split_documents,
    train_bpe,
)
from minimoe.errors import MinimoeError

EOT = "<|endoftext|>"
GPT2 = Path("/work/shared/data/tokenizers/gpt2")
SAMPLES = ["hello world", "Grüße, 世界! 😀 tabs\tand\nnewlines\r\n", "", "  leading", "a<|endoftext|>b"]


def words(rng: random.Random, n: int) -> str:
    vocab = "the cat dog sat on a mat and ran to big small red blue house tree Lily Tom said".split()
    return " ".join(rng.choice(vocab) for _ in range(n)) + "."


def write_stories(path: Path, n_docs: int, seed: int = 0, words_per_doc: int = 40) -> list[str]:
    rng = random.Random(seed)
    docs = [words(rng, words_per_doc) for _ in range(n_docs)]
    path.write_text("".join(d + "\n" + EOT + "\n" for d in docs), encoding="utf-8")
    return docs


def tiny_hf_tokenizer(folder: Path, eos: str = "</s>", extra: int = 0) -> Path:
    """A word-level tokenizer.json built here, standing in for a downloaded pretrained one."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as HF

    vocab = {"[UNK]": 0}
    for w in "the cat dog sat on a mat and ran to big small red blue house tree Lily Tom said .".split():
        vocab.setdefault(w, len(vocab))
    for i in range(extra):
        vocab[f"w{i}"] = len(vocab)
    hf = HF(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    hf.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    hf.decoder = decoders.WordPiece()  # joins words with spaces
    hf.add_special_tokens([AddedToken(eos, special=True)])
    folder.mkdir(parents=True, exist_ok=True)
    hf.save(str(folder / "tokenizer.json"))
    return folder / "tokenizer.json"


def read_split(data: PreparedData, split: str) -> np.ndarray:
    maps = data.memmaps(split)
    return np.concatenate([np.asarray(m) for m in maps]) if maps else np.zeros(0, dtype=data.dtype)


# ---------------------------------------------------------------------- tokenizers


def test_byte_tokenizer_round_trip_and_exact_hf_file(tmp_path):
    from tokenizers import Tokenizer as HF

    tok = Tokenizer.byte()
    assert (tok.vocab_size, tok.eos_id, tok.pad_id, tok.bos_id) == (258, 256, 257, None)
    for s in SAMPLES:
        ids = tok.encode(s)
        assert tok.decode(ids) == s.replace(EOT, "")
        assert tok.decode(ids, skip_special_tokens=False) == s
    assert tok.encode("hé") == list("hé".encode())
    assert tok.encode("a<|endoftext|>b") == [97, 256, 98]  # special strings match, as in HF
    assert tok.decode([104, 105, 9999]) == "hi"  # out-of-vocab ids are dropped, as in HF
    tok.save(tmp_path / "t")
    hf = HF.from_file(str(tmp_path / "t" / "tokenizer.json"))  # the saved file gives the same ids
    rng = random.Random(0)
    for _ in range(200):
        s = "".join(
            rng.choice(["a", " ", "\n", "é", "日本", "😀", EOT, "<|pad|>", "<|", "\x00"]) for _ in range(20)
        )
        assert hf.encode(s, add_special_tokens=False).ids == tok.encode(s)
    loaded = Tokenizer.load(tmp_path / "t")
    assert loaded.kind == "byte" and loaded.hash() == tok.hash() == Tokenizer.byte().hash()


@pytest.fixture(scope="module")
def bpe_tok() -> Tokenizer:
    rng = random.Random(1)
    return train_bpe((words(rng, 50) for _ in range(200)), vocab_size=300)


def test_bpe_train_round_trip_save_load(bpe_tok, tmp_path):
    assert bpe_tok.kind == "bpe" and 258 < bpe_tok.vocab_size <= 300
    assert bpe_tok.id_to_token(bpe_tok.eos_id) == EOT
    assert len(bpe_tok.encode("the cat sat on the mat")) < len("the cat sat on the mat")  # merges learnt
    for s in SAMPLES:
        assert bpe_tok.decode(bpe_tok.encode(s)) == s.replace(EOT, "")
    bpe_tok.chat_template = "{{ messages }}"
    bpe_tok.save(tmp_path / "bpe")
    assert {p.name for p in (tmp_path / "bpe").iterdir()} == {"tokenizer.json", "minimoe_tokenizer.json"}
    loaded = Tokenizer.load(tmp_path / "bpe")
    assert (loaded.kind, loaded.eos_id, loaded.chat_template) == ("bpe", bpe_tok.eos_id, "{{ messages }}")
    assert loaded.hash() == bpe_tok.hash()  # stable across save/load; chat template not hashed
    assert Tokenizer.load(tmp_path / "bpe" / "tokenizer.json").hash() == bpe_tok.hash()  # metadata beside it
    assert loaded.encode_batch(SAMPLES) == bpe_tok.encode_batch(SAMPLES)
    assert loaded.hash() != Tokenizer.byte().hash()


@pytest.mark.parametrize("kind", ["byte", "bpe"])
def test_encode_offsets_give_the_ids_and_each_tokens_text(kind, bpe_tok):
    """`encode_offsets` (what fine-tuning masks answers with) gives `encode`'s ids, and each token's
    span is the text it came from: the bytes of one character share that character."""
    tok = Tokenizer.byte() if kind == "byte" else bpe_tok
    for s in SAMPLES:
        ids, spans = tok.encode_offsets(s)
        assert ids.tolist() == tok.encode(s) and spans.shape == (len(ids), 2)
        assert (spans[:, 0] < spans[:, 1]).all() and (np.diff(spans[:, 0]) >= 0).all()
        # the tokens' spans, merged in order, cover the text exactly
        covered = "".join(s[a:b] for i, (a, b) in enumerate(spans) if i == 0 or a >= spans[i - 1, 1])
        assert covered == s
    ids, spans = Tokenizer.byte().encode_offsets("aé€<|endoftext|>b")
    assert spans.tolist() == [[0, 1], [1, 2], [1, 2], [2, 3], [2, 3], [2, 3], [3, 16], [16, 17]]


def test_pretrained_tokenizer_json_built_here(tmp_path):
    file = tiny_hf_tokenizer(tmp_path / "tiny")
    for p in (file, file.parent):  # the file itself or its folder
        tok = Tokenizer.load(p)
        assert tok.kind == "pretrained" and tok.eos_token == "</s>" and tok.pad_id == tok.eos_id
        assert tok.decode(tok.encode("the cat sat on a mat")) == "the cat sat on a mat"
    # tokenizer_config.json decides when present
    (file.parent / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": {"content": "</s>"}, "bos_token": "the", "chat_template": "T"})
    )
    tok = Tokenizer.load(file.parent)
    assert (tok.bos_id, tok.chat_template) == (tok.encode("the")[0], "T")
    tok.save(tmp_path / "saved")
    assert Tokenizer.load(tmp_path / "saved").hash() == tok.hash()


def test_pretrained_post_processor_adds_nothing_to_encoded_text(tmp_path):
    """A tokenizer.json whose post-processor adds a BOS (as Llama's do): minimoe's encodings are the
    text's own tokens (documents get their separators from data preparation, prompts from the chat
    template), in every encode path."""
    from tokenizers import Tokenizer as HF
    from tokenizers.processors import TemplateProcessing

    file = tiny_hf_tokenizer(tmp_path / "tiny")
    hf = HF.from_file(str(file))
    eos = hf.token_to_id("</s>")
    hf.post_processor = TemplateProcessing(single="</s> $A", special_tokens=[("</s>", eos)])
    hf.save(str(file))
    tok = Tokenizer.load(file)
    want = [hf.token_to_id(w) for w in ("the", "cat")]
    assert hf.encode("the cat").ids == [eos, *want]  # the post-processor is there
    assert tok.encode("the cat") == want and tok.encode_batch(["the cat"]) == [want]
    assert tok.encode_offsets("the cat")[0].tolist() == want


def test_tokenizer_hash_payload_and_byte_edges():
    """The cache key sees the merges (two BPE tokenizers of one size differ) but not the chat
    template; a worker's copy from `payload` keeps every setting; byte decoding replaces invalid UTF-8
    with U+FFFD and `id_to_token` knows no negative id."""
    a = train_bpe(["the cat sat on the mat"] * 20, vocab_size=270)
    b = train_bpe(["a dog ran to a red ball"] * 20, vocab_size=270)
    assert a.vocab_size == b.vocab_size and a.hash() != b.hash()
    templated = Tokenizer("bpe", a._hf, eos_token=EOT, pad_token="<|pad|>", chat_template="{{ messages }}")
    assert templated.hash() == a.hash()
    back = Tokenizer.from_payload(templated.payload())
    assert back.metadata() == templated.metadata() and back.hash() == templated.hash()
    byte = Tokenizer.byte()
    assert byte.decode([104, 0xFF, 105]) == "h\ufffdi" and byte.id_to_token(-1) is None


def test_pretrained_chat_template_as_transformers_finds_it(tmp_path):
    # a list of named templates in tokenizer_config.json: the one named "default"
    file = tiny_hf_tokenizer(tmp_path / "tiny")
    named = [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D"}]
    (file.parent / "tokenizer_config.json").write_text(json.dumps({"chat_template": named}))
    assert Tokenizer.load(file.parent).chat_template == "D"
    # chat_template.jinja beside it (where transformers' save_pretrained writes it) comes first
    (file.parent / "chat_template.jinja").write_text("{{ messages }}", encoding="utf-8")
    assert Tokenizer.load(file.parent).chat_template == "{{ messages }}"
    assert Tokenizer.load(file).chat_template == "{{ messages }}"


def test_pretrained_truncation_and_padding_are_ignored(tmp_path):
    # a tokenizer.json saved with truncation/padding on must not cut or pad documents in prepare
    from tokenizers import Tokenizer as HF

    file = tiny_hf_tokenizer(tmp_path / "tp")
    hf = HF.from_file(str(file))
    hf.enable_truncation(max_length=4)
    hf.enable_padding(pad_id=hf.token_to_id("</s>"), pad_token="</s>", length=16)
    hf.save(str(file))
    tok = Tokenizer.load(file.parent)
    assert tok.pad_token == "</s>"  # still read from the padding settings
    text = "the cat sat on a mat and ran to the big red house"
    assert len(tok.encode(text)) == 13 and len(tok.encode("the cat")) == 2
    (tmp_path / "d.txt").write_text(text + "\n" + EOT + "\nthe dog\n")
    data = prepare(tmp_path / "d.txt", tok, tmp_path / "o", val_fraction=0, workers=0, progress=False)
    assert read_split(data, "train").tolist() == tok.encode(text) + [tok.eos_id] + tok.encode("the dog") + [
        tok.eos_id
    ]


def test_pretrained_special_tokens_as_transformers_reads_them(tmp_path):
    """EOS by the documented candidate order; only special added tokens count as special;
    tokenizer_config.json wins over special_tokens_map.json; a configured token the vocabulary lacks
    is ignored; PAD from the padding settings, else EOS (never BOS); a payload rebuilds them all."""
    from tokenizers import AddedToken
    from tokenizers import Tokenizer as HF

    file = tiny_hf_tokenizer(tmp_path / "t", eos="<|im_end|>")
    hf = HF.from_file(str(file))
    hf.add_special_tokens([AddedToken(EOT, special=True), AddedToken("<pad>", special=True)])
    hf.add_tokens([AddedToken("<tool>", special=False)])
    hf.save(str(file))
    tok = Tokenizer.load(file.parent)
    assert tok.eos_token == EOT and tok.pad_id == tok.eos_id
    assert {"<pad>", EOT} <= set(tok.special_tokens) and "<tool>" not in tok.special_tokens
    (file.parent / "special_tokens_map.json").write_text(
        json.dumps({"eos_token": "<pad>", "pad_token": "<pad>"})
    )
    (file.parent / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    tok = Tokenizer.load(file.parent)
    assert (tok.eos_token, tok.pad_token) == ("<|im_end|>", "<pad>")
    (file.parent / "special_tokens_map.json").unlink()
    (file.parent / "tokenizer_config.json").write_text(
        json.dumps({"eos_token": "<gone>", "bos_token": "the"})
    )
    tok = Tokenizer.load(file.parent)
    assert (tok.eos_token, tok.bos_token, tok.pad_token) == (EOT, "the", EOT)
    hf.enable_padding(pad_id=hf.token_to_id("<pad>"), pad_token="<pad>")
    hf.save(str(file))
    tok = Tokenizer.load(file.parent)
    assert (tok.bos_token, tok.pad_token) == ("the", "<pad>")
    assert Tokenizer.from_payload(tok.payload()).metadata() == tok.metadata()


def test_pretrained_without_eos_is_an_error(tmp_path):
    file = tiny_hf_tokenizer(tmp_path / "noeos", eos="[SEP]")
    with pytest.raises(MinimoeError, match="no end-of-text token"):
        Tokenizer.load(file)


@pytest.mark.skipif(not (GPT2 / "tokenizer.json").is_file(), reason="shared GPT-2 tokenizer.json not present")
def test_gpt2_tokenizer():
    tok = resolve_tokenizer(str(GPT2))
    assert (tok.vocab_size, tok.eos_id, tok.bos_id) == (50257, 50256, 50256)
    assert tok.encode("Hello world") == [15496, 995]
    for s in SAMPLES:
        assert tok.decode(tok.encode(s)) == s.replace(EOT, "")


def test_resolve_tokenizer_specs_and_errors(tmp_path):
    assert resolve_tokenizer("byte").kind == "byte"
    tok = resolve_tokenizer("bpe:280", lambda: iter(["the cat sat"] * 50))
    assert tok.kind == "bpe"
    for spec, msg in [
        ("bpe:many", "integer VOCAB"),
        ("bpe:100", "at least 258"),
        ("bpe:257", "at least 258"),  # the 256 bytes and both special tokens
        ("sentencepiece", "is not 'byte', 'bpe:VOCAB'"),
        (str(tmp_path / "missing.json"), "is not 'byte'"),
    ]:
        with pytest.raises(MinimoeError, match=msg):
            resolve_tokenizer(spec, lambda: iter(["some text"]))
    with pytest.raises(MinimoeError, match="no training text"):
        resolve_tokenizer("bpe:300")
    with pytest.raises(MinimoeError, match="contains no text"):
        resolve_tokenizer("bpe:300", lambda: iter(["", ""]))  # documents, but not a character
    assert resolve_tokenizer(" byte\n").kind == "byte"  # a spec read from a file keeps its newline
    assert resolve_tokenizer("bpe:2_80", lambda: iter(["the cat sat"] * 50)).hash() == tok.hash()
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "tokenizer.json").write_text("{not json")
    with pytest.raises(MinimoeError, match="not a valid Hugging Face tokenizer.json"):
        resolve_tokenizer(str(tmp_path / "bad"))


# ---------------------------------------------------------------------- sources


def test_split_documents_matches_line_reference():
    def reference(text: str) -> list[str]:
        groups: list[list[str]] = [[]]
        for line in text.split("\n"):
            groups.append([]) if line == EOT else groups[-1].append(line)
        return [d for d in ("\n".join(g) for g in groups) if d.strip()]

    rng = random.Random(0)
    pieces = ["a", "b", " ", "\n", EOT, "\n" + EOT + "\n", "xy\n\n", "<|", "endoftext|>"]
    for _ in range(2000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        step = rng.randint(1, 20)
        docs, cur = [], []
        for seg, end in split_documents([text[i : i + step] for i in range(0, len(text), step)], max_chars=7):
            assert len(seg) <= 8 or end
            cur.append(seg)
            if end:
                docs.append("".join(cur))
                cur = []
        assert not cur and [d for d in docs if d.strip()] == reference(text)


def test_split_documents_crlf_separators_match_lf(tmp_path):
    # a file saved with CRLF line ends splits as its LF twin does, each "\n" read as "\r\n"
    rng = random.Random(1)
    pieces = ["a", "b", " ", "\n", EOT, "\n" + EOT + "\n", "xy\n\n"]
    for _ in range(1000):
        text = "".join(rng.choice(pieces) for _ in range(rng.randint(0, 25)))
        crlf = text.replace("\n", "\r\n")
        step = rng.randint(1, 20)
        docs, cur = [], []
        for seg, end in split_documents([crlf[i : i + step] for i in range(0, len(crlf), step)], max_chars=7):
            cur.append(seg)
            if end:
                docs.append("".join(cur))
                cur = []
        assert [d for d in docs if d.strip()] == [d.replace("\n", "\r\n") for d, _ in split_documents([text])]
    (tmp_path / "w.txt").write_bytes(b"first story\r\n<|endoftext|>\r\nsecond story\r\n<|endoftext|>\r\n")
    assert list(open_source(tmp_path / "w.txt").documents()) == ["first story", "second story"]


def test_text_file_source(tmp_path):
    docs = write_stories(tmp_path / "s.txt", 5)
    c = open_source(tmp_path / "s.txt")
    assert list(c.documents()) == docs
    (tmp_path / "plain.txt").write_text("one\n\ntwo\n")
    assert list(open_source(tmp_path / "plain.txt").documents()) == ["one\n\ntwo\n"]  # no separators: one doc


def test_folder_source_glob_skips_binary_and_non_utf8(tmp_path):
    root = tmp_path / "code"
    (root / "pkg").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / "b.py").write_text("print('b')\n")
    (root / "pkg" / "a.py").write_text("x = 1\n")
    (root / "notes.md").write_text("# notes\n")
    (root / "pkg" / "blob.py").write_bytes(b"\x00\x01binary")
    (root / "pkg" / "latin.py").write_bytes("caf\xe9 = 1\n".encode("latin-1"))
    (root / ".git" / "x.py").write_text("hidden = 1\n")
    (root / "pkg" / ".secret.py").write_text(
        "hidden = 2\n"
    )  # hidden files are left out as hidden folders are
    c = open_source(root)
    assert [f.relative_to(root).as_posix() for f in c.files] == [
        "b.py",
        "notes.md",
        "pkg/a.py",
        "pkg/blob.py",
        "pkg/latin.py",
    ]
    assert list(c.documents()) == ["print('b')\n", "# notes\n", "x = 1\n"]
    assert c.skipped == {"binary": 1, "not_utf8": 1}
    py = open_source(root, glob="**/*.py")
    assert list(py.documents()) == ["print('b')\n", "x = 1\n"]
    for glob, want in [
        ("*.py", ["b.py"]),
        ("pkg/*", ["a.py", "blob.py", "latin.py"]),
        ("**/[ab].py", ["b.py", "a.py"]),
        ("*.p", []),  # a pattern matches a whole name, not its start
        ("pkg?a.py", []),  # `?` stays within one name
    ]:
        assert [f.name for f in open_source(root, glob=glob).files] == want
    for glob in ("[z-a]*.py", "[!]"):  # no valid character class: one sentence, not a regex error
        with pytest.raises(MinimoeError, match="is not a valid pattern"):
            open_source(root, glob=glob)


def test_a_missing_text_field_names_the_settings_that_read_another(tmp_path):
    """A JSONL line or Parquet file without the text field says how to read another field, in training
    (data.text_field) and in evaluation (--text-field), as eval's task files do with --field."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "d.jsonl").write_text('{"story": "once"}\n')
    pq.write_table(pa.table({"body": ["p1"]}), tmp_path / "d.parquet")
    for f in ("d.jsonl", "d.parquet"):
        with pytest.raises(
            MinimoeError, match=r"\(it has: (story|body)\); data.text_field=NAME .*--text-field"
        ):
            list(open_source(tmp_path / f).documents())


def test_jsonl_parquet_and_hf_sources(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": "first doc", "id": 1}, {"text": "second doc", "id": 2}, {"text": None, "id": 3}]
    (tmp_path / "d.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert list(open_source(tmp_path / "d.jsonl").documents()) == ["first doc", "second doc"]
    pq.write_table(pa.table({"body": ["p1", "p2", "p3"]}), tmp_path / "d.parquet")
    assert list(open_source(tmp_path / "d.parquet", text_field="body").documents()) == ["p1", "p2", "p3"]
    with pytest.raises(MinimoeError, match="no column 'text'.*body"):
        list(open_source(tmp_path / "d.parquet").documents())
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"content": "x"}\n')
    with pytest.raises(MinimoeError, match="line 2 has no 'text' field"):
        list(open_source(tmp_path / "bad.jsonl").documents())
    # Hugging Face datasets over local JSON files (the packaged json builder; no network)
    hf = open_source(f"hf:{tmp_path / 'd.jsonl'}", cache_dir=str(tmp_path / "hf_cache"))
    assert list(hf.documents()) == ["first doc", "second doc"]
    assert hf.content_hash() == open_source(f"hf:{tmp_path / 'd.jsonl'}").content_hash()
    with pytest.raises(MinimoeError, match="must be hf:NAME_OR_PATH"):
        open_source("hf:x?splt=train")
    for typo in ("hf:x?split", "hf:x?split=train&nme", "hf:x?split="):  # dropped silently before
        with pytest.raises(MinimoeError, match="must be hf:NAME_OR_PATH"):
            open_source(typo)


def test_a_folder_of_jsonl_files_yields_their_text_values(tmp_path):
    """Sharded JSONL in a folder: each record's text field is a document, not the file's JSON markup."""
    root = tmp_path / "shards"
    root.mkdir()
    (root / "part-0.jsonl").write_text('{"text": "first doc", "id": 1}\n{"text": "second doc", "id": 2}\n')
    (root / "part-1.jsonl").write_text('{"text": "third doc", "id": 3}\n')
    assert list(open_source(root).documents()) == ["first doc", "second doc", "third doc"]
    data = prepare(root, "byte", tmp_path / "o", val_fraction=0, workers=0, progress=False)
    train = read_split(data, "train")
    assert bytes(train[train != 256].astype(np.uint8)) == b"first docsecond docthird doc"


def test_a_folder_reads_each_file_by_its_suffix_and_json_files_as_records(tmp_path):
    """In a folder, .jsonl/.ndjson/.json and .parquet files give their text field (data.text_field),
    other files their text. A .json file holds JSON Lines or one JSON array of records (a string item
    is its text), as the Hugging Face json builder reads it; other JSON is one sentence. The text field
    is part of a record folder's identity only."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = tmp_path / "mixed"
    root.mkdir()
    (root / "a.json").write_text(json.dumps([{"body": "array one"}, {"body": "array two"}], indent=2))
    (root / "b.ndjson").write_text('{"body": "nd line"}\n')
    pq.write_table(pa.table({"body": ["parquet row"]}), root / "c.parquet")
    (root / "d.txt").write_text("plain text\n")
    assert list(open_source(root, text_field="body").documents()) == [
        "array one",
        "array two",
        "nd line",
        "parquet row",
        "plain text\n",
    ]
    assert open_source(root, text_field="body").content_hash() != open_source(root).content_hash()
    # without the field, a.json holds no records and is text; b.ndjson is JSON Lines, records always
    with pytest.raises(MinimoeError, match=r"b.ndjson line 1 has no 'text' field .*data.glob=PATTERN"):
        list(open_source(root).documents())
    (tmp_path / "lines.json").write_text('{"text": "l1"}\n{"text": "l2"}\n')
    (tmp_path / "strings.json").write_text('\n  ["s1", "s2"]')
    assert list(open_source(tmp_path / "lines.json").documents()) == ["l1", "l2"]
    assert list(open_source(tmp_path / "strings.json").documents()) == ["s1", "s2"]
    (tmp_path / "object.json").write_text('{\n  "text": "one record"\n}\n')
    with pytest.raises(MinimoeError, match="line 1 is not valid JSON .*JSON Lines or one JSON array"):
        list(open_source(tmp_path / "object.json").documents())
    (tmp_path / "broken.json").write_text('[{"text": "x"},')
    with pytest.raises(MinimoeError, match=r"broken.json is not valid JSON \(line 1:"):
        list(open_source(tmp_path / "broken.json").documents())
    texts = tmp_path / "texts"
    texts.mkdir()
    (texts / "x.md").write_text("# x\n")
    assert open_source(texts).describe()["params"] == {"glob": "**/*"}


def test_a_folder_reads_ordinary_json_files_as_text_and_record_json_files_as_records(tmp_path):
    """A folder of code holds ordinary JSON (package.json, tsconfig.json): it is text, as any other file,
    while a .json file of records (JSON Lines or one array of objects with the text field, or strings)
    still gives its text values. Only a .json file given alone must hold records."""
    code = tmp_path / "code"
    code.mkdir()
    (code / "main.py").write_text("print('hi')\n")
    package = json.dumps({"name": "demo", "version": "1.0.0", "scripts": {"test": "jest"}}, indent=2) + "\n"
    (code / "package.json").write_text(package)
    (code / "tsconfig.json").write_text('{"compilerOptions": {"strict": true}}\n')  # one line, no text field
    (code / "words.json").write_text("[1, 2, 3]\n")  # an array, but not of records
    assert list(open_source(code).documents()) == [
        "print('hi')\n",
        package,
        '{"compilerOptions": {"strict": true}}\n',
        "[1, 2, 3]\n",
    ]
    data = prepare(code, "byte", tmp_path / "o", val_fraction=0, workers=0, progress=False)
    train = read_split(data, "train")
    assert package.encode() in bytes(train[train != 256].astype(np.uint8))
    docs = tmp_path / "docs"
    docs.mkdir()
    first = "x" * 70000  # a first record longer than the part of the file read to classify it
    (docs / "a.json").write_text(json.dumps([{"text": first}, {"text": "two"}]))
    (docs / "b.json").write_text('\ufeff{"text": "l1", "id": 1}\n{"text": "l2"}\n')
    (docs / "c.json").write_text('  ["s1", "s2"]')
    assert list(open_source(docs).documents()) == [first, "two", "l1", "l2", "s1", "s2"]
    with pytest.raises(MinimoeError, match="package.json line 1 is not valid JSON"):
        list(open_source(code / "package.json").documents())


def test_jsonl_lone_surrogate_is_one_clear_error(tmp_path):
    # valid JSON ("\\ud800" is a legal escape) but not encodable text: one sentence, not a traceback
    (tmp_path / "s.jsonl").write_text('{"text": "fine"}\n{"text": "bad \\ud800 half"}\n')
    for tok in ("byte", "bpe:300"):
        with pytest.raises(MinimoeError, match="line 2: field 'text' holds an unpaired surrogate"):
            prepare(tmp_path / "s.jsonl", tok, tmp_path / "o", workers=0, progress=False)


def test_preparing_a_folder_names_the_files_it_skipped(tmp_path, caplog):
    """A binary or non-UTF-8 file in a training folder is left out with a warning naming it, once:
    when the folder is read, not when the prepared data is reused."""
    import logging

    root = tmp_path / "texts"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("hello world\n" * 40)
    (root / "sub" / "blob.bin").write_bytes(b"\x00\x01binary")
    (root / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with caplog.at_level(logging.WARNING, logger="minimoe"):
        prepare(str(root), "byte", tmp_path / "prep", progress=False, workers=0)
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warned == [f"{root}: 2 binary or non-UTF-8 files skipped: latin.txt, sub/blob.bin"], warned
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="minimoe"):
        assert prepare(str(root), "byte", tmp_path / "prep", progress=False, workers=0).cached
    assert not caplog.records


def test_hf_source_reads_a_folder_written_by_save_to_disk(tmp_path):
    """`hf:DIR` where DIR is what Dataset.save_to_disk or DatasetDict.save_to_disk wrote (offline)."""
    datasets = pytest.importorskip("datasets")

    one = datasets.Dataset.from_dict({"text": ["first doc", "second doc"]})
    one.save_to_disk(str(tmp_path / "one"))
    assert list(open_source(f"hf:{tmp_path / 'one'}").documents()) == ["first doc", "second doc"]
    both = datasets.DatasetDict({"train": one, "test": datasets.Dataset.from_dict({"text": ["held out"]})})
    both.save_to_disk(str(tmp_path / "both"))
    assert list(open_source(f"hf:{tmp_path / 'both'}?split=test").documents()) == ["held out"]
    with pytest.raises(MinimoeError, match="no split 'dev'"):
        list(open_source(f"hf:{tmp_path / 'both'}?split=dev").documents())


def test_hf_source_split_column_config_and_identity(tmp_path):
    """`hf:DIR` options offline: the train split by default, `?name=` picks a config a folder's README
    declares, data.text_field picks the column (and is part of the prepared data's identity), a
    missing column is one sentence, hidden files are not the data, and `.JSONL` reads like `.jsonl`."""
    datasets = pytest.importorskip("datasets")

    rows = {"text": [f"doc {i}" for i in range(1500)], "body": [f"body {i}" for i in range(1500)]}
    held = {"text": ["held out"], "body": ["held body"]}
    saved = tmp_path / "dd"
    datasets.DatasetDict(
        {"test": datasets.Dataset.from_dict(held), "train": datasets.Dataset.from_dict(rows)}
    ).save_to_disk(str(saved))
    spec = f"hf:{saved}"
    assert list(open_source(spec).documents()) == rows["text"]  # train, every batch of rows
    assert list(open_source(spec, text_field="body").documents()) == rows["body"]
    assert open_source(spec, text_field="body").content_hash() != open_source(spec).content_hash()
    with pytest.raises(MinimoeError, match=r"no column 'story' \(it has: text, body\)"):
        list(open_source(spec, text_field="story").documents())
    before = open_source(spec).content_hash()
    (saved / ".DS_Store").write_bytes(b"finder")
    assert open_source(spec).content_hash() == before

    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "a.jsonl").write_text('{"text": "from a"}\n')
    (configs / "b.jsonl").write_text('{"text": "from b"}\n')
    (configs / "README.md").write_text(
        "---\nconfigs:\n- config_name: first\n  data_files: a.jsonl\n"
        "- config_name: second\n  data_files: b.jsonl\n---\n"
    )
    cache = str(tmp_path / "hf_cache")
    assert list(open_source(f"hf:{configs}?name=second", cache_dir=cache).documents()) == ["from b"]

    (tmp_path / "UP.JSONL").write_text('{"text": "upper"}\n')
    assert list(open_source(f"hf:{tmp_path / 'UP.JSONL'}", cache_dir=cache).documents()) == ["upper"]


def test_hf_source_expands_the_home_folder_of_a_local_folder(tmp_path, monkeypatch):
    """`hf:~/folder` reads the local folder, as `hf:~/file.jsonl` reads the local file."""
    pytest.importorskip("datasets")
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.jsonl").write_text('{"text": "from a"}\n{"text": "from a too"}\n')
    cache = str(tmp_path / "hf_cache")
    assert list(open_source("hf:~/docs/a.jsonl", cache_dir=cache).documents()) == ["from a", "from a too"]
    assert list(open_source("hf:~/docs", cache_dir=cache).documents()) == ["from a", "from a too"]
    # a hidden folder's copy is neither read by datasets nor part of the source's identity
    (tmp_path / "docs" / ".ipynb_checkpoints").mkdir()
    (tmp_path / "docs" / ".ipynb_checkpoints" / "a-checkpoint.jsonl").write_text('{"text": "old"}\n')
    source = open_source("hf:~/docs", cache_dir=cache)
    assert [p.name for p in source.files] == ["a.jsonl"]
    assert list(source.documents()) == ["from a", "from a too"]


def test_token_array_sources(tmp_path):
    ids = np.arange(300, dtype=np.uint16) % 258
    np.save(tmp_path / "t.npy", ids.astype(np.int32))
    ids.tofile(tmp_path / "t.bin")
    for name in ("t.npy", "t.bin"):
        c = open_source(tmp_path / name)
        assert c.pretokenized and np.array_equal(np.asarray(c.tokens()), ids)
    np.save(tmp_path / "2d.npy", np.zeros((2, 2), dtype=np.int64))
    with pytest.raises(MinimoeError, match="1-D integers"):
        open_source(tmp_path / "2d.npy").tokens()
    np.save(tmp_path / "f.npy", np.zeros(4, dtype=np.float32))
    with pytest.raises(MinimoeError, match="1-D integers"):
        open_source(tmp_path / "f.npy").tokens()
    (tmp_path / "odd.bin").write_bytes(b"\0" * 5)
    with pytest.raises(MinimoeError, match="odd size"):
        open_source(tmp_path / "odd.bin").tokens()


def test_builtin_corpus_finds_stdlib_code():
    c = open_source(None)
    assert c.kind == "builtin" and len(c.files) > 100
    names = {f.name for f in c.files}
    assert {"os.py", "argparse.py"} <= names
    assert not any(part in ("test", "site-packages", "idlelib") for f in c.files for part in f.parts[-3:-1])
    assert not any(f.name.startswith("_sysconfigdata") for f in c.files)  # machine-specific tables
    first = next(c.documents())
    assert isinstance(first, str) and first


# ---------------------------------------------------------------------- prepare


def test_prepare_writes_shards_meta_and_eos(tmp_path):
    docs = write_stories(tmp_path / "s.txt", 100)
    data = prepare(tmp_path / "s.txt", "byte", tmp_path / "out", val_fraction=0.1, workers=0, progress=False)
    m = data.meta
    assert not data.cached and m["split_mode"] == "document" and m["dtype"] == "uint16"
    assert (m["splits"]["train"]["documents"], m["splits"]["val"]["documents"], m["documents"]) == (
        90,
        10,
        100,
    )
    assert set(m["files"]) == {
        "train_000.bin",
        "val_000.bin",
        "tokenizer/tokenizer.json",
        "tokenizer/minimoe_tokenizer.json",
    }
    tok = data.tokenizer()
    train = read_split(data, "train")
    assert train[-1] == tok.eos_id and np.count_nonzero(train == tok.eos_id) == 90
    decoded = tok.decode(train.tolist(), skip_special_tokens=False).split(EOT)[:-1]
    val_docs = [d for i, d in enumerate(docs) if i % 10 == 9]  # evenly spread: every 10th
    assert decoded == [d for i, d in enumerate(docs) if i % 10 != 9]
    assert tok.decode(read_split(data, "val").tolist(), skip_special_tokens=False).split(EOT)[:-1] == val_docs
    assert m["splits"]["val"]["bytes"] == sum(len(d.encode()) for d in val_docs)
    assert m["splits"]["train"]["tokens"] + m["splits"]["val"]["tokens"] == sum(len(d) + 1 for d in docs)
    assert m["max_token_id"] == 256
    assert (m["tokenizer"]["eos_id"], m["tokenizer"]["vocab_size"]) == (tok.eos_id, tok.vocab_size)
    assert PreparedData.load(tmp_path / "out").meta == m


def test_prepare_rerun_is_noop_and_change_reprepares(tmp_path):
    src = tmp_path / "s.txt"
    write_stories(src, 20)
    out = tmp_path / "out"
    first = prepare(src, "byte", out, workers=0, progress=False)
    mtime = (out / "train_000.bin").stat().st_mtime_ns
    again = prepare(src, "byte", out, workers=0, progress=False)
    assert again.cached and (out / "train_000.bin").stat().st_mtime_ns == mtime
    os.utime(src, ns=(1, 1))  # touched, same content: still cached, meta remembers the new mtime
    touched = prepare(src, "byte", out, workers=0, progress=False)
    assert touched.cached and touched.meta["sources"]["train"]["files"][0][2] == 1
    assert (out / "train_000.bin").stat().st_mtime_ns == mtime
    write_stories(src, 20, seed=5)
    changed = prepare(src, "byte", out, workers=0, progress=False)
    assert not changed.cached and changed.meta["content_hash"] != first.meta["content_hash"]
    other_split = prepare(src, "byte", out, val_fraction=0.2, workers=0, progress=False)
    assert not other_split.cached
    assert not prepare(
        src, Tokenizer.load(tiny_hf_tokenizer(tmp_path / "tk")), out, workers=0, progress=False
    ).cached


def test_interrupted_runs_are_not_trusted(tmp_path):
    src = tmp_path / "s.txt"
    write_stories(src, 20)
    out = tmp_path / "out"
    prepare(src, "byte", out, workers=0, progress=False)
    # a shard shorter than meta.json says (killed while rewriting)
    with open(out / "train_000.bin", "r+b") as f:
        f.truncate(10)
    with pytest.raises(MinimoeError, match="train_000.bin is missing or not"):
        PreparedData.load(out)
    assert not prepare(src, "byte", out, workers=0, progress=False).cached
    # shards without meta.json
    (out / "meta.json").unlink()
    with pytest.raises(MinimoeError, match="no meta.json"):
        PreparedData.load(out)
    assert not prepare(src, "byte", out, workers=0, progress=False).cached
    # a temp folder left by a killed run (dead pid) is cleaned, a live one is left alone
    dead = tmp_path / ".out.tmp-999999999-abcdef12"
    live = tmp_path / f".out.tmp-{os.getpid()}-abcdef12"
    for d in (dead, live):
        d.mkdir()
        (d / "train_000.bin").write_bytes(b"\0" * 8)
    write_stories(src, 20, seed=9)
    prepare(src, "byte", out, workers=0, progress=False)
    assert not dead.exists() and live.exists()
    # a folder with someone else's files is never replaced, not even files named like ours
    for name in ("thesis.tex", "weights.bin", "train_1.bin"):
        mine = tmp_path / f"mine-{name}"
        mine.mkdir()
        (mine / name).write_text("x")
        with pytest.raises(MinimoeError, match="did not write"):
            prepare(src, "byte", mine, workers=0, progress=False)
    # meta.json of another format version is not trusted
    meta = json.loads((out / "meta.json").read_text())
    (out / "meta.json").write_text(json.dumps({**meta, "version": meta["version"] + 1}))
    with pytest.raises(MinimoeError, match="format version"):
        PreparedData.load(out)


def test_prepare_stream_split_explicit_val_and_shards(tmp_path):
    rng = random.Random(3)
    text = "\n".join(words(rng, 30) for _ in range(40))  # one long document
    (tmp_path / "one.txt").write_text(text)
    data = prepare(
        tmp_path / "one.txt",
        "byte",
        tmp_path / "a",
        val_fraction=0.1,
        workers=0,
        shard_tokens=1000,
        progress=False,
    )
    assert data.meta["split_mode"] == "stream"
    train, val = read_split(data, "train"), read_split(data, "val")
    assert len(val) == int(0.1 * (len(text) + 1)) and len(data.shard_paths("train")) > 1
    assert bytes(np.concatenate([train, val])[:-1].astype(np.uint8)) == text.encode()
    assert data.num_bytes("train") + data.num_bytes("val") == len(text.encode())
    (tmp_path / "valid.txt").write_text("held out text\n")
    data = prepare(
        tmp_path / "one.txt",
        "byte",
        tmp_path / "b",
        val_source=tmp_path / "valid.txt",
        workers=0,
        progress=False,
    )
    assert data.meta["split_mode"] == "explicit" and data.num_tokens("train") == len(text) + 1
    assert read_split(data, "val").tolist() == list(b"held out text\n") + [256]


def test_prepare_stream_split_counts_utf8_bytes_with_bpe(tmp_path):
    """With BPE a token is several bytes: the val tail's byte count (behind val_bpb) is the UTF-8 bytes
    its tokens stand for, not their number. Hand count: "naïve café, déjà vu: 東京 and 🙂 🙃 " is
    41 + 5 = 46 bytes (ï é à: 2; 東 京: 3; 🙂 🙃: 4), 400 times: 18400."""
    from minimoe.data.tokenizer import _bytes_to_unicode

    unit = "naïve café, déjà vu: 東京 and 🙂 🙃 "
    (tmp_path / "one.txt").write_text(unit * 400, encoding="utf-8")
    tok = train_bpe([unit * 5], 300)
    data = prepare(tmp_path / "one.txt", tok, tmp_path / "a", val_fraction=0.02, workers=0, progress=False)
    assert data.meta["split_mode"] == "stream"
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}  # byte-level token text -> bytes
    val = read_split(data, "val").tolist()
    exact = sum(len(tok.id_to_token(i)) for i in val if i != tok.eos_id)  # one character per byte
    assert all(c in byte_of for i in val if i != tok.eos_id for c in tok.id_to_token(i))
    assert data.num_bytes("val") == exact and data.num_tokens("val") < exact / 3
    assert data.num_bytes("train") + data.num_bytes("val") == 46 * 400


def test_stream_split_bpe_learns_nothing_from_the_validation_tail(tmp_path):
    """One long document (a stream split) whose last tenth is words found nowhere else: the tokenizer
    trained by `prepare` has no merge made of those letters, so validation measures unseen text."""
    text = "the cat sat on the mat. " * 400 + "qwzx vlkj " * 100  # the tail: 1,000 of 10,600 characters
    (tmp_path / "book.txt").write_text(text)
    data = prepare(
        tmp_path / "book.txt", "bpe:300", tmp_path / "prep", val_fraction=0.1, workers=0, progress=False
    )
    assert data.meta["split_mode"] == "stream"
    vocab = data.tokenizer()._hf.get_vocab()
    assert [t for t in vocab if len(t.strip("Ġ")) > 1 and set(t.strip("Ġ")) <= set("qwzxvlkj")] == []
    assert any("cat" in t for t in vocab)  # the training text was learned


def test_stream_split_bpe_learns_nothing_from_a_tail_that_tokenizes_short(tmp_path):
    """A tail the tokenizer would compress far better than the text before it: random letters, then
    words found only in the last 3,000 of 10,000 characters. Trained up to the margin (8,550 characters),
    the tokenizer learned those words, so the last tenth of the tokens reached back to character 6,819,
    into the text it had learned from; `prepare` learns again from the text before that tail only."""
    rng = random.Random(0)
    head = "".join(rng.choice("abcdefghijklmnopstuy") for _ in range(6000)) + "qwzx vlkj " * 100
    text = head + "mmoo rrpp " * 300
    (tmp_path / "book.txt").write_text(text)
    data = prepare(
        tmp_path / "book.txt", "bpe:290", tmp_path / "prep", val_fraction=0.1, workers=0, progress=False
    )
    assert data.meta["split_mode"] == "stream"
    tok = data.tokenizer()
    assert [
        t for t in tok._hf.get_vocab() if len(t.strip("Ġ")) > 1 and set(t.strip("Ġ")) <= set("morp")
    ] == []
    val = tok.decode(read_split(data, "val").tolist())
    assert text.endswith(val) and "mmoo rrpp" in val


def test_prepare_pool_matches_in_process_and_bpe_cache(tmp_path):
    write_stories(tmp_path / "s.txt", 2000, words_per_doc=50)  # > 2 worker tasks of text
    a = prepare(tmp_path / "s.txt", "bpe:300", tmp_path / "a", workers=2, progress=False)
    b = prepare(tmp_path / "s.txt", a.tokenizer(), tmp_path / "b", workers=0, progress=False)
    for s in ("train", "val"):
        assert np.array_equal(read_split(a, s), read_split(b, s))
    assert a.meta["splits"] == b.meta["splits"]
    again = prepare(tmp_path / "s.txt", "bpe:300", tmp_path / "a", workers=2, progress=False)
    assert again.cached and again.tokenizer().hash() == a.tokenizer().hash()


def test_prepare_pretokenized_and_uint32(tmp_path):
    ids = (np.arange(5000) * 7 % 258).astype(np.uint16)
    ids.tofile(tmp_path / "t.bin")
    data = prepare(tmp_path / "t.bin", "byte", tmp_path / "a", val_fraction=0.1, workers=0, progress=False)
    assert np.array_equal(np.concatenate([read_split(data, "train"), read_split(data, "val")]), ids)
    assert data.num_bytes("train") is None and data.num_bytes("val") == int(
        np.count_nonzero(ids[-500:] < 256)
    )
    with pytest.raises(MinimoeError, match="holds token id 300 but the tokenizer has 258"):
        np.array([1, 300], dtype=np.uint16).tofile(tmp_path / "big.bin")
        prepare(tmp_path / "big.bin", "byte", tmp_path / "b", workers=0, progress=False)
    with pytest.raises(
        MinimoeError, match="holds token id 258 but the tokenizer has 258"
    ):  # one past the last
        np.array([1, 258], dtype=np.uint16).tofile(tmp_path / "edge.bin")
        prepare(tmp_path / "edge.bin", "byte", tmp_path / "e", workers=0, progress=False)
    big = Tokenizer.load(tiny_hf_tokenizer(tmp_path / "tk", extra=70000))
    write_stories(tmp_path / "s.txt", 10)
    data = prepare(tmp_path / "s.txt", big, tmp_path / "c", val_fraction=0, workers=0, progress=False)
    assert data.meta["dtype"] == "uint32" and data.num_tokens("val") == 0
    assert big.decode(read_split(data, "train")[:5].tolist()) in (tmp_path / "s.txt").read_text()


def test_bad_inputs(tmp_path):
    with pytest.raises(MinimoeError, match="does not exist"):
        prepare(tmp_path / "nope.txt", "byte", tmp_path / "o", progress=False)
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(MinimoeError, match="empty.txt contains no text"):
        prepare(tmp_path / "empty.txt", "byte", tmp_path / "o", progress=False)
    (tmp_path / "latin.txt").write_bytes("caf\xe9\n".encode("latin-1"))
    with pytest.raises(MinimoeError, match="latin.txt is not UTF-8 text"):
        prepare(tmp_path / "latin.txt", "byte", tmp_path / "o", progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(MinimoeError, match="contains no text"):
        prepare(tmp_path / "empty_dir", "byte", tmp_path / "o", progress=False)
    (tmp_path / "ok.txt").write_text("some text")
    with pytest.raises(MinimoeError, match="bpe:VOCAB"):
        prepare(tmp_path / "ok.txt", "bpe:x", tmp_path / "o", progress=False)
    for bad in (1.5, 1.0, -0.1):  # 1.0 would leave no training data
        with pytest.raises(MinimoeError, match="val_fraction"):
            prepare(tmp_path / "ok.txt", "byte", tmp_path / "o", val_fraction=bad, progress=False)
    with pytest.raises(MinimoeError, match="shard_tokens must be positive"):
        prepare(tmp_path / "ok.txt", "byte", tmp_path / "o", shard_tokens=0, progress=False)
    np.save(tmp_path / "val.npy", np.arange(10))  # ids no tokenizer trained now has made
    with pytest.raises(
        MinimoeError, match="val.npy is already tokenized; pass the tokenizer it was made with"
    ):
        prepare(
            tmp_path / "ok.txt", "bpe:300", tmp_path / "o", val_source=tmp_path / "val.npy", progress=False
        )
    data = prepare(tmp_path / "ok.txt", "byte", tmp_path / "o", val_fraction=0, workers=0, progress=False)
    # the message names the text the user gave, not the prepared folder in the cache
    with pytest.raises(
        MinimoeError,
        match="^the train split of .*ok.txt has 10 tokens, fewer than one window of seq_len\\+1 = 17; give more text or a smaller train.seq_len$",
    ):
        TokenWindows(data, "train", seq_len=16, batch_size=2)
    with pytest.raises(MinimoeError, match="no validation split"):
        EvalWindows(data, "val", seq_len=4)
    held = prepare(tmp_path / "ok.txt", "byte", tmp_path / "h", val_fraction=0.5, workers=0, progress=False)
    with pytest.raises(
        MinimoeError,
        match="^the val split of .*ok.txt \\(held out from it\\) has .*give more text, a validation file or",
    ):
        EvalWindows(held, "val", seq_len=16)
    (tmp_path / "v.txt").write_text("short")
    own = prepare(tmp_path / "ok.txt", "byte", tmp_path / "v", val_source=tmp_path / "v.txt", progress=False)
    with pytest.raises(MinimoeError, match="^the val split of .*v.txt has"):
        EvalWindows(own, "val", seq_len=16)
    assert not list(tmp_path.glob(".o.tmp-*"))  # failed runs leave no temp folders


# ---------------------------------------------------------------------- loaders


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedData:
    d = tmp_path_factory.mktemp("loader")
    write_stories(d / "s.txt", 200)
    return prepare(
        d / "s.txt", "byte", d / "out", val_fraction=0.1, workers=0, shard_tokens=4000, progress=False
    )


def test_token_windows_deterministic_and_real(prepared):
    a = TokenWindows(prepared, "train", seq_len=32, batch_size=4, seed=7)
    b = TokenWindows(prepared.dir, "train", seq_len=32, batch_size=4, seed=7)
    c = TokenWindows(prepared, "train", seq_len=32, batch_size=4, seed=8)
    for _ in range(3):
        (xa, ya), (xb, yb), (xc, _) = next(a), next(b), next(c)
        assert torch.equal(xa, xb) and torch.equal(ya, yb) and not torch.equal(xa, xc)
    # neighbouring seeds are not the same stream shifted by a step
    assert not torch.equal(a.batch_at(1)[0], c.batch_at(0)[0])
    assert xa.shape == (4, 32) and xa.dtype == torch.int64 and xa.is_contiguous()
    assert torch.equal(xa[:, 1:], ya[:, :-1])
    shards = [np.asarray(m) for m in prepared.memmaps("train")]
    assert len(shards) > 1
    for row, tgt in zip(xa.numpy(), ya.numpy()):  # each window is a real slice of one shard
        window = np.concatenate([row, tgt[-1:]])
        assert any(
            np.array_equal(s[i : i + 33], window)
            for s in shards
            for i in np.flatnonzero(s[: len(s) - 32] == row[0])
        )


def test_token_windows_resume(prepared):
    run = TokenWindows(prepared, "train", seq_len=16, batch_size=3, seed=1)
    for _ in range(5):
        next(run)
    state = run.state_dict()
    expected = [next(run) for _ in range(3)]
    resumed = TokenWindows(prepared, "train", seq_len=16, batch_size=3, seed=999)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for (x, y), (ex, ey) in zip((next(resumed) for _ in range(3)), expected):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_token_windows_rank_slices(prepared):
    full = TokenWindows(prepared, "train", seq_len=16, batch_size=8, seed=3)
    ranks = [
        TokenWindows(prepared, "train", seq_len=16, batch_size=4, seed=3, rank=r, world_size=2)
        for r in (0, 1)
    ]
    for _ in range(3):
        x, _ = next(full)
        parts = [next(r)[0] for r in ranks]
        assert torch.equal(torch.cat(parts), x)
    with pytest.raises(MinimoeError, match="rank"):
        TokenWindows(prepared, "train", seq_len=16, batch_size=4, rank=2, world_size=2)


def test_eval_windows_cover_split(prepared):
    val = read_split(prepared, "val")
    ev = EvalWindows(prepared, "val", seq_len=10, batch_size=4)
    batches = list(ev)
    assert len(batches) == len(ev) and all(torch.equal(x, y) for (x, _), (y, _) in zip(batches, ev))
    targets = torch.cat([y.reshape(-1) for _, y in batches]).numpy()
    n = (len(val) - 1) // 10 * 10
    assert ev.num_targets == n and np.array_equal(targets, val[1 : n + 1])
    halves = [EvalWindows(prepared, "val", seq_len=10, batch_size=4, rank=r, world_size=2) for r in (0, 1)]
    assert halves[0].num_windows == halves[1].num_windows == (n // 10) // 2
    rows = torch.cat([x for x, _ in batches])
    for r, h in enumerate(halves):  # rank r takes every 2nd window: disjoint, same count
        assert torch.equal(torch.cat([x for x, _ in h]), rows[r::2][: h.num_windows])
    few = EvalWindows(prepared, "val", seq_len=10, batch_size=4, max_batches=2)
    assert len(few) == 2 and few.num_windows == 8
    # the trainer gives each of W ranks batch_size / W rows and the same max_batches: the ranks
    # together evaluate the windows one process evaluates, so validation does not grow with W
    one = torch.cat([x for x, _ in EvalWindows(prepared, "val", seq_len=10, batch_size=4, max_batches=2)])
    parts = [
        EvalWindows(prepared, "val", seq_len=10, batch_size=2, max_batches=2, rank=r, world_size=2)
        for r in (0, 1)
    ]
    assert sum(p.num_windows for p in parts) == len(one)
    rows = [tuple(x) for p in parts for b, _ in p for x in b.tolist()]
    assert sorted(rows) == sorted(tuple(x) for x in one.tolist())


def test_eval_windows_thinned_evenly_over_the_split(prepared):
    """max_batches keeps windows spread evenly over the whole split, in order (window floor(i n / keep)
    of the full set), not the first ones."""
    full = torch.cat([x for x, _ in EvalWindows(prepared, "val", seq_len=10, batch_size=4)])
    n = len(full)
    few = torch.cat([x for x, _ in EvalWindows(prepared, "val", seq_len=10, batch_size=2, max_batches=3)])
    keep = len(few)
    assert keep == 6 and n > 2 * keep
    assert torch.equal(few, full[[i * n // keep for i in range(keep)]])


def test_token_windows_reach_the_last_window_of_a_shard(tmp_path):
    """Every window that fits is a candidate, the one ending on a shard's last token included: with
    11 tokens and seq_len 9 the starts are 0 and 1, and 80 seeded draws take both."""
    (tmp_path / "t.txt").write_text("abcdefghij", encoding="utf-8")
    data = prepare(tmp_path / "t.txt", "byte", tmp_path / "o", val_fraction=0, workers=0, progress=False)
    (shard,) = [np.asarray(m) for m in data.memmaps("train")]
    assert len(shard) == 11
    tw = TokenWindows(data, "train", seq_len=9, batch_size=4, seed=0)
    starts, last_targets = set(), set()
    for _ in range(20):
        x, y = next(tw)
        assert torch.equal(x[:, 1:], y[:, :-1])
        starts.update(int(np.flatnonzero(shard == row[0])[0]) for row in x.numpy())  # tokens are distinct
        last_targets.update(y[:, -1].tolist())
    assert starts == {0, 1}
    assert int(shard[-1]) in last_targets  # the shard's last token (the EOS) is a target


def _three_shards(tmp_path) -> tuple[PreparedData, np.ndarray]:
    """35 distinct bytes and the EOS: 36 train tokens in three shards of exactly 12."""
    text = "abcdefghijklmnopqrstuvwxyzABCDEFGHI"
    (tmp_path / "t.txt").write_text(text, encoding="utf-8")
    data = prepare(tmp_path / "t.txt", "byte", tmp_path / "o", val_fraction=0, workers=0, shard_tokens=12,
                   progress=False)  # fmt: skip
    shards = [np.asarray(m) for m in data.memmaps("train")]
    assert [len(s) for s in shards] == [12, 12, 12]
    return data, np.concatenate(shards)


def test_token_windows_map_every_start_to_its_own_shard(tmp_path):
    """With several shards, each draw is a whole window inside one shard, and every start of every shard
    is drawn (the first start of shard k + 1 comes right after the last of shard k: no window begins
    in the short tail of the shard before it)."""
    data, stream = _three_shards(tmp_path)
    tw = TokenWindows(data, "train", seq_len=9, batch_size=8, seed=0)
    starts = set()
    for _ in range(30):
        x, y = next(tw)
        for row, target in zip(x.numpy(), y.numpy()):
            pos = int(np.flatnonzero(stream == row[0])[0])  # every token is distinct
            assert pos // 12 == (pos + 9) // 12, pos  # inside one shard
            assert np.array_equal(row, stream[pos : pos + 9]) and np.array_equal(
                target, stream[pos + 1 : pos + 10]
            )
            starts.add(pos)
    assert starts == {s * 12 + o for s in range(3) for o in range(3)}


def test_eval_windows_of_a_shard_whose_length_is_a_multiple_of_seq_len(tmp_path):
    """A shard of 12 tokens holds two whole windows of 4 + 1 tokens (starts 0 and 4); the third (start 8)
    would need a 13th token and is dropped, so every batch is full-length."""
    data, stream = _three_shards(tmp_path)
    ev = EvalWindows(data, "train", seq_len=4, batch_size=4)
    assert ev.num_windows == 6 and ev.num_targets == 24
    xs, ys = zip(*ev)
    got = torch.cat(xs).numpy()
    want = np.stack([stream[s * 12 + o : s * 12 + o + 4] for s in range(3) for o in (0, 4)])
    assert np.array_equal(got, want)
    targets = np.stack([stream[s * 12 + o + 1 : s * 12 + o + 5] for s in range(3) for o in (0, 4)])
    assert np.array_equal(torch.cat(ys).numpy(), targets)


def test_eval_windows_give_every_rank_the_same_number_of_rows(tmp_path):
    """6 windows over 4 ranks: each rank evaluates one window (its batches yield exactly num_windows
    rows), none evaluates a second one that the others lack."""
    data, _ = _three_shards(tmp_path)
    for batch_size in (1, 2, 4):
        ranks = [
            EvalWindows(data, "train", seq_len=4, batch_size=batch_size, rank=r, world_size=4)
            for r in range(4)
        ]
        rows = [sum(len(x) for x, _ in ev) for ev in ranks]
        assert rows == [1, 1, 1, 1] and [ev.num_windows for ev in ranks] == [1, 1, 1, 1], batch_size
        firsts = [tuple(next(iter(ev))[0][0].tolist()) for ev in ranks]
        assert len(set(firsts)) == 4  # disjoint windows


def test_a_document_longer_than_a_segment_gets_one_eos(tmp_path, monkeypatch):
    """A document read as several segments (over SEGMENT_CHARS) is still one document: one EOS at
    its end, none between its segments."""
    from minimoe.data import corpus
    from minimoe.data.corpus import SEGMENT_CHARS

    monkeypatch.setattr(corpus, "READ_CHARS", 1 << 16)  # read in pieces, so the text is cut into segments

    line = "the cat sat on a mat\n"
    long_doc = line * (3 * SEGMENT_CHARS // 2 // len(line))  # > 1 segment
    assert len(long_doc) > SEGMENT_CHARS
    (tmp_path / "t.txt").write_text(long_doc + EOT + "\nshort one\n", encoding="utf-8")
    data = prepare(tmp_path / "t.txt", "byte", tmp_path / "o", val_fraction=0, workers=0, progress=False)
    ids = read_split(data, "train")
    want = list(long_doc.removesuffix("\n").encode()) + [256] + list(b"short one\n") + [256]
    segs = list(open_source(str(tmp_path / "t.txt")).segments())
    assert len(segs) > 2 and [end for _, end in segs].count(True) == 2  # the long one is cut
    assert data.meta["splits"]["train"]["documents"] == 2
    assert np.count_nonzero(ids == 256) == 2 and ids.tolist() == want


@pytest.mark.parametrize("n_docs, mode", [(16, "document"), (15, "stream")])
def test_split_mode_threshold_is_min_val_docs_inclusive(tmp_path, n_docs, mode):
    """val_fraction * documents == MIN_VAL_DOCS (8) is enough for a whole-document split."""
    write_stories(tmp_path / "s.txt", n_docs, words_per_doc=5)
    data = prepare(tmp_path / "s.txt", "byte", tmp_path / "o", val_fraction=0.5, workers=0, progress=False)
    assert data.meta["split_mode"] == mode
    if mode == "document":
        assert data.meta["splits"]["val"]["documents"] == 8


@pytest.mark.parametrize("vocab_size, dtype", [(65536, "uint16"), (65537, "uint32")])
def test_shard_dtype_at_the_uint16_boundary(tmp_path, vocab_size, dtype):
    """ids < 65536 fit uint16: a vocabulary of exactly 65536 uses it, one more entry needs uint32;
    the largest id (the EOS, added last) survives the round trip either way."""
    tiny = 21  # "[UNK]" and the 20 words of tiny_hf_tokenizer
    big = Tokenizer.load(tiny_hf_tokenizer(tmp_path / "tk", extra=vocab_size - tiny - 1))
    assert big.vocab_size == vocab_size and big.eos_id == vocab_size - 1
    write_stories(tmp_path / "s.txt", 3, words_per_doc=5)
    data = prepare(tmp_path / "s.txt", big, tmp_path / "o", val_fraction=0, workers=0, progress=False)
    assert data.meta["dtype"] == dtype
    ids = read_split(data, "train")
    assert np.count_nonzero(ids == vocab_size - 1) == 3 and ids[-1] == vocab_size - 1
    assert data.meta["max_token_id"] == vocab_size - 1


def test_long_documents_are_cut_at_their_last_newline_before_the_limit():
    """A document over max_chars comes out in segments as long as the limit allows, each cut before
    a newline (not at the first one: many tiny segments would tokenize slowly and cut more tokens)."""
    text = "".join(f"line {i}\n" for i in range(40))  # 7-8 characters per line
    segs = list(split_documents([text], max_chars=50))
    assert "".join(t for t, _ in segs) == text and [e for _, e in segs][-1]
    for (t, end), (after, _) in zip(segs, segs[1:]):
        assert not end and 42 <= len(t) <= 50 and after.startswith("\n")


def test_byte_order_marks_and_blank_records(tmp_path, monkeypatch):
    """A UTF-8 byte-order mark at the start of a file is dropped (text files and folders); the same
    character later in the text is kept, even where a read chunk starts. Whitespace-only JSONL
    records are no documents. Suffixes are read case-insensitively."""
    import minimoe.data.corpus as corpus

    monkeypatch.setattr(corpus, "READ_CHARS", 4)
    (tmp_path / "d").mkdir()
    for f in (tmp_path / "bom.txt", tmp_path / "d" / "bom.txt"):
        f.write_text("\ufeffabc\ufeffdef", encoding="utf-8")  # the second mark starts the second chunk
        assert list(open_source(f.parent if f.parent.name == "d" else f).documents()) == ["abc\ufeffdef"]
    rows = [{"text": "one"}, {"text": "  \n "}, {"text": "two"}]
    for name in ("r.jsonl", "R.JSONL"):
        (tmp_path / name).write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
        assert list(open_source(tmp_path / name).documents()) == ["one", "two"]


def test_jsonl_files_starting_with_a_byte_order_mark_are_read(tmp_path):
    """A UTF-8 byte-order mark before the first JSON line is dropped, as in text files: in training data
    (a file, a folder, a .json file), eval task files, chat data and generate's prompt files."""
    from minimoe.cli.generate import read_prompt_file
    from minimoe.eval.tasks import load_records
    from minimoe.finetune.chat import read_conversations

    bom = "\ufeff"
    (tmp_path / "d").mkdir()
    for f in (tmp_path / "t.jsonl", tmp_path / "d" / "t.jsonl", tmp_path / "t.json"):
        f.write_text(bom + '{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
        assert list(open_source(f.parent if f.parent.name == "d" else f).documents()) == ["one", "two"]
    (tmp_path / "mc.jsonl").write_text(bom + '{"context": "c", "choices": ["a", "b"], "label": 1}\n')
    assert [r.data for r in load_records(tmp_path / "mc.jsonl").records] == [
        {"context": "c", "choices": ["a", "b"], "label": 1}
    ]
    (tmp_path / "chat.jsonl").write_text(bom + '{"prompt": "hi", "response": "hello"}\n')
    assert [[m["content"] for m in c] for c in read_conversations(tmp_path / "chat.jsonl")] == [
        ["hi", "hello"]
    ]
    (tmp_path / "p.jsonl").write_text(bom + '{"prompt": "once"}\n')
    (tmp_path / "p.txt").write_text(bom + "once\n")
    assert (
        read_prompt_file(str(tmp_path / "p.jsonl")) == read_prompt_file(str(tmp_path / "p.txt")) == ["once"]
    )


def test_the_content_hash_covers_the_text_field(tmp_path):
    f = tmp_path / "r.jsonl"
    f.write_text(json.dumps({"a": "x", "b": "y"}) + "\n", encoding="utf-8")
    assert open_source(f, text_field="a").content_hash() != open_source(f, text_field="b").content_hash()


def test_shard_writer_fills_each_shard_across_writes(tmp_path):
    """Writes that do not line up with shard boundaries still give full shards of shard_tokens."""
    from minimoe.data.shards import ShardWriter

    w = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=4)
    for n in (3, 5, 2):
        w.write(np.arange(n))
    w.close()
    assert w.shards == [["train_000.bin", 4], ["train_001.bin", 4], ["train_002.bin", 2]]
    ids = np.concatenate([np.fromfile(tmp_path / n, dtype=np.uint16) for n, _ in w.shards])
    assert ids.tolist() == [0, 1, 2, 0, 1, 2, 3, 4, 0, 1]


def test_a_pretokenized_val_source_leaves_the_train_bytes_counted(tmp_path):
    """Bits per byte: text train data keeps its byte count when validation is a token array (whose
    bytes are unknown)."""
    (tmp_path / "t.txt").write_text("the cat sat\n", encoding="utf-8")
    np.array([104, 105, 256], dtype=np.uint16).tofile(tmp_path / "v.bin")
    data = prepare(
        tmp_path / "t.txt", "byte", tmp_path / "o", val_source=tmp_path / "v.bin", workers=0, progress=False
    )
    assert data.num_bytes("train") == len("the cat sat\n") and data.num_bytes("val") is None
    assert data.num_tokens("val") == 3 and data.tokens_per_byte("val") is None


def test_the_cache_is_keyed_on_shard_size_tokenizer_spec_and_the_val_source(tmp_path):
    src, val, out = tmp_path / "s.txt", tmp_path / "v.txt", tmp_path / "out"
    write_stories(src, 20)
    val.write_text("held out\n")
    run = lambda **kw: prepare(src, kw.pop("tok", "byte"), out, workers=0, progress=False, **kw)  # noqa: E731
    assert not run(val_source=val).cached
    assert run(val_source=val, val_fraction=0.3).cached  # val_fraction means nothing with a val source
    val.write_text("other text\n")
    changed = run(val_source=val)
    assert not changed.cached and read_split(changed, "val").tolist() == list(b"other text\n") + [256]
    assert not run(val_source=val, shard_tokens=100).cached
    assert len(PreparedData.load(out).shard_paths("train")) > 1
    write_stories(src, 200)
    assert not run(tok="bpe:300").cached
    assert run(tok="bpe:300").cached and not run(tok="bpe:310").cached


def test_a_validation_file_inside_the_training_folder_is_not_trained_on(tmp_path):
    """`val_source` inside the training folder (through a `..` path or a symbolic link) is validation
    only: its files leave the training folder's file list, which the prepared data's identity covers.
    Sources that leave no training data are one sentence."""
    root = tmp_path / "corpus"
    (root / "sub").mkdir(parents=True)
    (root / "a.txt").write_text("the cat sat on the mat\n", encoding="utf-8")
    (root / "held_out.txt").write_text("qwzx held out vlkj\n", encoding="utf-8")
    val = root / "sub" / ".." / "held_out.txt"
    data = prepare(root, "byte", tmp_path / "o", val_source=val, workers=0, progress=False)
    assert bytes(read_split(data, "train")[:-1].astype(np.uint8)) == b"the cat sat on the mat\n"
    assert read_split(data, "val").tolist() == list(b"qwzx held out vlkj\n") + [256]
    assert [f[0] for f in data.meta["sources"]["train"]["files"]] == ["a.txt"]
    assert prepare(root, "byte", tmp_path / "o", val_source=val, workers=0, progress=False).cached
    (root / "held_out.txt").write_text("other held out\n", encoding="utf-8")
    data = prepare(root, "byte", tmp_path / "o", val_source=val, workers=0, progress=False)
    assert not data.cached and data.num_tokens("train") == len("the cat sat on the mat\n") + 1
    (tmp_path / "outside.txt").write_text("linked held out\n", encoding="utf-8")
    (root / "link.txt").symlink_to(tmp_path / "outside.txt")  # the same file under another name
    data = prepare(
        root, "byte", tmp_path / "l", val_source=tmp_path / "outside.txt", workers=0, progress=False
    )
    assert [f[0] for f in data.meta["sources"]["train"]["files"]] == ["a.txt", "held_out.txt"]
    (root / "sub" / "v.txt").write_text("only validation\n", encoding="utf-8")
    for train, held, msg in [
        (root / "a.txt", root / "a.txt", r"^the training data and the validation data are the same file"),
        (root / "a.txt", root, r"^the training data .*a.txt is one of the validation files of"),
        (
            root / "sub",
            root / "sub" / "v.txt",
            r"^the training folder .*sub holds nothing but the validation",
        ),
        (
            f"hf:{root}",
            root / "a.txt",
            r"^the validation data .*a.txt is inside the training data .* read whole",
        ),
    ]:
        with pytest.raises(MinimoeError, match=msg):
            prepare(train, "byte", tmp_path / "x", val_source=held, workers=0, progress=False)


def test_document_split_bpe_learns_nothing_from_the_validation_documents(tmp_path):
    """A document split's tokenizer learns from the training documents only (every 10th is held out)."""
    docs = ["qwzx vlkj qwzx vlkj." if i % 10 == 9 else "the cat sat on the mat." for i in range(100)]
    (tmp_path / "s.txt").write_text("".join(d + "\n" + EOT + "\n" for d in docs), encoding="utf-8")
    data = prepare(tmp_path / "s.txt", "bpe:300", tmp_path / "o", val_fraction=0.1, workers=0, progress=False)
    assert data.meta["split_mode"] == "document" and data.meta["splits"]["val"]["documents"] == 10
    vocab = data.tokenizer()._hf.get_vocab()
    assert [t for t in vocab if len(t.strip("Ġ")) > 1 and set(t.strip("Ġ")) <= set("qwzxvlkj")] == []
    assert any("cat" in t for t in vocab)


def test_a_prepared_folder_refuses_a_tokenizer_swapped_for_another_of_its_size(prepared, tmp_path):
    """The shards' tokenizer is checked against the hash meta.json records when it is read: another
    tokenizer of the same vocabulary size put in its place (after the folder's files were checked) is
    refused, not used to decode the shards."""
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(prepared.dir, copy)
    data = PreparedData.load(copy)  # opened while complete: its files' sizes are checked here
    size = prepared.tokenizer().vocab_size
    words = Tokenizer.load(tiny_hf_tokenizer(tmp_path / "w0")).vocab_size
    other = Tokenizer.load(tiny_hf_tokenizer(tmp_path / "w", extra=size - words))  # a word-level one
    shutil.rmtree(copy / "tokenizer")
    other.save(copy / "tokenizer")
    assert Tokenizer.load(copy / "tokenizer").vocab_size == size
    with pytest.raises(MinimoeError, match="is not the one the shards were made with"):
        data.tokenizer()
