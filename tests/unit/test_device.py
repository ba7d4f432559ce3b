"""train.device: the decision (hvdllm/device.py) on simulated device lists, every error path, and
on this machine (no GPU) 'auto' computing exactly what 'cpu' does in both backends."""
import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import numpy as np
import pytest

import tf_backend
import torch_backend
from hvdllm import config, device
from hvdllm.engine import StepResult
from hvdllm.errors import ConfigError
from hvdllm.runtime import Runtime
from mpi import p2p

# -- the decision ------------------------------------------------------------------------------

@pytest.mark.parametrize("requested, local_rank, local_size, gpus, want", [
    ("cpu", 0, 1, 0, "cpu"),
    ("cpu", 3, 4, 8, "cpu"),          # asked for: the GPUs are left alone
    ("auto", 0, 1, 0, "cpu"),         # nothing visible: the CPU
    ("auto", 0, 4, 0, "cpu"),         # any number of CPU ranks per node
    ("auto", 1, 2, 2, "cuda:1"),      # one GPU per local rank
    ("auto", 0, 1, 8, "cuda:0"),      # fewer ranks than GPUs is fine
    ("cuda", 3, 4, 4, "cuda:3"),
])
def test_choice(requested, local_rank, local_size, gpus, want):
    assert device.choose(requested, local_rank, local_size, gpus, "h") == want


def test_cpu_needs_no_gpu_operations():
    assert device.choose("cpu", 0, 1, 2, "h", gpu_ops=False) == "cpu"
    assert device.choose("auto", 0, 1, 0, "h", gpu_ops=False) == "cpu"


def error(*args, **kw) -> str:
    with pytest.raises(ConfigError) as e:
        device.choose(*args, **kw)
    return str(e.value)


def test_cuda_without_a_gpu():
    msg = error("cuda", 0, 1, 0, "node7")
    assert "'cuda' asked, but the framework sees no GPU on host node7" in msg
    assert "train.device = 'auto' or 'cpu'" in msg


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_more_ranks_than_gpus(requested):
    msg = error(requested, 0, 4, 2, "h")
    assert "4 ranks on host h but 2 GPUs: launch at most 2 per node (-np / --ntasks-per-node) or set " \
           "train.device = 'cpu'" in msg
    assert "1 GPU:" in error(requested, 1, 2, 1, "h")


@pytest.mark.parametrize("requested", ["auto", "cuda"])
def test_horovod_without_gpu_operations(requested):
    msg = error(requested, 0, 1, 1, "h", gpu_ops=False)
    assert "built without GPU operations" in msg and "HOROVOD_GPU_OPERATIONS=NCCL" in msg
    assert "train.device = 'cpu'" in msg


def test_setting_validated():
    assert config.Config().train.device == "auto"
    with pytest.raises(ConfigError) as e:
        config.validate(config.load(None, ["train.device=gpu"]), 1)
    assert "train.device: 'gpu' is not one of 'auto', 'cpu', 'cuda'" in str(e.value)
    for v in ("auto", "cpu", "cuda"):   # 'cuda' is judged where the GPUs are: at start
        config.validate(config.load(None, [f"train.device={v}"]), 1)


# -- pipeline activations: how they travel, and whether this MPI takes GPU buffers ---------------

def test_p2p_transport_words():
    assert device.p2p_transport(False, False) == "host arrays (CPU)"
    assert device.p2p_transport(True, False) == "pinned host buffers (this MPI is not CUDA-aware)"
    assert device.p2p_transport(True, True) == "device buffers (this MPI is CUDA-aware)"


def test_ompi_info_parsed():
    line = "mca:mpi:base:param:mpi_built_with_cuda_support:value:{}"
    other = "mca:btl:base:param:btl_base_verbose:value:0"
    assert p2p.parse_ompi_info("\n".join([other, line.format("true")])) is True
    assert p2p.parse_ompi_info(line.format("false")) is False
    assert p2p.parse_ompi_info(other) is None
    # this machine's MPI answers without raising (Debian's Open MPI: built without CUDA)
    assert p2p.cuda_aware() in (True, False)


class HostArrayInterface:
    """Host memory described by the CUDA array interface, as a torch CUDA tensor describes its
    own: mpi4py passes the pointer to MPI either way, so the device-buffer path of p2p (headers
    from the interface, allocation by the receiver's alloc) runs here without a GPU."""

    def __init__(self, a, strides=None):
        self.a, self.strides = a, strides

    @property
    def __cuda_array_interface__(self):
        return {"shape": self.a.shape, "typestr": self.a.dtype.str, "data": (self.a.ctypes.data, False),
                "version": 3, "strides": self.strides}


def test_p2p_device_buffers_round_trip(horovod):
    src = HostArrayInterface(np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    reqs = p2p.isend_array(horovod, src, 0, "act", 3)   # to itself: the one-rank MPI
    got = p2p.recv_array(horovod, 0, "act", 3, 30.0, alloc=lambda shape, dt: HostArrayInterface(np.empty(shape, dt)))
    p2p.waitall(reqs, 30.0, "device-buffer send")
    assert isinstance(got, HostArrayInterface) and got.a.dtype == np.float32
    np.testing.assert_array_equal(got.a, src.a)
    with pytest.raises(ValueError, match="C-contiguous"):
        p2p.isend_array(horovod, HostArrayInterface(np.zeros((2, 2), np.float32), strides=(4, 8)), 0, "act", 4)


# -- StepResult: loss and gradient norm read only when looked at ---------------------------------

class Reading:
    """A value that counts how often it is converted (as a device tensor's read would sync)."""

    def __init__(self, v):
        self.v, self.reads = v, 0

    def __float__(self):
        self.reads += 1
        return self.v


def test_step_result_reads_once_and_only_when_asked():
    loss, norm = Reading(2.5), Reading(0.5)
    r = StepResult(loss=loss, grad_norm=norm)
    assert (loss.reads, norm.reads) == (0, 0)
    assert r.loss == 2.5 and r.loss == 2.5 and loss.reads == 1 and norm.reads == 0
    assert r.grad_norm == 0.5 and norm.reads == 1 and not r.skipped


# -- on this machine: 'auto' is the CPU, and computes what 'cpu' does ------------------------------

@pytest.fixture(scope="module", autouse=True)
def horovod():
    from mpi4py import MPI
    tf_backend.init_horovod(MPI.COMM_WORLD)
    torch_backend.init_horovod(MPI.COMM_WORLD)
    return MPI.COMM_WORLD


TINY = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "model.block_size=16", "model.vocab_size=256",
        "train.batch_size=2"]


def three_steps(backend, dev, horovod):
    """device.select as the trainer calls it, then the engine's first three steps. (Not the whole
    Trainer: TensorFlow fixes its thread pools once per process, and this process is shared.)"""
    from hvdllm.layout import Layout
    from hvdllm.parallelize import build_engine
    cfg = config.resolve(config.validate(config.load(None, TINY + [f"backend={backend}", f"train.device={dev}"]), 1),
                         1, 256)
    be = torch_backend if backend == "torch" else tf_backend
    rt = Runtime("single", 0, 1, 0, 1, horovod, {})
    assert device.select(cfg.train.device, rt, be) == "cpu"
    engine = build_engine(cfg, Layout.from_config(cfg, 1, 0), rt, be)
    rng = np.random.default_rng(0)
    out = []
    for _ in range(3):
        toks = rng.integers(0, 256, size=(2, 17))
        r = engine.train_step(toks[:, :-1], toks[:, 1:], 1e-2)
        out.append((r.loss, r.grad_norm))
    return out


@pytest.mark.parametrize("backend", ["torch", "tensorflow"])
def test_auto_equals_cpu_here(backend, capfd, horovod):
    on_cpu = three_steps(backend, "cpu", horovod)
    auto = three_steps(backend, "auto", horovod)
    assert on_cpu == auto   # bit for bit: the same device, the same arithmetic
    assert "rank 0 (local 0/1): device cpu" in capfd.readouterr().err
