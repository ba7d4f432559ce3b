"""Tokenizers: raw UTF-8 bytes (needs nothing) or byte-level BPE (HF `tokenizers`, trained locally).

Both offer `.name`, `.vocab_size`, `.encode(text) -> list[int]`, `.decode(ids) -> str` and
`.serialize() -> str` (the whole tokenizer as JSON text: stored with every checkpoint, so a resume
can tell whether it still has the same one and `hvdllm generate` needs no corpus; `from_serialized`
rebuilds it). `tokenizers` is imported only when BPE is asked for, so byte mode runs on numpy alone.

A Hugging Face model's own tokenizer.json (any `tokenizers` model: byte-level BPE, SentencePiece
style BPE with byte fallback, ...) loads as a BPETokenizer too (`from_serialized`); a run started
from that model (train.init_from, hvdllm/hf.py) `register`s it, and data.tokenizer then names it
by a digest of its text ("hf:<sha256 prefix>"), so the token cache is per tokenizer. Special tokens
(a Llama tokenizer's BOS) are not added when encoding: text becomes its tokens only.
`byte_level_json()` is the byte tokenizer as an equivalent tokenizer.json, for exports.
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
        return self._tok.encode(text, add_special_tokens=False).ids

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
    if kind.startswith("hf:"):
        if kind not in _REGISTERED:
            raise HvdllmError(f"data.tokenizer: {kind!r} names the tokenizer of a train.init_from model, "
                              f"and none was registered in this process; set train.init_from")
        tok = from_serialized(_REGISTERED[kind])
        if cache_dir is not None and not (Path(cache_dir) / BPE_FILE).exists():
            tok.save(Path(cache_dir) / BPE_FILE)   # beside the tokens it made, for reference
        return tok
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


_REGISTERED: dict[str, str] = {}   # "hf:<digest>" -> tokenizer.json text


def register(text: str) -> str:
    """Make a tokenizer.json text (a train.init_from model's) usable as data.tokenizer; returns
    its name there."""
    import hashlib
    kind = "hf:" + hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
    _REGISTERED[kind] = text
    return kind


def byte_level_json() -> str:
    """ByteTokenizer as a tokenizer.json (ids = UTF-8 byte values): a BPE without merges over
    GPT-2's byte-to-character alphabet, so Hugging Face tokenizers encode exactly as hvdllm did."""
    t = BPETokenizer._lib()
    # GPT-2's bytes_to_unicode: printable bytes map to themselves, the others to 256 + n
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAC + 1)) + list(range(0xAE, 0xFF + 1))
    chars, n = {}, 0
    for b in range(256):
        if b in keep:
            chars[b] = chr(b)
        else:
            chars[b] = chr(256 + n)
            n += 1
    tok = t.Tokenizer(t.models.BPE(vocab={chars[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = t.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = t.decoders.ByteLevel()
    return tok.to_str()


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
