"""TensorFlow backend: the engine classes that hvdllm/parallelize.py composes, the model and the
Horovod collectives adapter (the same names in torch_backend and tf_backend)."""
from . import tensor_parallel
from .collectives import Collectives, NumpyCollectives, device_info, from_host, init_horovod, to_host, use_device
from .engine import Engine, configure, matmul_flops
from .model import GPT
from .pipeline import PipelineEngine
from .sequential import SequentialEngine
from .sharded import ShardedEngine, ShardedPipelineEngine
from .sharded_layers import ShardedSequentialEngine
from .tensor_parallel import TPGroup

__all__ = ["GPT", "Collectives", "Engine", "NumpyCollectives", "PipelineEngine", "SequentialEngine", "ShardedEngine",
           "ShardedPipelineEngine", "ShardedSequentialEngine", "TPGroup",
           "configure", "device_info", "from_host", "matmul_flops", "init_horovod", "tensor_parallel", "to_host",
           "use_device"]
