"""Checkpoints: one .npz per step (framework-neutral numpy arrays), written atomically.

A checkpoint is written to a temporary file in the same folder, flushed to disk, then renamed:
a crash mid-write leaves the previous checkpoint intact and no half-file under a final name.
Metadata (step, config, layout, tokenizer) rides inside the file as a JSON string.
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from .errors import CheckpointError

_NAME = re.compile(r"^step_(\d{8})\.npz$")


def path_for(out_dir, step: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"step_{step:08d}.npz"


def save(out_dir, step: int, state: dict[str, np.ndarray], meta: dict, keep: int = 2) -> Path:
    final = path_for(out_dir, step)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    arrays = dict(state)
    arrays["__meta__"] = np.array(json.dumps({**meta, "step": step}))
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    _prune(final.parent, keep)
    return final


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _prune(folder: Path, keep: int) -> None:
    steps = sorted(all_steps(folder.parent))
    for step in steps[:-keep]:
        path_for(folder.parent, step).unlink(missing_ok=True)


def all_steps(out_dir) -> list[int]:
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _NAME.match(p.name)))


def latest(out_dir) -> Path | None:
    steps = all_steps(out_dir)
    return path_for(out_dir, steps[-1]) if steps else None


def load(path) -> tuple[dict[str, np.ndarray], dict]:
    """Returns (state, meta). Raises CheckpointError with what to do on a bad file."""
    try:
        with np.load(path, allow_pickle=False) as z:
            state = {k: z[k] for k in z.files if k != "__meta__"}
            meta = json.loads(str(z["__meta__"]))
    except (OSError, ValueError, KeyError) as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e}. Delete it to fall back to the "
                              f"previous one, or start without train.resume.") from e
    return state, meta


def check_compatible(state: dict, expected_shapes: dict[str, tuple], path) -> None:
    """Every parameter present with its shape, before any of it is loaded."""
    problems = [f"{n}: missing" for n in expected_shapes if n not in state]
    problems += [f"{n}: shape {tuple(state[n].shape)} != model's {tuple(s)}"
                 for n, s in expected_shapes.items() if n in state and tuple(state[n].shape) != tuple(s)]
    if problems:
        raise CheckpointError(f"checkpoint {path} does not match the model config: "
                              + "; ".join(problems[:5]) + (" ..." if len(problems) > 5 else ""))
