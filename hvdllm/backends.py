"""The one registry of backends: a config's `backend` name -> the package that implements it.

Every caller (the CLI, generate, roles, the benchmarks) loads a backend through `load`, so a new
backend is one line here."""
from __future__ import annotations

import importlib

from .errors import HvdllmError

MODULES = {"torch": "torch_backend", "tensorflow": "tf_backend"}


def load(name: str):
    """The backend package for `name` ('torch' | 'tensorflow'); imports its framework."""
    if name not in MODULES:
        raise ValueError(f"backend {name!r} is not one of {', '.join(MODULES)}")
    try:
        return importlib.import_module(MODULES[name])
    except ImportError as e:   # an environment to fix on this node, not a bug: a message, no traceback
        import socket
        raise HvdllmError(f"backend={name!r}: {MODULES[name]} cannot be imported on {socket.gethostname()} "
                          f"({type(e).__name__}: {e}); install the environment there (make env, or "
                          f"`module load` the framework) so every node has the same one") from e
