"""Corpus -> cached token files -> deterministic, rank-disjoint batches.

`prepare` tokenises once per corpus/tokenizer setting into `<cache>/<fingerprint>/`; `Sampler` and
`eval_batches` cut per-rank batches from the memory-mapped tokens.

The corpus (data.corpus) is a list of files, in order: text files (one document each; folders are
searched for them), record files (*.jsonl / *.ndjson / *.csv / *.tsv / *.parquet, and the Arrow
shards of a saved Hugging Face dataset folder: one document per record, its data.text_field), and
patterns like 'shards/*.jsonl' (their matches, sorted). Every document is followed by SEPARATOR.
Tokenising is one streaming pass: each file's documents are read (JSONL a line at a time, Parquet
a row group and batch at a time, Arrow a batch at a time) and their tokens appended to that file's
part on disk; the parts are joined in file order, in chunks, into train.bin / val.bin, so neither
the corpus nor its tokens is ever held in memory. Under MPI the ranks tokenise disjoint files
(file i on rank i % size) into a staging folder beside the cache and rank 0 joins and publishes
them: the tokens are a one-process build's, byte for byte, whatever the rank count. One process
(or no MPI) builds alone and the other ranks wait. A bad record is one HvdllmError naming the file
and line (row), on every rank, and nothing is cached.

Under MPI every rank first compares its corpus with rank 0's (names, sizes, mtimes; where mtimes
differ, a digest of the bytes each file contributes): nodes that see different files fail at once,
each rank naming the differing files, instead of waiting for a cache folder rank 0 never writes. A cached folder whose
token files do not have the sizes its meta.json records (a truncated copy, a full disk) is rebuilt
by rank 0, with a message.
"""
from __future__ import annotations

import glob
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

from . import records
from .errors import HvdllmError, PeerTimeout
from .tokenizer import BPE_FILE, from_serialized, get_tokenizer

TEXT_SUFFIXES = {".py", ".txt", ".md", ".rst"}
# files read as records, one document each (data.text_field): anywhere else a file is one document
RECORD_SUFFIXES = {".jsonl", ".ndjson", ".csv", ".tsv", ".parquet", ".arrow"}
SEPARATOR = "\n\n"          # between documents, so the model sees where one file ends
FORMAT_VERSION = 2          # bump when the cache layout or tokenisation changes (2: tokens_sha256)


# ---------------------------------------------------------------------------------------------
# The corpus: which files, in which order, how much of them.

def _stdlib_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "__pycache__"}
    files = []
    # pruned while walking: every rank lists the stdlib at start, and descending into an
    # installed site-packages first made that the slowest part of a small run's start-up
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if x not in skip]
        files += [Path(d) / n for n in names if n.endswith(".py")]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def _walk(root: Path) -> list[Path]:
    found = []
    for d, dirs, names in os.walk(root):
        dirs[:] = [x for x in dirs if not x.startswith(".") and x != "__pycache__"]
        found += [Path(d) / n for n in names if Path(n).suffix in TEXT_SUFFIXES]
    return sorted(found, key=lambda p: p.relative_to(root).as_posix())


def _dataset_shards(p: Path) -> list[tuple[str, Path]]:
    """A `save_to_disk` folder's Arrow files, in state.json's order: each a file of the corpus
    (so the ranks split a dataset by shard, and the fingerprint sees each shard's size and mtime)."""
    if (p / "dataset_dict.json").exists():
        splits = json.loads((p / "dataset_dict.json").read_text()).get("splits", [])
        raise HvdllmError(f"data.corpus: {p} is a DatasetDict with splits {', '.join(splits)}: name a "
                          f"split's folder, e.g. {p / (splits or ['train'])[0]}")
    try:
        entries = json.loads((p / "state.json").read_text()).get("_data_files", [])
        out = [(f"{p.name}/{e['filename']}", p / e["filename"]) for e in entries]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise HvdllmError(f"data.corpus: {p / 'state.json'} does not list the dataset's files ({e!r})") from e
    if not out:
        raise HvdllmError(f"data.corpus: the saved dataset {p} lists no data files (state.json)")
    return out


def _list_files(paths) -> list[tuple[str, Path]]:
    """(name, path) for every input file, in a fixed order. Names are relative, for the cache key."""
    if not paths:
        root, files = _stdlib_files()
        return [(p.relative_to(root).as_posix(), p) for p in files]
    out = []
    for given in paths:
        p = Path(given).expanduser()
        if not p.exists() and glob.has_magic(str(p)):
            # a pattern ("shards/*.jsonl"): its matches, sorted, as if each were named (folders
            # are searched for text files only, so a pattern is how a folder of shards is given)
            matches = sorted(glob.glob(str(p)))
            if not matches:
                raise HvdllmError(f"data.corpus: the pattern {given!r} matches no file; fix the pattern "
                                  f"or the folder it names")
            out += _list_files(matches)
            continue
        if p.is_file():             # an explicit file is taken whatever its suffix
            out.append((p.name, p))
        elif p.is_dir() and ((p / "state.json").exists() or (p / "dataset_dict.json").exists()):
            out += _dataset_shards(p)
        elif p.is_dir():
            out += [(f"{p.name}/{f.relative_to(p).as_posix()}", f) for f in _walk(p)]
        else:
            raise HvdllmError(f"data.corpus: {given!r} does not exist; set data.corpus to text files "
                              f"or folders, JSONL / CSV / Parquet files, saved Hugging Face dataset "
                              f"folders or patterns like 'shards/*.jsonl' (or [] for the Python "
                              f"standard library)")
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


def _budgets(files, max_bytes: int) -> list[int | None]:
    """The bytes the cap lets each file contribute (None = all), from the sizes alone, so every
    rank knows any file's share without reading the files before it. A record file the cap
    reaches is read whole (a record is never cut)."""
    out, total = [], 0
    for _, path, st in files:
        left = max_bytes - total if max_bytes else None
        out.append(None if left is None or path.suffix in RECORD_SUFFIXES else min(st.st_size, left))
        total += st.st_size
    return out


def _record_texts(path: Path, text_field: str):
    """Each record's text, streamed; a bad record is one message naming the file and line/row."""
    keys = "data.text_field"
    if path.suffix == ".parquet":
        found = records.parquet_records(path, (text_field,), keys)
    elif path.suffix == ".arrow":
        found = records.arrow_stream_records(path, (text_field,), keys)
    elif path.suffix in (".csv", ".tsv"):
        found = records.csv_records(path, (text_field,), keys)
    else:
        found = records.json_records(path)
    n = 0
    for where, rec in found:
        if not isinstance(rec, dict) or rec.get(text_field) is None:
            raise records.err(path, where, f"no {text_field!r} field (set data.text_field if the records "
                                           f"call it otherwise)")
        if not isinstance(rec[text_field], str):
            raise records.err(path, where, f"{text_field!r} is {rec[text_field]!r:.60}, not a text")
        n += 1
        yield rec[text_field]
    if not n:
        raise records.err(path, None, "no records (the file is empty); remove it from data.corpus")


def _documents(path: Path, budget: int | None, text_field: str):
    """The texts one corpus file contributes, in order: its records', or its bytes as one text."""
    if path.suffix in RECORD_SUFFIXES:
        yield from _record_texts(path, text_field)
        return
    with open(path, "rb") as f:
        raw = f.read() if budget is None else f.read(budget)
    # errors="replace": one stray Latin-1 file must not stop a run
    yield raw.decode("utf-8", errors="replace")


def _read(files, max_bytes: int, text_field: str = "text") -> list[tuple[str, str]]:
    return [(name, text) for (name, path, _), budget in zip(files, _budgets(files, max_bytes))
            for text in _documents(path, budget, text_field)]


def load_corpus(paths: list[str], max_bytes: int, text_field: str = "text") -> list[tuple[str, str]]:
    """(name, text) per document (a text file, or a record of a JSONL / Parquet / saved-dataset
    file); empty `paths` = the stdlib's own *.py. Stops at max_bytes (0 = all). In memory: for tests
    and small corpora; prepare streams."""
    return _read(_corpus(paths, max_bytes), max_bytes, text_field)


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
    if any(p.suffix in RECORD_SUFFIXES for _, p, _ in files):   # text-only corpora keep their key
        key["text_field"] = data_cfg.text_field
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


CHUNK_TOKENS = 1 << 18         # tokens copied at a time when the parts are joined (bounded memory)


def _make_tokenizer(data_cfg, files, folder: Path):
    """The run's tokenizer; a BPE is trained on the corpus's documents, streamed, and saved in
    `folder` (as an hf: tokenizer is, for reference)."""
    docs = None
    if data_cfg.tokenizer == "bpe":
        docs = (t for (_, path, _), budget in zip(files, _budgets(files, data_cfg.max_bytes))
                for t in _documents(path, budget, data_cfg.text_field))
    return get_tokenizer(data_cfg, docs, folder)


def _dtype(tok):
    return np.uint16 if tok.vocab_size <= 65535 else np.uint32


def _part(i: int) -> str:
    return f"part-{i:06d}.bin"


def _tokenise_files(data_cfg, files, which, tok, parts: Path, rank: int) -> dict:
    """Tokenise the files numbered `which` into parts/part-<i>.bin, one document at a time (each
    followed by the separator, as between text files); {i: [tokens, text bytes]}."""
    dtype, sep = _dtype(tok), tok.encode_array(SEPARATOR)
    budgets = _budgets(files, data_cfg.max_bytes)
    done = {}
    for i in _progress(list(which), rank):
        path, n_tok, n_bytes = files[i][1], 0, 0
        tmp = parts / (_part(i) + ".tmp")
        with open(tmp, "wb") as f:
            for text in _documents(path, budgets[i], data_cfg.text_field):
                ids = np.concatenate([tok.encode_array(text), sep]).astype(dtype)
                ids.tofile(f)
                n_tok += len(ids)
                n_bytes += len(text.encode("utf-8", errors="replace"))
        os.rename(tmp, parts / _part(i))
        done[i] = [n_tok, n_bytes]
    return done


def _join(data_cfg, files, counts: dict, tok, parts: Path, folder: Path) -> None:
    """train.bin and val.bin from the parts in file order, copied in chunks; meta.json last."""
    dtype = _dtype(tok)
    total = sum(counts[i][0] for i in range(len(files)))
    n_val = max(1, int(total * data_cfg.val_fraction))
    if total - n_val < 2:
        raise HvdllmError(f"data.corpus: only {total} tokens, too few to train on")
    sha, written = hashlib.sha256(), 0
    with open(folder / "train.bin", "wb") as train, open(folder / "val.bin", "wb") as val:
        for i in range(len(files)):
            if not (parts / _part(i)).exists():
                raise HvdllmError(f"{files[i][0]} was tokenised by another rank into {parts}, and that "
                                  f"part is not there: data.cache_dir (or HVDLLM_CACHE) must be a folder "
                                  f"every rank shares")
            with open(parts / _part(i), "rb") as f:
                while len(chunk := np.fromfile(f, dtype, CHUNK_TOKENS)):
                    cut = max(0, min(len(chunk), total - n_val - written))
                    train.write(chunk[:cut])     # buffers, not copies
                    val.write(chunk[cut:])
                    sha.update(chunk)
                    written += len(chunk)
    if written != total:
        raise HvdllmError(f"the token parts in {parts} hold {written} tokens, {total} were written: "
                          f"is the cache folder's disk full?")
    meta = {"n_train": total - n_val, "n_val": n_val, "vocab_size": tok.vocab_size,
            "tokenizer": tok.name, "dtype": np.dtype(dtype).name, "n_files": len(files),
            # what a checkpoint records of its data: a resume compares it (checkpoint.check_resume)
            "tokens_sha256": sha.hexdigest(),
            "n_bytes": sum(counts[i][1] for i in range(len(files))),
            "source": ", ".join(map(str, data_cfg.corpus)) or
            f"Python standard library ({sysconfig.get_paths()['stdlib']})"}
    # meta.json is written last: its presence marks a complete folder.
    (folder / "meta.json").write_text(json.dumps(meta, indent=1))


def _announce(data_cfg, files) -> None:
    print(f"[hvdllm] tokenising {len(files)} files ({sum(st.st_size for *_, st in files) / 1e6:.1f} MB) "
          f"with the {data_cfg.tokenizer} tokenizer", file=sys.stderr)


def _build(data_cfg, files, folder: Path, rank: int) -> None:
    """Tokenise the corpus into `folder` (train.bin, val.bin, tokenizer.json?, meta.json last), one
    process, streaming: a file's tokens go to disk as they are made."""
    _announce(data_cfg, files)
    tok = _make_tokenizer(data_cfg, files, folder)
    parts = folder / ".parts"
    parts.mkdir()
    counts = _tokenise_files(data_cfg, files, range(len(files)), tok, parts, rank)
    _join(data_cfg, files, counts, tok, parts, folder)
    shutil.rmtree(parts)


def _damage(folder: Path) -> str | None:
    """None if `folder` is a complete, intact cache entry, else what is wrong ('missing' if absent)."""
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except FileNotFoundError:
        return "missing"
    except (OSError, ValueError) as e:
        return f"meta.json is unreadable ({e})"
    try:
        item = np.dtype(meta["dtype"]).itemsize
        for name, n in (("train.bin", meta["n_train"]), ("val.bin", meta["n_val"])):
            size = (folder / name).stat().st_size
            if size != n * item:
                return f"{name} has {size} bytes, meta.json says {n * item}"
    except FileNotFoundError as e:
        return f"{Path(e.filename).name} is missing"
    except (OSError, KeyError, TypeError) as e:
        return f"meta.json does not describe the token files ({e!r})"
    return None


def _publish(data_cfg, files, final: Path, rank: int, build=None) -> None:
    """Build into a temp folder beside `final` and rename it into place. `build(folder)` fills
    the folder (default: _build, this process alone)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists() and _damage(final) is not None:
        # Incomplete or damaged (not as _publish's atomic rename left it): move aside, then delete.
        junk = Path(tempfile.mkdtemp(prefix=f".junk-{final.name}-", dir=final.parent))
        try:
            os.rename(final, junk / "old")
        except OSError:
            pass                # someone else moved it first
        shutil.rmtree(junk, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    os.chmod(tmp, 0o755)        # mkdtemp makes it private; a shared cache must be readable
    try:
        (build or (lambda folder: _build(data_cfg, files, folder, rank)))(tmp)
        try:
            os.rename(tmp, final)   # atomic: readers see no folder or a complete one
        except OSError:
            if not (final / "meta.json").exists():
                raise
            # another job published the same fingerprint first: keep theirs (same content)
        print(f"[hvdllm] prepared tokens cached in {final}", file=sys.stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _wait_for(folder: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    delay = 0.05
    while (problem := _damage(folder)) is not None:
        if time.monotonic() >= deadline:
            damaged = "" if problem == "missing" else (
                f"; the cached folder is damaged ({problem}): delete {folder} if rank 0 does not "
                f"rebuild it")
            raise PeerTimeout(
                f"waited {timeout_s:.0f}s for rank 0 to prepare the corpus at {folder}{damaged}: "
                f"check rank 0's output for an error; if ranks run on several machines, data.cache_dir "
                f"(or HVDLLM_CACHE) must be a shared folder; a big corpus may need a longer "
                f"train.step_timeout (or run once with one process to fill the cache)")
        time.sleep(delay)
        delay = min(delay * 2, 1.0)


# ---------------------------------------------------------------------------------------------
# Every rank the same corpus: rank 0's listing against everyone's, before anything is written.

def corpus_listing(files, max_bytes: int) -> list[list]:
    """[name, size, sha256 prefix] per file, the digest over the bytes the cap lets the file
    contribute (what _read takes): equal listings tokenise equally, whatever the files' mtimes."""
    out = []
    for (name, path, st), want in zip(files, _budgets(files, max_bytes)):
        sha, got = hashlib.sha256(), 0
        with open(path, "rb") as f:
            while want is None or got < want:
                chunk = f.read(1 << 22 if want is None else min(1 << 22, want - got))
                if not chunk:
                    break
                sha.update(chunk)
                got += len(chunk)
        out.append([name, st.st_size, sha.hexdigest()[:16]])
    return out


def _world(rank: int):
    """COMM_WORLD when this process runs under MPI with other ranks (mpi4py already initialised by
    runtime.start), else None: then there is no one to compare with (one process, or Gloo)."""
    MPI = sys.modules.get("mpi4py.MPI")
    if MPI is None or not MPI.Is_initialized() or MPI.Is_finalized():
        return None
    comm = MPI.COMM_WORLD
    return comm if comm.Get_size() > 1 and comm.Get_rank() == rank else None


def _allgather(comm, obj, timeout_s: float, what: str) -> list:
    """Every rank's JSON-able `obj`, in rank order; non-blocking underneath, so a lost rank is a
    PeerTimeout after timeout_s rather than a hang."""
    from mpi import p2p
    MPI = sys.modules["mpi4py.MPI"]
    payload = np.frombuffer(bytearray(json.dumps(obj).encode()), np.uint8)
    mine, counts = np.array([len(payload)], np.int64), np.zeros(comm.Get_size(), np.int64)
    p2p.wait(comm.Iallgather([mine, MPI.INT64_T], [counts, MPI.INT64_T]), timeout_s, what)
    counts_l = [int(c) for c in counts]
    displs = [sum(counts_l[:i]) for i in range(len(counts_l))]
    buf = np.zeros(sum(counts_l), np.uint8)
    p2p.wait(comm.Iallgatherv([payload, MPI.BYTE], [buf, counts_l, displs, MPI.BYTE]), timeout_s, what)
    return [json.loads(buf[d:d + c].tobytes()) for d, c in zip(displs, counts_l)]


def _describe_difference(mine: list, ref: list, limit: int = 4) -> list[str]:
    """What differs between two listings of [name, size, digest or None] (ref = rank 0's)."""
    a, b = {e[0]: e[1:] for e in ref}, {e[0]: e[1:] for e in mine}
    out = []
    for name in dict.fromkeys([e[0] for e in ref] + [e[0] for e in mine]):
        if name not in b:
            out.append(f"{name} only on rank 0")
        elif name not in a:
            out.append(f"{name} not on rank 0")
        elif a[name][0] != b[name][0]:
            out.append(f"{name} has {a[name][0]} bytes on rank 0, {b[name][0]} here")
        elif a[name] != b[name]:
            out.append(f"{name} has other contents (same size)")
    if not out and [e[0] for e in ref] != [e[0] for e in mine]:
        out.append("the files come in another order")
    return out[:limit] + ([f"... {len(out) - limit} more"] if len(out) > limit else [])


def agree_on_corpus(data_cfg, files, fingerprint: str, comm, timeout_s: float) -> str:
    """Collective over `comm`: every rank's corpus against rank 0's. First names, sizes and mtimes
    (no reading); only where mtimes differ, digests of the contents. A difference raises
    HvdllmError on every rank, naming the ranks, their hosts and the first differing files; else
    the cache key is rank 0's (copies of the corpus with other mtimes share its cache folder)."""
    host = sys.modules["mpi4py.MPI"].Get_processor_name()
    what = "comparing the corpus across ranks"
    stats = [[n, st.st_size, st.st_mtime_ns] for n, _, st in files]
    everyone = _allgather(comm, {"host": host, "files": stats, "fingerprint": fingerprint}, timeout_s, what)
    hosts, ref = [d["host"] for d in everyone], everyone[0]

    def fail(listings):
        differ = [r for r, lst in enumerate(listings) if lst != listings[0]]
        if not differ:
            return
        lines = [f"rank {r} on {hosts[r]}: " + "; ".join(_describe_difference(listings[r], listings[0]))
                 for r in differ[:4]]
        where = ", ".join(map(str, data_cfg.corpus)) or "the Python standard library"
        raise HvdllmError(
            f"data.corpus ({where}) differs between ranks: rank 0 on {hosts[0]} reads "
            f"{len(listings[0])} files, and\n  " + "\n  ".join(lines) +
            ("\n  ..." if len(differ) > 4 else "") +
            "\nEvery rank must read the same corpus: put it on a shared file system, or copy it "
            "identically to every node.")
    fail([[[n, size, None] for n, size, _ in d["files"]] for d in everyone])    # names and sizes
    if any(d["files"] != ref["files"] for d in everyone):                       # other mtimes: read
        fail(_allgather(comm, corpus_listing(files, data_cfg.max_bytes), timeout_s, what))
    return ref["fingerprint"]


def _failure(e: Exception, rank: int) -> str:
    return str(e) if isinstance(e, HvdllmError) else f"rank {rank} tokenising the corpus: {e!r}"


def _build_together(data_cfg, files, fingerprint: str, final: Path, comm, timeout_s: float) -> None:
    """Collective: the ranks of `comm` tokenise disjoint files (file i on rank i % size) into
    parts in a staging folder beside the cache, then rank 0 joins them in file order and publishes
    (so the tokens are a one-rank build's, byte for byte). A bad file on any rank fails every rank
    with its message. The cache folder must be shared by the ranks (as for any cached corpus)."""
    rank, size = comm.Get_rank(), comm.Get_size()
    what = "tokenising the corpus across ranks"
    nonce = _allgather(comm, os.urandom(6).hex(), timeout_s, what)[0]     # this build's own parts
    parts = final.parent / f".parts-{fingerprint}-{nonce}"
    parts.mkdir(parents=True, exist_ok=True)
    try:
        failure, tok_text, done = None, None, {}
        if rank == 0:
            _announce(data_cfg, files)
            try:
                tok_text = _make_tokenizer(data_cfg, files, parts).serialize()
            except (HvdllmError, OSError) as e:     # told to every rank, which then fail at once
                failure = _failure(e, rank)
        shared = _allgather(comm, {"tokenizer": tok_text, "error": failure}, timeout_s, what)[0]
        if shared["error"]:
            raise HvdllmError(shared["error"])
        tok = get_tokenizer(data_cfg) if data_cfg.tokenizer == "byte" else from_serialized(shared["tokenizer"])
        try:
            done = _tokenise_files(data_cfg, files, range(rank, len(files), size), tok, parts, rank)
        except (HvdllmError, OSError) as e:         # a bad record, a full disk: every rank says so
            failure = _failure(e, rank)
        everyone = _allgather(comm, {"error": failure, "done": done}, timeout_s, what)
        errors = [d["error"] for d in everyone if d["error"]]
        if errors:
            raise HvdllmError(errors[0])
        if rank == 0:
            counts = {int(i): c for d in everyone for i, c in d["done"].items()}

            def join(folder):
                if (parts / BPE_FILE).exists():
                    shutil.copy(parts / BPE_FILE, folder / BPE_FILE)
                _join(data_cfg, files, counts, tok, parts, folder)
            _publish(data_cfg, files, final, rank, build=join)
        else:
            _wait_for(final, timeout_s)
    finally:
        if rank == 0:
            shutil.rmtree(parts, ignore_errors=True)


def prepare(data_cfg, rank: int, cache_dir=None, timeout_s: float = 600, comm="auto") -> TokenData:
    """Tokenise the corpus once (rank 0) into the cache and memory-map it (every rank).

    Under MPI with more than one rank this is collective over COMM_WORLD (every rank of the job
    calls it, as the trainers and role ranks do): the ranks first agree that they read the same
    corpus (`agree_on_corpus`). `comm`: another communicator, or None to skip that."""
    files = _corpus(data_cfg.corpus, data_cfg.max_bytes)
    fingerprint = corpus_fingerprint(data_cfg, files)
    comm = _world(rank) if comm == "auto" else comm
    if comm is not None:
        fingerprint = agree_on_corpus(data_cfg, files, fingerprint, comm, timeout_s)
    final = Path(cache_dir or default_cache_dir(data_cfg)) / fingerprint
    problem = _damage(final)
    if comm is not None:    # rank 0's view decides whether to build, so all ranks take part or none
        problem = _allgather(comm, problem, timeout_s, "checking the token cache")[0]
    if problem is not None:
        if rank == 0 and problem != "missing":
            print(f"[hvdllm] the token cache {final} is damaged ({problem}): rebuilding it",
                  file=sys.stderr, flush=True)
        if comm is not None:
            _build_together(data_cfg, files, fingerprint, final, comm, timeout_s)
        elif rank == 0:
            _publish(data_cfg, files, final, rank)
    if _damage(final) is not None:
        # a rank without MPI waits for rank 0's build; one under MPI whose cache folder is not
        # rank 0's (not shared) waits too, to a deadline whose message says so
        _wait_for(final, timeout_s)
    meta = json.loads((final / "meta.json").read_text())
    meta["cache"] = str(final)
    tok = get_tokenizer(data_cfg, None, final)     # BPE: the one rank 0 trained and saved

    def mm(name, n):
        try:
            return np.memmap(final / name, dtype=meta["dtype"], mode="r", shape=(n,))
        except (OSError, ValueError) as e:   # changed since the check above
            raise HvdllmError(f"the token cache {final} cannot be read ({name}: {e}); delete that "
                              f"folder and start again (it is rebuilt)") from e
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
