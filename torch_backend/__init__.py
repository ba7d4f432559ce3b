"""PyTorch backend: the GPT, its Engine and the Horovod collectives adapter (same names as tf_backend)."""
from . import tensor_parallel
from .collectives import Collectives, NumpyCollectives, init_horovod
from .engine import Engine, configure, make_engine
from .model import GPT

__all__ = ["GPT", "Engine", "Collectives", "NumpyCollectives", "configure", "init_horovod", "make_engine"]
