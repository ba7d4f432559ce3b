"""The one registry of backends: a config's `backend` name -> the package that implements it.

Every caller (the CLI, generate, roles, the benchmarks) loads a backend through `load`, so a new
backend is one line here."""
from __future__ import annotations

import importlib

MODULES = {"torch": "torch_backend", "tensorflow": "tf_backend"}


def load(name: str):
    """The backend package for `name` ('torch' | 'tensorflow'); imports its framework."""
    if name not in MODULES:
        raise ValueError(f"backend {name!r} is not one of {', '.join(MODULES)}")
    return importlib.import_module(MODULES[name])
