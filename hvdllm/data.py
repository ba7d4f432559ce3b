"""Corpus -> cached token files -> deterministic, rank-disjoint batches.

`prepare` tokenises once per corpus/tokenizer setting into `<cache>/<fingerprint>/` (rank 0 writes,
the others wait); `Sampler` and `eval_batches` cut per-rank batches from the memory-mapped tokens.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import sysconfig
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import HvdllmError, PeerTimeout
from .tokenizer import get_tokenizer

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}
SEPARATOR = "\n\n"          # between documents, so the model sees where one file ends
FORMAT_VERSION = 1          # bump when the cache layout or tokenisation changes


# ---------------------------------------------------------------------------------------------
# The corpus: which files, in which order, how much of them.

def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = [p for p in root.rglob("*.py") if not skip & set(p.relative_to(root).parts)]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _walk(root: Path) -> list[Path]:
    found = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
        found += [Path(d) / n for n in names if Path(n).suffix in TEXT_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _list_files(paths) -> list[tuple[str, Path]]:
    """(name, path) for every input file, in a fixed order. Names are relative, for the cache key."""
    if not paths:
        root, files = _stdlib_files()
        return [(p.relative_to(root).as_posix(), p) for p in files]
    out = []
    for given in paths:
        p = Path(given).expanduser()
        if p.is_file():             # an explicit file is taken whatever its suffix
            out.append((p.name, p))
        elif p.is_dir():
            out += [(f"{p.name}/{f.relative_to(p).as_posix()}", f) for f in _walk(p)]
        else:
            raise HvdllmError(f"data.corpus: {given!r} does not exist; set data.corpus to text files "
                              f"or folders (or [] for the Python standard library)")
    return out


def _take(files, max_bytes: int) -> list[tuple[str, Path, os.stat_result]]:
    """The files the byte cap actually reaches, with their stat (for the fingerprint)."""
    out, total = [], 0
    for name, path in files:
        if max_bytes and total >= max_bytes:
            break
        st = path.stat()
        out.append((name, path, st))
        total += st.st_size
    return out


def _corpus(paths, max_bytes: int):
    files = _take(_list_files(paths), max_bytes)
    if not files or not sum(st.st_size for _, _, st in files):
        where = ", ".join(map(str, paths)) if paths else "the Python standard library"
        raise HvdllmError(f"data.corpus: no text found in {where} (folders are searched for "
                          f"{' '.join(sorted(TEXT_SUFFIXES))} files)")
    return files


def _read(files, max_bytes: int) -> list[tuple[str, str]]:
    docs, total = [], 0
    for name, path, _ in files:
        raw = path.read_bytes()
        if max_bytes:
            raw = raw[:max_bytes - total]
        total += len(raw)
        # errors="replace": one stray Latin-1 file must not stop a run
        docs.append((name, raw.decode("utf-8", errors="replace")))
        if max_bytes and total >= max_bytes:
            break
    return docs


def load_corpus(paths: list[str], max_bytes: int) -> list[tuple[str, str]]:
    """(name, text) per file; empty `paths` = the stdlib's own *.py. Stops at max_bytes (0 = all)."""
    return _read(_corpus(paths, max_bytes), max_bytes)


def corpus_fingerprint(data_cfg, files=None) -> str:
    """Short hash of everything the prepared tokens depend on: the cache key.

    Files enter by relative name, size and mtime (not content: hashing 8 MB on every start is
    wasted time, and an edit changes the mtime anyway).
    """
    files = _corpus(data_cfg.corpus, data_cfg.max_bytes) if files is None else files
    key = {"version": FORMAT_VERSION, "files": [(n, st.st_size, st.st_mtime_ns) for n, _, st in files],
           "tokenizer": data_cfg.tokenizer, "max_bytes": data_cfg.max_bytes,
           "val_fraction": data_cfg.val_fraction, "separator": SEPARATOR,
           "bpe_vocab_size": data_cfg.bpe_vocab_size if data_cfg.tokenizer == "bpe" else None}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Preparation: rank 0 tokenises into a temp folder and renames it into place; others wait.

@dataclass
class TokenData:
    train: np.memmap
    val: np.memmap
    tokenizer: object
    meta: dict


def default_cache_dir(data_cfg) -> Path:
    if data_cfg.cache_dir:
        return Path(data_cfg.cache_dir).expanduser()
    if os.environ.get("HVDLLM_CACHE"):
        return Path(os.environ["HVDLLM_CACHE"]).expanduser() / "data"
    return Path.home() / ".cache" / "hvdllm" / "data"


def _progress(items, rank: int):
    # A bar only where a person watches (rank 0, terminal) and only if tqdm is installed.
    if rank != 0 or not sys.stderr.isatty():
        return items
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc="tokenising", unit="file", file=sys.stderr, leave=False)


def _build(data_cfg, files, folder: Path, rank: int) -> None:
    """Tokenise the corpus into `folder` (train.bin, val.bin, tokenizer.json?, meta.json last)."""
    docs = _read(files, data_cfg.max_bytes)
    print(f"[hvdllm] tokenising {len(docs)} files ({sum(len(t) for _, t in docs) / 1e6:.1f} M chars) "
          f"with the {data_cfg.tokenizer} tokenizer", file=sys.stderr)
    tok = get_tokenizer(data_cfg, [t for _, t in docs], folder)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    sep = tok.encode_array(SEPARATOR)
    parts = [np.concatenate([tok.encode_array(text), sep]) for _, text in _progress(docs, rank)]
    tokens = np.concatenate(parts).astype(dtype)
    n_val = max(1, int(len(tokens) * data_cfg.val_fraction))
    if len(tokens) - n_val < 2:
        raise HvdllmError(f"data.corpus: only {len(tokens)} tokens, too few to train on")
    tokens[:-n_val].tofile(folder / "train.bin")
    tokens[-n_val:].tofile(folder / "val.bin")
    meta = {"n_train": len(tokens) - n_val, "n_val": n_val, "vocab_size": tok.vocab_size,
            "tokenizer": tok.name, "dtype": np.dtype(dtype).name, "n_files": len(docs),
            "n_bytes": sum(len(t.encode("utf-8", errors="replace")) for _, t in docs),
            "source": ", ".join(map(str, data_cfg.corpus)) or
            f"Python standard library ({sysconfig.get_paths()['stdlib']})"}
    # meta.json is written last: its presence marks a complete folder.
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _publish(data_cfg, files, final: Path, rank: int) -> None:
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and not (final / "meta.json").exists():
        # Incomplete (not made by _publish, whose rename is atomic): move aside, then delete.
        junk = Path(tempfile.mkdtemp(prefix=f".junk-{final.name}-", dir=final.parent))
        try:
            os.rename(final, junk / "old")
        except OSError:
            pass                # someone else moved it first
        shutil.rmtree(junk, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)        # mkdtemp makes it private; a shared cache must be readable
    try:
        _build(data_cfg, files, tmp, rank)
        try:
            os.rename(tmp, final)   # atomic: readers see no folder or a complete one
        except OSError:
            if not (final / "meta.json").exists():
                raise
            # another job published the same fingerprint first: keep theirs (same content)
        print(f"[hvdllm] prepared tokens cached in {final}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for(meta_path: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while not meta_path.exists():
        if time.monotonic() >= deadline:
            raise PeerTimeout(
                f"waited {timeout_s:.0f}s for rank 0 to prepare the corpus at {meta_path.parent}: "
                f"check rank 0's output for an error; if ranks run on several machines, data.cache_dir "
                f"(or HVDLLM_CACHE) must be a shared folder; a big corpus may need a longer "
                f"train.step_timeout (or run once with one process to fill the cache)")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


def prepare(data_cfg, rank: int, cache_dir=None, timeout_s: float = 600) -> TokenData:
    """Tokenise the corpus once (rank 0) into the cache and memory-map it (every rank)."""
    files = _corpus(data_cfg.corpus, data_cfg.max_bytes)
    final = Path(cache_dir or default_cache_dir(data_cfg)) / corpus_fingerprint(data_cfg, files)
    meta_path = final / "meta.json"
    if not meta_path.exists():
        if rank == 0:
            _publish(data_cfg, files, final, rank)
        else:
            _wait_for(meta_path, timeout_s)
    meta = json.loads(meta_path.read_text())
    meta["cache"] = str(final)
    tok = get_tokenizer(data_cfg, None, final)     # BPE: the one rank 0 trained and saved

    def mm(name, n):
        return np.memmap(final / name, dtype=meta["dtype"], mode="r", shape=(n,))
    return TokenData(mm("train.bin", meta["n_train"]), mm("val.bin", meta["n_val"]), tok, meta)


# ---------------------------------------------------------------------------------------------
# Sampling.

def _windows(tokens, starts: np.ndarray, block_size: int):
    idx = starts[:, None] + np.arange(block_size + 1)
    w = np.asarray(tokens[idx], dtype=np.int64)
    return w[:, :-1], w[:, 1:]


def _n_windows(tokens, block_size: int) -> int:
    return max(0, (len(tokens) - 1) // block_size)


class Sampler:
    """Per-rank training batches: deterministic in (seed, step), disjoint across ranks.

    The dataset is the non-overlapping windows of block_size+1 tokens at stride block_size. Step s
    lies in epoch e = s // steps_per_epoch; the epoch's order is a permutation seeded by (seed, e).
    Step s owns the global slice G of D*b consecutive windows of that order (D ranks, b per rank),
    and rank r takes G[r::D]. So within an epoch no two ranks (or steps) share a window, and the
    set of windows a step trains on depends only on D*b: np=2 with batch b sees exactly the
    sequences np=1 with batch 2b sees, only in another order. The averaged gradient of a mean loss
    is the same either way, which is why data parallelism reproduces single-process training.
    """

    def __init__(self, tokens, block_size: int, batch_size: int, dp_size: int, dp_rank: int,
                 seed: int, shuffle: bool = True):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.dp_size, self.dp_rank, self.seed, self.shuffle = dp_size, dp_rank, seed, shuffle
        self.n_windows = _n_windows(tokens, block_size)
        self.steps_per_epoch = self.n_windows // (dp_size * batch_size)
        if self.steps_per_epoch == 0:
            raise HvdllmError(
                f"the training split has {self.n_windows} windows of model.block_size={block_size}, "
                f"fewer than one global batch of {dp_size}x train.batch_size={batch_size}: lower "
                f"train.batch_size or model.block_size, or use a bigger data.corpus")
        self._epoch, self._perm = None, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._epoch:    # one permutation per epoch, reused by all its steps
            self._perm = (np.random.default_rng([self.seed, epoch]).permutation(self.n_windows)
                          if self.shuffle else np.arange(self.n_windows))
            self._epoch = epoch
        return self._perm

    def windows(self, step: int) -> np.ndarray:
        """Indices of the windows this rank trains on at `step`."""
        epoch, i = divmod(step, self.steps_per_epoch)
        g = self.dp_size * self.batch_size
        return self._order(epoch)[i * g:(i + 1) * g][self.dp_rank::self.dp_size]

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y), int64 of shape (batch_size, block_size); y is x shifted by one token."""
        return _windows(self.tokens, self.windows(step) * self.block_size, self.block_size)


def eval_batches(val_tokens, block_size: int, batch_size: int, dp_size: int, dp_rank: int,
                 n_batches: int):
    """(x, y) over the first n_batches global batches of validation windows, in order, split
    G[r::D] like training. A small split gives as many full global batches as fit (at least one)."""
    g = dp_size * batch_size
    fit = _n_windows(val_tokens, block_size) // g
    if fit == 0:
        raise HvdllmError(
            f"the validation split ({len(val_tokens)} tokens) holds no global batch of {dp_size}x"
            f"train.batch_size={batch_size} windows of model.block_size={block_size}: raise "
            f"data.val_fraction or data.max_bytes, or lower train.batch_size")
    for i in range(max(1, min(n_batches, fit))):
        starts = np.arange(i * g, (i + 1) * g)[dp_rank::dp_size] * block_size
        yield _windows(val_tokens, starts, block_size)


def unigram_entropy(tokens) -> float:
    """Entropy of the token frequencies, nats/token: the loss of a model that ignores context.
    A trained model's loss should be well below it."""
    counts = np.zeros(1, dtype=np.int64)
    for i in range(0, len(tokens), 1 << 24):   # chunks: no int64 copy of the whole memmap
        c = np.bincount(np.asarray(tokens[i:i + (1 << 24)]))
        counts = np.pad(counts, (0, max(0, len(c) - len(counts))))
        counts[:len(c)] += c
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())
