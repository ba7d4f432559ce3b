"""hvdllm/memory.py against the ZeRO paper's formulas and against this repo's own objects: the
parameters a (pipeline stage, tp rank) of the torch GPT holds, the real np=1 Engine's
num_params / optimizer_state_bytes, Zero1.state_bytes over a simulated dp group (padded
shards), and the bytes autograd saves for the backward (counted with saved-tensor hooks)."""
import numpy as np
import pytest
import torch

import torch_backend
from hvdllm import config as config_mod
from hvdllm import memory, params
from hvdllm.config import AggregationConfig, Config, ModelConfig, OptimConfig
from hvdllm.flat import FlatLayout
from hvdllm.layout import Layout
from hvdllm.strategies.zero import Zero1
from tests.unit.simcoll import World

GPT2 = dict(n_layer=3, n_embd=32, n_head=4, block_size=16, vocab_size=64)
LLAMA = dict(GPT2, family="llama", n_kv_head=2, tie_embeddings=False)


@pytest.mark.parametrize("stage, per_psi", [(0, lambda n: 16), (1, lambda n: 8 + 8 / n),
                                            (2, lambda n: 4 + 12 / n), (3, lambda n: 16 / n)])
@pytest.mark.parametrize("dp", [1, 2, 4, 8])
def test_zero_state_is_the_papers_formula(stage, per_psi, dp):
    psi = 8 * 1000   # divisible by every dp here: the paper's figures exactly
    got = memory.zero_state_bytes(psi, dp, stage)
    assert got["params"] + got["grads"] + got["optimizer"] == per_psi(dp) * psi
    assert got["host"] == 0
    off = memory.zero_state_bytes(psi, dp, stage, offload="optimizer")
    assert off["host"] == got["optimizer"] and off["device"] == got["device"] - got["optimizer"]


def test_bad_stage_or_offload_says_what_to_fix():
    with pytest.raises(ValueError, match="ZeRO stage must be"):
        memory.zero_state_bytes(10, 2, 4)
    with pytest.raises(ValueError, match="offload must be"):
        memory.zero_state_bytes(10, 2, 1, offload="nvme")


@pytest.mark.parametrize("k", [2, 3, 4])
def test_zero1_shards_are_padded_as_zero1_holds_them(k):
    """Zero1's own state_bytes over a simulated dp group of k (odd sizes: the last shard is padded)."""
    shapes = {"a": (7, 5), "b": (3,), "c": (11,)}
    flat = FlatLayout(shapes)
    comms = World(k).group()
    held = {Zero1(flat, comms[r], OptimConfig(), AggregationConfig()).state_bytes() for r in range(k)}
    assert held == {memory.zero_state_bytes(flat.total, k, 1)["optimizer"]}


def test_zero1_on_a_tp_and_pp_part_holds_what_rank_memory_predicts():
    """dp=2 x pp=2 x tp=2, ZeRO-1: Zero1 over the stage's tp-slice shapes (as make_zero builds
    it from the engine's parameters) holds rank_memory's optimizer bytes on every stage."""
    c = Config()
    for k, v in GPT2.items():
        setattr(c.model, k, v)
    c.parallel.pp, c.parallel.tp, c.parallel.zero, c.parallel.microbatches = 2, 2, 1, 2
    c.train.batch_size = 4
    pred = memory.rank_memory(c, 2)
    comms = World(2).group()
    for s, layers in enumerate(memory.stage_layers(c.model, 2)):
        flat = FlatLayout(memory.part_shapes(c.model, layers, 2))
        held = {Zero1(flat, comms[r], OptimConfig(), AggregationConfig()).state_bytes() for r in range(2)}
        assert held == {pred["stages"][s]["optimizer"]}, s


def _model_cfg(kw) -> ModelConfig:
    return ModelConfig(**kw)


@pytest.mark.parametrize("kw", [GPT2, LLAMA, dict(GPT2, tie_embeddings=False)], ids=["gpt2", "llama", "untied"])
@pytest.mark.parametrize("pp, tp", [(1, 1), (1, 2), (2, 1), (2, 2), (3, 2)])
def test_rank_parameters_are_what_the_torch_model_holds(kw, pp, tp):
    """Ψ per (stage, tp rank) against the torch GPT built for that stage's layers and tp rank (as
    the engines build it); a tied wte is held by the first and the last stage."""
    m = _model_cfg(kw)
    comms = World(tp).group()
    for s, layers in enumerate(memory.stage_layers(m, pp)):
        for t in range(tp):
            group = torch_backend.TPGroup(comms[t]) if tp > 1 else None
            model = torch_backend.GPT(m, 1, layers=layers, tp=group)
            got = sum(p.numel() for _, p in model.named())
            assert got == memory.count_params(m, layers, tp), (s, t)
    whole = sum(memory.count_params(m, layers) for layers in memory.stage_layers(m, pp))
    extra = m.vocab_size * m.n_embd if pp > 1 and params.tied(m) else 0
    assert whole == params.count(m) + extra


@pytest.fixture(scope="module")
def horovod():
    from mpi4py import MPI
    torch_backend.init_horovod(MPI.COMM_WORLD)


def test_engine_holds_what_the_formula_says(horovod):
    """The real np=1 Engine (ZeRO 0), after a step (AdamW makes its moments on the first):
    num_params = Ψ, optimizer_state_bytes = 8Ψ."""
    c = Config()
    for k, v in GPT2.items():
        setattr(c.model, k, v)
    engine = torch_backend.Engine(c, Layout.build(c.parallel, world_size=1, rank=0))
    x = np.random.default_rng(0).integers(0, 64, (2, 16))
    engine.train_step(x, x, 1e-3)
    psi = memory.count_params(c.model)
    assert engine.num_params() == psi
    assert engine.optimizer_state_bytes() == memory.zero_state_bytes(psi, 1, 0)["optimizer"]
    assert memory.rank_memory(c, 1)["params"] == 4 * engine.num_params()


def _saved_bytes(model, x, y) -> int:
    """Bytes of the tensors autograd keeps for the backward, parameters and buffers excluded,
    each storage counted once (views share it)."""
    skip = {p.untyped_storage().data_ptr() for p in model.parameters()}
    skip |= {b.untyped_storage().data_ptr() for b in model.buffers()}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skip:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.loss(x, y)
    return sum(seen.values())


@pytest.mark.parametrize("kw", [GPT2, dict(LLAMA, n_kv_head=4)], ids=["gpt2", "llama"])
def test_activations_are_what_autograd_saves(kw):
    """The per-block and the head's activation terms against the bytes autograd saves in the
    torch model (block: the difference between 3 and 2 blocks)."""
    B, T = 4, 16
    rng = np.random.default_rng(0)
    x, y = (torch.from_numpy(rng.integers(0, 64, (B, T))) for _ in range(2))
    got, want = {}, {}
    for L in (2, 3):
        m = _model_cfg(dict(kw, n_layer=L))
        got[L] = _saved_bytes(torch_backend.GPT(m, 1), x, y)
        want[L] = memory.layers_activation_bytes(m, range(params.n_layers(m)), B * T)
    assert got[3] - got[2] == pytest.approx(want[3] - want[2], rel=0.15)
    assert got[3] == pytest.approx(want[3], rel=0.15)


def test_checkpointing_keeps_block_inputs_and_one_block():
    m = _model_cfg(dict(GPT2, n_layer=8))
    layers, tokens = range(params.n_layers(m)), 64
    none = memory.layers_activation_bytes(m, layers, tokens)
    full = memory.layers_activation_bytes(m, layers, tokens, checkpointing="full")
    block = memory.block_activation_elems(m) * tokens * 4
    head = memory.head_activation_elems(m) * tokens * 4
    assert none == pytest.approx(8 * block + head, abs=8)
    assert full == pytest.approx(8 * m.n_embd * tokens * 4 + block + head, abs=8)


@pytest.mark.parametrize("p, m", [(2, 4), (4, 4), (4, 8), (4, 2)])
def test_inflight_microbatches_per_schedule(p, m):
    assert [memory.inflight("1f1b", p, m, s) for s in range(p)] == [min(p - s, m) for s in range(p)]
    assert [memory.inflight("gpipe", p, m, s) for s in range(p)] == [m] * p


def test_rank_memory_splits_with_tp_and_pp_and_shards_with_zero():
    c = Config()
    for k, v in GPT2.items():
        setattr(c.model, k, v)
    c.train.batch_size = 4
    base = memory.rank_memory(c, 1)
    c.parallel.tp = 2
    tp2 = memory.rank_memory(c, 1)
    assert tp2["psi"] < base["psi"] and tp2["activations"] < base["activations"]
    c.parallel.tp, c.parallel.pp, c.parallel.microbatches = 1, 2, 2
    pp2 = memory.rank_memory(c, 2)
    want = [memory.count_params(c.model, ls) for ls in memory.stage_layers(c.model, 2)]
    assert [s["psi"] for s in pp2["stages"]] == want
    c.parallel.zero = 1
    z = memory.rank_memory(c, 2)
    assert z["optimizer"] == memory.zero_state_bytes(z["psi"], 2, 1)["optimizer"] < pp2["optimizer"]


@pytest.mark.parametrize("tied", [True, False])
def test_zero3_pipeline_stages_count_the_tied_units_gradient_and_no_prefetch(tied):
    """ZeRO-2/3 inside pipeline stages (zero_sharded.ShardedStageBase): a stage gathers no unit
    ahead, and the end stages, which hold the two copies of a tied wte, keep the embedding / head
    unit's gradient whole over the step; a middle stage (pp=3) and an untied model hold none."""
    c = Config()
    for k, v in (GPT2 if tied else LLAMA).items():
        setattr(c.model, k, v)
    c.train.batch_size = 4
    c.parallel.pp, c.parallel.microbatches, c.parallel.zero = 3, 2, 3
    counts = memory.layer_param_counts(c.model)
    ends = {0: counts[0], 2: counts[c.model.n_layer + 1]} if tied else {}
    for s, (st, layers) in enumerate(zip(memory.rank_memory(c, 2)["stages"], memory.stage_layers(c.model, 3))):
        unit = max(counts[i] for i in layers)
        assert st["live"] == 4 * unit * 2 + 4 * ends.get(s, 0), (s, st)   # gathered + gradient, no prefetch


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """The peak bytes of torch storages made while it is on and still alive at each op (each
    storage counted once: views share it), on the calling thread."""

    def __init__(self):
        super().__init__()
        self.live, self.peak = {}, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor):
                s = t.untyped_storage()
                self.live.setdefault(s.data_ptr(), (torch.multiprocessing.reductions.StorageWeakRef(s), s.nbytes()))
        self.live = {k: (r, n) for k, (r, n) in self.live.items() if not r.expired()}
        self.peak = max(self.peak, sum(n for _, n in self.live.values()))
        return out


def _np1_engine(**train):
    c = Config()
    for k, v in GPT2.items():
        setattr(c.model, k, v)
    for k, v in train.items():
        setattr(c.train, k, v)
    return c, torch_backend.Engine(c, Layout.build(c.parallel, world_size=1, rank=0))


def test_step_buffers_are_what_torchs_adamw_allocates(horovod):
    """The real np=1 Engine's AdamW step (torch.optim.AdamW, foreach: the CPU path) makes one
    temporary the size of its parameters, memory.step_bytes' 4 bytes per parameter (the fused
    kernel none). Measured on the second step: the first also makes the moments."""
    c, engine = _np1_engine()
    x = np.random.default_rng(0).integers(0, 64, (2, 16))
    engine.train_step(x, x, 1e-3)
    step, seen = engine.opt.step, []

    def measured():
        with _LiveBytes() as live:
            step()
        seen.append(live.peak)
    engine.opt.step = measured
    engine.train_step(x, x, 1e-3)
    psi = memory.count_params(c.model)
    # one temporary per parameter group at a time: the decayed (ndim >= 2) one, 97% of Ψ here;
    # the model counts all of Ψ (the biases and gains are 0.1% of a real model's)
    assert seen[0] == pytest.approx(memory.step_bytes(psi, 1, 0), rel=0.05)
    assert memory.step_bytes(psi, 1, 0, fused_adamw=True) == 0


def test_the_backward_peak_lies_between_the_activations_and_their_sum_with_the_gradients(horovod):
    """The real np=1 Engine's whole second step: the bytes it makes and holds at once. The
    gradients grow as the backward frees the activations, so rank_memory's grads + max(activations,
    step) bounds the peak from above and the activations alone from below (AdamW's temporary
    comes after the activations are gone)."""
    c, engine = _np1_engine(batch_size=4)
    x = np.random.default_rng(0).integers(0, 64, (4, 16))
    engine.train_step(x, x, 1e-3)
    with _LiveBytes() as live:
        engine.train_step(x, x, 1e-3)
    pred = memory.rank_memory(c, 1)
    assert pred["fusion"] == 0   # no dp reduction at np = 1
    assert pred["activations"] < live.peak < pred["grads"] + max(pred["activations"], pred["step"])


def test_fusion_buffer_holds_the_largest_fused_message_up_to_the_threshold():
    """Horovod's fusion buffer: resident pages = the message copied in (dp > 1 only), capped at
    aggregation.fusion_threshold_mb (0: Horovod's 128 MiB); ZeRO 2/3 copy one unit at a time."""
    psi = 10_000_000
    assert memory.fusion_bytes(psi, 1, 0) == 0
    assert memory.fusion_bytes(psi, 2, 0) == memory.fusion_bytes(psi, 2, 1) == 4 * psi
    assert memory.fusion_bytes(psi, 4, 3, unit=1000) == 4000
    assert memory.fusion_bytes(100_000_000, 2, 0) == memory.HOROVOD_FUSION_BYTES
    c = Config()
    for k, v in GPT2.items():
        setattr(c.model, k, v)
    c.parallel.dp = 2
    grads = memory.rank_memory(c, 2)["grads"]
    assert memory.rank_memory(c, 2)["fusion"] == grads
    c.aggregation.fusion_threshold_mb = 0.01
    assert memory.rank_memory(c, 2)["fusion"] == int(0.01 * 1024 * 1024) < grads
    c.aggregation.fusion_threshold_mb, c.aggregation.compression = 0, "fp16"
    assert memory.rank_memory(c, 2)["fusion"] == grads // 2


def test_training_peak_starts_afresh_at_the_first_step():
    """trainer.reset_peak_rss: the peak logged is the training's, not start-up's (hvdllm bench
    plan compares it with the prediction). A 96 MiB block touched and freed before the reset is
    in the process's peak before it and not after."""
    from hvdllm.trainer import peak_rss_mib, reset_peak_rss
    block = np.ones(96 << 17)   # 96 MiB of float64, mmapped by glibc and returned when freed
    before = peak_rss_mib()
    del block
    reset_peak_rss()
    after = peak_rss_mib()
    assert after < before - 64, (before, after)
    grown = np.ones(32 << 17)   # 32 MiB touched after the reset: in the new peak
    assert peak_rss_mib() > after + 24
    del grown


@pytest.mark.parametrize("schedule,m,want", [("1f1b", 4, [True, True]), ("1f1b", 1, [False, False]),
                                              ("gpipe", 4, [False, False])])
def test_gradients_beside_the_activation_peak_follow_the_schedule(schedule, m, want):
    """ZeRO 0/1 free the gradients before each step: a pipeline stage holds them at its
    activations' peak only when the schedule reaches that peak again after a backward."""
    assert [memory.grads_at_peak(schedule, 2, m, s) for s in range(2)] == want
    assert not memory.grads_at_peak("1f1b", 1, 4, 0)


def test_gradients_move_to_the_steps_term_when_freed_before_the_forward():
    """np=1, no accumulation: peak = params + AdamW + max(activations, gradients + the step's
    temporary); with accumulation k=2 the first micro-batch's gradients sit beside the second's
    activations."""
    base = ["model.n_layer=4", "model.n_embd=256", "model.n_head=4", "model.block_size=128",
            "model.vocab_size=256", "train.batch_size=8"]
    one = memory.rank_memory(config_mod.load(None, base), 1)
    assert one["device"] == one["params"] + one["optimizer"] + max(one["activations"], one["grads"] + one["step"])
    acc = memory.rank_memory(config_mod.load(None, [*base, "aggregation.accumulation=2"]), 1)
    assert acc["device"] == (acc["params"] + acc["grads"] + acc["optimizer"]
                             + max(acc["activations"], acc["step"]))
