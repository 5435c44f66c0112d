"""Data: tokenizers, document sources, one-time tokenization into memory-mapped shards, and
batch loaders.

Typical use::

    tok = resolve_tokenizer("byte")
    data = prepare("tinystories/train.txt", tok, "run/data", val_source="tinystories/valid.txt")
    batches = TokenWindows(data, "train", seq_len=256, batch_size=16, seed=1337)
    x, y = next(batches)
"""

from minimoe.data.corpus import Corpus, split_documents
from minimoe.data.loader import EvalWindows, TokenWindows
from minimoe.data.prepare import PreparedData, prepare
from minimoe.data.sources import open_source
from minimoe.data.tokenizer import Tokenizer, resolve_tokenizer, train_bpe

__all__ = [
    "Corpus",
    "EvalWindows",
    "PreparedData",
    "TokenWindows",
    "Tokenizer",
    "open_source",
    "prepare",
    "resolve_tokenizer",
    "split_documents",
    "train_bpe",
]
