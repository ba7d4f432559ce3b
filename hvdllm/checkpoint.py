"""Checkpoints: sharded by the layout that wrote them, loadable under any layout, written atomically.

    checkpoints/step_00000100/
        manifest.json   step, config, layout, backend, tokenizer, and per array its global shape,
                        dtype and which shard file holds which slice of it (placement.py)
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
system every writer sees (the usual shared /scratch or /home of a cluster).

Older single-file checkpoints (`step_00000100.npz`, with a `__meta__` JSON string) still load.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import placement as placement_mod
from .errors import CheckpointError

_NAME = re.compile(r"^step_(\d{8})(\.npz)?$")
MANIFEST = "manifest.json"
_INFO = "__shard__"       # inside a shard file: JSON with each array's placement


def path_for(out_dir, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}"


def _partial(out_dir, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f".step_{step:08d}.partial"


def shard_name(pp_rank: int, tp_rank: int, dp_rank: int = 0) -> str:
    """dp_rank > 0 only for ZeRO-1, whose dp ranks each hold part of the optimizer state."""
    return f"pp{pp_rank}-tp{tp_rank}" + (f"-dp{dp_rank}" if dp_rank else "") + ".npz"


# writing ----------------------------------------------------------------------------------------
def write_shard(out_dir, step: int, name: str, arrays: dict, placements: dict) -> None:
    """One writer's arrays and their placements (None or missing: the whole array)."""
    folder = _partial(out_dir, step)
    folder.mkdir(parents=True, exist_ok=True)
    info = {k: {"placement": placements.get(k), "shape": list(np.shape(a)), "dtype": str(np.asarray(a).dtype)}
            for k, a in arrays.items()}
    tmp = folder / f".{name}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **{k: np.asarray(a) for k, a in arrays.items()}, **{_INFO: np.array(json.dumps(info))})
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, folder / name)


def finalize(out_dir, step: int, shard_names: list[str], meta: dict, keep: int = 2) -> Path:
    """Rank 0, after every writer's write_shard: the manifest, then the folder's final name."""
    folder, final = _partial(out_dir, step), path_for(out_dir, step)
    arrays: dict[str, dict] = {}
    for name in shard_names:
        if not (folder / name).exists():
            raise CheckpointError(f"checkpoint shard {folder / name} was not written: train.out_dir "
                                  f"must be on a file system that every node sees")
        with np.load(folder / name, allow_pickle=False) as z:
            info = json.loads(str(z[_INFO]))
        for k, d in info.items():
            e = arrays.setdefault(k, {"shape": list(placement_mod.global_shape(d["shape"], d["placement"])),
                                      "dtype": d["dtype"], "shards": []})
            e["shards"].append([name, d["placement"]])
    manifest = {**meta, "step": step, "format": "hvdllm-sharded-1", "shards": shard_names, "arrays": arrays}
    _write_synced(folder / MANIFEST, json.dumps(manifest, indent=1).encode())
    _fsync_dir(folder)
    if final.exists():   # the same step written again (e.g. a rerun without train.resume)
        trash = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, trash)
        shutil.rmtree(trash)
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


def latest(out_dir) -> Path | None:
    steps = all_steps(out_dir)
    if not steps:
        return None
    p = path_for(out_dir, steps[-1])
    return p if p.is_dir() else p.with_name(p.name + ".npz")


def load(path) -> tuple[Mapping, dict]:
    """Returns (state, meta): a lazy name -> whole-array mapping (Sharded) for a checkpoint
    folder, a dict for an old single file. CheckpointError with what to do on a bad one."""
    path = Path(path)
    if path.is_dir():
        return Sharded(path), Sharded(path).meta
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files if k != "__meta__"}
            meta = json.loads(str(z["__meta__"]))
    except (OSError, ValueError, KeyError) as e:
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
        self.meta = manifest
        self.shapes = {k: tuple(e["shape"]) for k, e in self.arrays.items()}
        self._files: dict[str, object] = {}

    def _read(self, shard: str, name: str) -> np.ndarray:
        try:
            if shard not in self._files:
                self._files[shard] = np.load(self.folder / shard, allow_pickle=False)
            return self._files[shard][name]
        except (OSError, ValueError, KeyError) as e:
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
