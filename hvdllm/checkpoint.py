"""Checkpoints: sharded by the layout that wrote them, loadable under any layout, written atomically.

    checkpoints/step_00000100/
        manifest.json   step, config, layout, backend, tokenizer, global batch, a digest of the
                        prepared tokens, per file its size and sha256, and per array its global
                        shape, dtype and which shard file holds which slice of it (placement.py)
        tokenizer.json  the tokenizer the run trained with (tokenizer.serialize())
        pp0-tp0.npz     one file per (pipeline stage, tensor-parallel rank), written by that
        pp0-tp1.npz     position's dp-rank-0 process: its parameters (tp slices), AdamW moments
        ...             and optim.step. Nothing is gathered to one rank to save.
        pp0-tp0-dp1.npz under ZeRO-1, every dp rank writes the range of the moments it holds

A loader reads the manifest, then for each array it needs only the files holding the slice its
own layout wants: a run saved at (dp, pp, tp) = (2, 2, 2) resumes at (1, 1, 1), (4, 1, 2) or
(1, 2, 1). `hvdllm convert` writes one unsharded file.

Atomic: shards are written into checkpoints/.step_00000100.partial/ (each via a temporary file
and a rename); when every writer is done (the trainer's barrier), rank 0 writes the manifest,
fsyncs and renames the folder to its final name. A crash at any moment leaves the previous
checkpoint intact and nothing half-written under a final name. The folder must be on a file
system every writer sees (the usual shared /scratch or /home of a cluster). Writing a step that
exists already renames the old folder aside, the new one in, and only then deletes the old one.

Verified: each writer hashes its shard while writing it; the manifest records every file's size
and sha256. `latest()` checks them (once per process) and skips a damaged checkpoint for the
newest intact one, saying so on stderr; a shard read directly is checked before it is used.

Resume checks (`check_resume`): the settings a resume must not change unnoticed (config.RESUME_CHECKED:
the model, the optimizer, the seed, the global batch, the tokenizer and the prepared tokens) are
compared with the checkpoint's; train.resume_allow lets a run change some deliberately.

Older single-file checkpoints (`step_00000100.npz`, with a `__meta__` JSON string) still load.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import placement as placement_mod
from .errors import CheckpointError, HvdllmError

_NAME = re.compile(r"^step_(\d{8})(\.npz)?$")
MANIFEST = "manifest.json"
TOKENIZER_FILE = "tokenizer.json"
EXTRA_FILES = "__files__"  # in the meta given to finalize: {name: text or bytes} stored beside the shards
_INFO = "__shard__"       # inside a shard file: JSON with each array's placement
_READ_ERRORS = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


def path_for(out_dir, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}"


def _partial(out_dir, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f".step_{step:08d}.partial"


def shard_name(pp_rank: int, tp_rank: int, dp_rank: int = 0) -> str:
    """dp_rank > 0 only for ZeRO-1, whose dp ranks each hold part of the optimizer state."""
    return f"pp{pp_rank}-tp{tp_rank}" + (f"-dp{dp_rank}" if dp_rank else "") + ".npz"


# writing ----------------------------------------------------------------------------------------
class _Hashing(io.RawIOBase):
    """A write-only, non-seekable stream over a file that counts and hashes what passes through:
    np.savez then writes a streamed zip (data descriptors), so the digest is the file's."""

    def __init__(self, f):
        self.f, self.size, self.sha = f, 0, hashlib.sha256()

    def writable(self):
        return True

    def write(self, b):
        n = self.f.write(b)
        self.sha.update(memoryview(b).cast("B")[:n])
        self.size += n
        return n

    def record(self) -> dict:
        return {"size": self.size, "sha256": self.sha.hexdigest()}


def _sum_name(name: str) -> str:
    return f".{name}.sum"


def _file_record(path: Path) -> dict:
    sha, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            sha.update(chunk)
            size += len(chunk)
    return {"size": size, "sha256": sha.hexdigest()}


def write_shard(out_dir, step: int, name: str, arrays: dict, placements: dict) -> None:
    """One writer's arrays and their placements (None or missing: the whole array). The shard's
    size and sha256, computed while writing, go to a sidecar that finalize puts in the manifest."""
    folder = _partial(out_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    info = {k: {"placement": placements.get(k), "shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype)}
            for k, a in arrays.items()}
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        w = _Hashing(f)
        np.savez(w, **{k: np.asarray(a) for k, a in arrays.items()}, **{_INFO: np.array(json.dumps(info))})
        f.flush()
        os.fsync(f.fileno())
    _write_synced(folder / _sum_name(name), json.dumps(w.record()).encode())
    os.replace(tmp, folder / name)


def finalize(out_dir, step: int, shard_names: list[str], meta: dict, keep: int = 2) -> Path:
    """Rank 0, after every writer's write_shard: the manifest, then the folder's final name.
    `meta[EXTRA_FILES]` ({name: text or bytes}, e.g. the tokenizer) is written beside the shards."""
    folder, final = _partial(out_dir, step), path_for(out_dir, step)
    meta = dict(meta)
    extra = meta.pop(EXTRA_FILES, None) or {}
    arrays: dict[str, dict] = {}
    files: dict[str, dict] = {}
    for name in shard_names:
        path = folder / name
        if not path.exists():
            raise CheckpointError(f"checkpoint shard {path} was not written: train.out_dir "
                                  f"must be on a file system that every node sees")
        try:
            rec = json.loads((folder / _sum_name(name)).read_text())
        except (OSError, ValueError):   # no sidecar (not written by write_shard): hash it here
            rec = _file_record(path)
        if path.stat().st_size != rec["size"]:
            raise CheckpointError(f"checkpoint shard {path} has {path.stat().st_size} bytes, but its "
                                  f"writer wrote {rec['size']}: the file system lost part of it")
        try:
            with np.load(path, allow_pickle=False) as z:
                info = json.loads(str(z[_INFO]))
        except _READ_ERRORS as e:
            raise _bad(path, e) from e
        files[name] = rec
        for k, d in info.items():
            e = arrays.setdefault(k, {"shape": list(placement_mod.global_shape(d["shape"], d["placement"])),
                                      "dtype": d["dtype"], "shards": []})
            e["shards"].append([name, d["placement"]])
    for name, content in extra.items():
        if name in files or name == MANIFEST or "/" in name:
            raise ValueError(f"checkpoint file name {name!r} is taken or not a plain name")
        data = content.encode() if isinstance(content, str) else bytes(content)
        _write_synced(folder / name, data)
        files[name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {**meta, "step": step, "format": "hvdllm-sharded-1", "shards": shard_names, "files": files,
                "arrays": arrays}
    _write_synced(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    for name in shard_names:
        (folder / _sum_name(name)).unlink(missing_ok=True)
    _fsync_dir(folder)
    if final.exists():   # the same step written again (e.g. a rerun without train.resume):
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)      # old aside, new in, then delete old: the window without a
        os.replace(folder, final)   # step_N folder is two renames, never a whole rmtree
        _fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(folder, final)
        _fsync_dir(final.parent)
    _prune(final.parent, keep)
    return final


def save(out_dir, step: int, state: dict[str, np.ndarray], meta: dict, keep: int = 2) -> Path:
    """A whole state from one process (one shard)."""
    write_shard(out_dir, step, shard_name(0, 0), state, {})
    return finalize(out_dir, step, [shard_name(0, 0)], meta, keep)


def _write_synced(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(folder: Path, keep: int) -> None:
    steps = all_steps(folder.parent)
    for p in folder.iterdir():
        m = _NAME.match(p.name)
        if m and int(m.group(1)) in steps[:-keep]:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)


# finding and reading --------------------------------------------------------------------------
def all_steps(out_dir) -> list[int]:
    """Steps with a complete checkpoint (a folder with its manifest, or an old single file)."""
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted({int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name))
                   and (m.group(2) or (p / MANIFEST).exists())})


def _step_path(out_dir, step: int) -> Path:
    p = path_for(out_dir, step)
    return p if p.is_dir() else p.with_name(p.name + ".npz")


def latest(out_dir, verify: bool = True, log: bool = True) -> Path | None:
    """The newest intact checkpoint (None when there is none at all). A damaged one (a shard
    missing, truncated or changed since it was written) is skipped with a message on stderr
    (log=False: silently); CheckpointError when every checkpoint is damaged."""
    steps = all_steps(out_dir)
    damaged = []
    for step in reversed(steps):
        p = _step_path(out_dir, step)
        problem = check(p) if verify else None
        if problem is None:
            if damaged and log:
                print(f"[hvdllm] using the newest intact checkpoint, {p}", file=sys.stderr, flush=True)
            return p
        damaged.append(f"{p.name}: {problem}")
        if log:
            print(f"[hvdllm] checkpoint {p} is damaged ({problem}); falling back to the one before it",
                  file=sys.stderr, flush=True)
    if damaged:
        raise CheckpointError(f"no intact checkpoint in {Path(out_dir) / 'checkpoints'}: "
                              + "; ".join(damaged) + ". Restore them from a copy, or delete them and "
                              "start without train.resume.")
    return None


_VERIFIED: set = set()   # (path, size, mtime_ns, sha256) this process has checked already


def _verify_file(path: Path, rec: dict | None) -> str | None:
    """None if the file is intact (its size and sha256 as recorded; without a record, a zip whose
    members all pass their CRC), else what is wrong with it."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return f"{path.name} is missing"
    except OSError as e:
        return f"{path.name} cannot be read ({e.strerror or e})"
    key = (str(path), st.st_size, st.st_mtime_ns, rec and rec.get("sha256"))
    if key in _VERIFIED:
        return None
    if rec is not None:
        if st.st_size != rec["size"]:
            return f"{path.name} has {st.st_size} bytes, the manifest says {rec['size']} (truncated?)"
        try:
            got = _file_record(path)["sha256"]
        except OSError as e:
            return f"{path.name} cannot be read ({e.strerror or e})"
        if got != rec["sha256"]:
            return f"{path.name}: its sha256 differs from the manifest's (changed on disk since it was written)"
    else:   # written before checksums were recorded: the zip's own CRCs
        try:
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
        except (OSError, zipfile.BadZipFile, EOFError, ValueError) as e:
            return f"{path.name} is not a readable npz ({e})"
        if bad is not None:
            return f"{path.name}: member {bad} fails its CRC check"
    _VERIFIED.add(key)
    return None


def check(path) -> str | None:
    """None if the checkpoint at `path` (a folder or an old single file) is intact, else why not."""
    path = Path(path)
    if not path.is_dir():
        return _verify_file(path, None)
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        shards, files = manifest["shards"], manifest.get("files")
        manifest["arrays"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return f"{MANIFEST} is unreadable ({e})"
    names = list(dict.fromkeys([*shards, *(files or {})]))
    for name in names:
        problem = _verify_file(path / name, files.get(name) if files is not None else None)
        if problem:
            return problem
    return None


def load(path) -> tuple[Mapping, dict]:
    """Returns (state, meta): a lazy name -> whole-array mapping (Sharded) for a checkpoint
    folder, a dict for an old single file. CheckpointError with what to do on a bad one."""
    path = Path(path)
    if path.is_dir():
        sharded = Sharded(path)
        return sharded, sharded.meta
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files if k != "__meta__"}
            meta = json.loads(str(z["__meta__"]))
    except _READ_ERRORS as e:
        raise _bad(path, e) from e
    return state, meta


def _bad(path, e) -> CheckpointError:
    return CheckpointError(f"cannot read checkpoint {path}: {e}. Delete it to fall back to the "
                           f"previous one, or start without train.resume.")


class Sharded(Mapping):
    """A checkpoint folder as {name: whole array}; reads shard files only when asked."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text())
            self.arrays = manifest.pop("arrays")
        except (OSError, ValueError, KeyError) as e:
            raise _bad(self.folder, e) from e
        self.files = manifest.pop("files", None)   # {name: {size, sha256}}; None: written before
        self.meta = manifest
        self.shapes = {k: tuple(e["shape"]) for k, e in self.arrays.items()}
        self._files: dict[str, object] = {}

    def verified(self, name: str) -> Path:
        """The path of file `name` of this checkpoint, checked against the manifest's record."""
        problem = _verify_file(self.folder / name, (self.files or {}).get(name))
        if problem:
            raise CheckpointError(f"checkpoint {self.folder} is damaged: {problem}. Delete it to fall "
                                  f"back to the previous one (train.resume does that by itself), or "
                                  f"start without train.resume.")
        return self.folder / name

    def read_file(self, name: str) -> bytes | None:
        """A file stored beside the shards (e.g. tokenizer.json), verified; None if it has none."""
        if not self.files or name not in self.files:
            return None
        return self.verified(name).read_bytes()

    def _read(self, shard: str, name: str) -> np.ndarray:
        try:
            if shard not in self._files:
                self._files[shard] = np.load(self.verified(shard), allow_pickle=False)
            return self._files[shard][name]
        except _READ_ERRORS as e:
            raise _bad(self.folder / shard, e) from e

    def __getitem__(self, name: str) -> np.ndarray:
        shards = self.arrays[name]["shards"]
        first_whole = next((s for s, pl in shards if pl is None), None)
        if first_whole is not None:
            return self._read(first_whole, name)
        # One group per slice. A tied weight held by two stages is saved twice (read it once);
        # ZeRO-1 moments come as ranges, one per dp rank, joined into their slice.
        groups: dict[str, list] = {}
        for s, pl in shards:
            groups.setdefault(json.dumps(placement_mod.base(pl), sort_keys=True), []).append((s, pl))
        slices = []
        for key, group in groups.items():
            s, pl = group[0]
            if "range" in pl:
                try:
                    joined = placement_mod.join_ranges([(self._read(s, name), pl) for s, pl in group])
                except ValueError as e:
                    raise _bad(self.folder, f"{name}: {e}") from e
                slices.append((joined, json.loads(key)))
            else:
                slices.append((self._read(s, name), pl))
        return slices[0][0] if slices[0][1] is None else placement_mod.assemble(slices)

    def slice(self, name: str, pl: dict | None) -> np.ndarray:
        """The slice at placement `pl`: straight from its file when the saving layout had the
        same split, else cut from the whole array."""
        for s, saved in self.arrays[name]["shards"]:
            if saved == pl:
                return self._read(s, name)
        return placement_mod.take(self[name], pl)

    def __iter__(self):
        return iter(self.arrays)

    def __len__(self) -> int:
        return len(self.arrays)

    def __contains__(self, name) -> bool:
        return name in self.arrays


def check_compatible(state: Mapping, expected_shapes: dict[str, tuple], path) -> None:
    """Every parameter present with its shape, before any of it is loaded."""
    shapes = getattr(state, "shapes", None) or {k: np.shape(v) for k, v in state.items()}
    problems = [f"{n}: missing" for n in expected_shapes if n not in shapes]
    problems += [f"{n}: shape {tuple(shapes[n])} != model's {tuple(s)}"
                 for n, s in expected_shapes.items() if n in shapes and tuple(shapes[n]) != tuple(s)]
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model config: "
                              + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))


# what a checkpoint was trained with, and whether a run may resume from it -----------------------
def identity(cfg, layout, data) -> dict:
    """Recorded in every checkpoint's meta beside its config (Trainer.save) and compared on resume:
    the global batch (which fixes the sample order), the prepared tokens' digest and the tokenizer
    itself (stored as tokenizer.json, so `hvdllm generate` needs no corpus)."""
    b = [layout.dp, cfg.train.batch_size, cfg.aggregation.accumulation]
    return {"global_batch": b[0] * b[1] * b[2], "batch": b, "tokenizer": data.tokenizer.name,
            "data": {k: data.meta.get(k) for k in ("tokens_sha256", "n_train", "n_val")},
            EXTRA_FILES: {TOKENIZER_FILE: data.tokenizer.serialize()}}


def stored_tokenizer(path):
    """The tokenizer saved with the checkpoint at `path`; None for a checkpoint from before."""
    from .tokenizer import from_serialized
    path = Path(path)
    if not path.is_dir():
        return None
    text = Sharded(path).read_file(TOKENIZER_FILE)
    if text is None:
        return None
    try:
        return from_serialized(text.decode("utf-8"))
    except (HvdllmError, UnicodeDecodeError) as e:
        raise CheckpointError(f"checkpoint {path}: its {TOKENIZER_FILE} cannot be loaded ({e})") from e


def setting_differences(meta: dict, cfg, keys) -> list[tuple[str, object, object]]:
    """(key, checkpoint's value, cfg's value) for each plain setting in `keys` that differs (keys
    the checkpoint's stored config lacks are not compared)."""
    saved = meta.get("config") or {}
    out = []
    for key in keys:
        section, name = key.split(".")
        if name not in (saved.get(section) or {}) or not hasattr(getattr(cfg, section, None), name):
            continue
        before, after = saved[section][name], getattr(getattr(cfg, section), name)
        if before != after:
            out.append((key, before, after))
    return out


def _saved_batch(meta: dict):
    if "batch" in meta:
        return meta["batch"]
    m = re.search(r"\bdp=(\d+)", str(meta.get("layout", "")))   # checkpoints from before
    c = meta.get("config") or {}
    try:
        return [int(m.group(1)), c["train"]["batch_size"], c["aggregation"]["accumulation"]]
    except (AttributeError, KeyError, TypeError):
        return None


def check_resume(path, meta: dict, cfg, now: dict) -> list[str]:
    """Refuse (CheckpointError, one message naming each setting) to resume from the checkpoint at
    `path` under settings that differ from its own, unless train.resume_allow names them; returns
    the allowed changes, for the run to print. `now` is `identity(cfg, layout, data)` of this run."""
    from . import config as config_mod
    from . import tokenizer as tokenizer_mod
    plain = [k for k in config_mod.RESUME_CHECKED
             if k not in ("train.batch_size", "data.tokenizer", "data.corpus")]
    changes = [(k, f"{k}: {a!r} in the checkpoint, {b!r} now") for k, a, b in setting_differences(meta, cfg, plain)]
    before, after = _saved_batch(meta), now["batch"]
    if before is not None and before[0] * before[1] * before[2] != now["global_batch"]:
        changes.append(("train.batch_size",
                        f"train.batch_size: the global batch (dp x train.batch_size x "
                        f"aggregation.accumulation) was {' x '.join(map(str, before))} = "
                        f"{before[0] * before[1] * before[2]} sequences per step, now "
                        f"{' x '.join(map(str, after))} = {now['global_batch']}; it fixes which "
                        f"sequences each step trains on, so keep the product"))
    stored = Sharded(path).read_file(TOKENIZER_FILE) if Path(path).is_dir() else None
    retokenized = False
    if stored is not None and not tokenizer_mod.same(stored.decode("utf-8", "replace"),
                                                      now[EXTRA_FILES][TOKENIZER_FILE]):
        retokenized = True
        changes.append(("data.tokenizer",
                        f"data.tokenizer: this run's tokenizer ({now['tokenizer']}) is not the one "
                        f"stored with the checkpoint ({meta.get('tokenizer', '?')}); a bpe tokenizer "
                        f"retrained on a changed corpus differs"))
    was, now_data = meta.get("data") or {}, now["data"]
    if (not retokenized and was.get("tokens_sha256") and now_data.get("tokens_sha256")
            and was["tokens_sha256"] != now_data["tokens_sha256"]):
        changes.append(("data.corpus",
                        f"data.corpus: the prepared tokens differ from the checkpoint's "
                        f"({was.get('n_train')} -> {now_data.get('n_train')} training tokens): the "
                        f"corpus files, data.max_bytes or data.val_fraction changed"))
    refused = [(k, text) for k, text in changes if not config_mod.resume_allowed(cfg, k)]
    if refused:
        keys = ", ".join(json.dumps(k) for k, _ in refused)
        raise CheckpointError(
            f"cannot resume from {path}: this run differs from the checkpoint in {len(refused)} "
            f"setting(s):\n" + "\n".join(f"  - {text}" for _, text in refused) +
            f"\nRestore them, start afresh (another train.out_dir, or without train.resume), or allow "
            f"the change deliberately: --set 'train.resume_allow=[{keys}]'")
    return [text for _, text in changes]
