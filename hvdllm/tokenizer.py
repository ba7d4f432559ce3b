"""Tokenizers: raw UTF-8 bytes (needs nothing) or byte-level BPE (HF `tokenizers`, trained locally).

Both offer `.name`, `.vocab_size`, `.encode(text) -> list[int]`, `.decode(ids) -> str` and
`.serialize() -> str` (the whole tokenizer as JSON text: stored with every checkpoint, so a resume
can tell whether it still has the same one and `hvdllm generate` needs no corpus; `from_serialized`
rebuilds it). `tokenizers` is imported only when BPE is asked for, so byte mode runs on numpy alone.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .errors import HvdllmError

BPE_FILE = "tokenizer.json"


class ByteTokenizer:
    """Each UTF-8 byte is a token: vocabulary 256, lossless on any text."""

    name = "byte"
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_array(self, text: str) -> np.ndarray:
        # Fast path for corpus preparation: no Python list of ints.
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8)

    def decode(self, ids) -> str:
        # A model may emit a byte sequence that is not valid UTF-8: show it, don't fail.
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def serialize(self) -> str:
        return json.dumps({"hvdllm_tokenizer": "byte"})


class BPETokenizer:
    """Byte-level BPE (GPT-2 style): any text round-trips exactly, no unknown tokens."""

    def __init__(self, tok):
        self._tok = tok
        self.vocab_size = tok.get_vocab_size()
        self.name = f"bpe-{self.vocab_size}"

    @staticmethod
    def _lib():
        try:
            import tokenizers
        except ImportError as e:
            raise HvdllmError("data.tokenizer='bpe' needs the `tokenizers` package "
                              "(pip install tokenizers), or set data.tokenizer=byte") from e
        return tokenizers

    @classmethod
    def train(cls, texts, vocab_size: int) -> "BPETokenizer":
        t = cls._lib()
        tok = t.Tokenizer(t.models.BPE())
        tok.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = t.decoders.ByteLevel()
        # The full 256-byte alphabet up front guarantees every byte is encodable, whatever the corpus.
        trainer = t.trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                        initial_alphabet=t.pre_tokenizers.ByteLevel.alphabet(),
                                        special_tokens=[])
        tok.train_from_iterator(texts, trainer=trainer)
        return cls(tok)

    @classmethod
    def load(cls, path) -> "BPETokenizer":
        return cls(cls._lib().Tokenizer.from_file(str(path)))

    def save(self, path) -> None:
        self._tok.save(str(path))

    def serialize(self) -> str:
        return self._tok.to_str()

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_array(self, text: str) -> np.ndarray:
        return np.asarray(self.encode(text), dtype=np.uint32)

    def decode(self, ids) -> str:
        return self._tok.decode([int(i) for i in ids])


def get_tokenizer(data_cfg, texts=None, cache_dir=None):
    """The tokenizer `data_cfg.tokenizer` names.

    BPE: loaded from `<cache_dir>/tokenizer.json` when present, else trained on `texts` (a list of
    strings, in corpus order, so training is deterministic) and saved there when cache_dir is given.
    """
    kind = data_cfg.tokenizer
    if kind == "byte":
        return ByteTokenizer()
    if kind != "bpe":
        raise HvdllmError(f"data.tokenizer: {kind!r} is not one of 'byte', 'bpe'")
    path = Path(cache_dir) / BPE_FILE if cache_dir is not None else None
    if path is not None and path.exists():
        return BPETokenizer.load(path)
    if texts is None:
        raise HvdllmError(f"no trained BPE tokenizer at {path} and no texts to train one on")
    tok = BPETokenizer.train(texts, data_cfg.bpe_vocab_size)
    if path is not None:
        tok.save(path)
    return tok


def from_serialized(text: str):
    """The tokenizer `serialize()` wrote (a byte tokenizer or a BPE's JSON)."""
    try:
        if json.loads(text).get("hvdllm_tokenizer") == "byte":
            return ByteTokenizer()
    except (ValueError, AttributeError) as e:
        raise HvdllmError(f"not a serialized tokenizer ({e})") from e
    try:
        return BPETokenizer(BPETokenizer._lib().Tokenizer.from_str(text))
    except Exception as e:  # tokenizers raises its own exception type on a bad file
        if isinstance(e, HvdllmError):
            raise
        raise HvdllmError(f"not a serialized tokenizer ({e})") from e


def same(a: str, b: str) -> bool:
    """Whether two serialized tokenizers are the same tokenizer (key order aside)."""
    try:
        return json.loads(a) == json.loads(b)
    except ValueError:
        return a == b
