"""`hvdllm plan`: which layout to train a config with on N nodes of G devices -- every (dp, pp,
tp, ZeRO stage, micro-batch, activation checkpointing) that `hvdllm train` accepts, its memory
per device and predicted step time, ranked, with the command that runs it.

    hvdllm plan CONFIG --nodes N --devices-per-node G [--calibration FILE] [--system NAME]
                [--global-batch SEQUENCES] [--precision fp32|bf16] [--top K] [--explain]
                [--plot FILE] [--launcher mpirun|sbatch] [--set KEY=VALUE ...]

Validity: each candidate is the config with its parallel.* / train.batch_size /
aggregation.accumulation settings, passed through config.validate at world = N*G, the rules
`hvdllm train` applies; a rejected candidate is never shown. ZeRO stages and activation
checkpointing are tried only as far as the config knows them (a stage validate refuses, or a
settings key that does not exist yet, is not proposed).

Memory: hvdllm/memory.py (model state by ZeRO stage, Horovod's fusion buffer, activations and
in-flight micro-batches or the optimizer step's buffers, whichever is larger) on the worst
pipeline stage, against the device's memory less `--reserve` (workspace and allocator slack,
which memory.py does not count).

Step time, per optimizer step of the global batch (k micro-batches of b sequences per dp rank):
  compute   per micro-batch and stage: layers * overhead_per_layer + FLOPs / (peak * efficiency)
            (a calibration file measured by `hvdllm bench calibrate` gives its own fit); the
            FLOPs of a layer are 6 * its matrix parameters + 12 * C * s (attention) per token,
            split tp ways; full checkpointing adds a forward (x 4/3 on blocks)
  tp        per micro-batch, 4 allreduces per block (2 more when checkpointing recomputes the
            forward), 2 for the vocabulary-parallel embedding and head, of b*s*C activations;
            synchronous inside each layer: not overlapped
  pp        per micro-batch 2 point-to-point messages (activation, gradient) of b*s*C on the
            critical path; the bubble: time = k * t_stage / (1 - (p-1)/(v*k + p-1))
  dp        ring collectives 2(n-1)/n * S / busbw + 2(n-1) * latency (allreduce; reduce-scatter
            and allgather half of each), S = the stage's gradient bytes: ZeRO 0 one allreduce
            and ZeRO 1 a reduce-scatter + an allgather of the parameters, after the backward
            (torch_backend/engine.py, strategies/zero.py): not overlapped; ZeRO 2 and 3
            (strategies/zero_sharded.py) reduce-scatter each unit's gradient per micro-batch as
            the backward makes it (synchronous: not overlapped), ZeRO 2 allgathers the
            parameters once per step, ZeRO 3 gathers each unit for its forward and again for its
            backward, one unit ahead: hidden behind compute as far as compute lasts (inside
            pipeline stages and beside tp, which gather none ahead, all exposed)
  tied wte  pp > 1, tied head: the embedding gradient between first and last stage (p2p)
  optimizer AdamW, the gradient norm and clipping, and ZeRO's flat copies, in bytes read and
            written per parameter at memory bandwidth (optimizer_bytes: 32 + 12 fused, 80 + 12
            for torch's foreach AdamW off CUDA, + 24 per held parameter for ZeRO-1's copies)
            (offloaded: the host's, plus the shard's gradient down and parameters up the host link)
A group's link is the node's (intra) when its ranks fit one node, else the network's (inter):
rank order puts tp fastest, then pp, then dp (hvdllm/layout.py). A dp group with g members on
each node reduces over min(g, the system's inter_node_ports) ports at once (_link_for).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import shlex
from functools import lru_cache
from pathlib import Path

from . import config as config_mod
from . import memory, params
from .errors import ConfigError

DEFAULTS = Path(__file__).with_name("calibration.json")
GiB = 1 << 30
CKPT_KEY = ("train", "activation_checkpointing")
OFFLOAD_KEY = ("parallel", "offload")
PRECISION_KEY = ("train", "precision")
ZERO_STAGES = (0, 1, 2, 3)
MAX_MICRO = 64     # micro-batch sizes tried: the divisors of a dp rank's batch up to this


# ---------------------------------------------------------------------------------------------
# calibration: a system is a device and two links

@dataclasses.dataclass
class Link:
    name: str
    bandwidth: float             # bytes/s each way, what a ring's bus bandwidth approaches
    latency_s: float             # per ring step / message
    efficiency: float = 1.0
    collectives: dict = dataclasses.field(default_factory=dict)   # measured: {kind: {busbw, latency_s}}
    p2p: dict = dataclasses.field(default_factory=dict)           # measured: {bandwidth, latency_s}

    def busbw(self, kind: str) -> tuple[float, float]:
        c = self.collectives.get(kind)
        if c:
            return c["busbw"], c["latency_s"]
        return self.bandwidth * self.efficiency, self.latency_s

    def p2p_cost(self) -> tuple[float, float]:
        if self.p2p:
            return self.p2p["bandwidth"], self.p2p["latency_s"]
        return self.bandwidth * self.efficiency, self.latency_s


@dataclasses.dataclass
class System:
    name: str
    device_name: str
    device: dict
    intra: Link
    inter: Link
    devices_per_node: int | None = None
    inter_node_ports: int = 1     # network ports per node, each of inter's bandwidth

    def peak(self, precision: str) -> float:
        peaks = self.device["peak_flops"]
        if precision not in peaks:
            raise ConfigError([f"--precision: {self.device_name} has no {precision!r} peak in the "
                               f"calibration (it has {', '.join(peaks)})"])
        return peaks[precision]

    def rate(self, precision: str) -> float:
        """Achieved FLOP/s of large matrix products."""
        d = self.device
        if "achieved_flops" in d and precision in d["achieved_flops"]:
            return d["achieved_flops"][precision]
        return self.peak(precision) * d.get("efficiency", 1.0)


def _link(links: dict, name: str) -> Link:
    if name not in links:
        raise ConfigError([f"calibration: link {name!r} is not among {', '.join(links)}"])
    d = links[name]
    return Link(name, d["bandwidth"], d["latency_s"], d.get("efficiency", 1.0), d.get("collectives", {}),
                d.get("p2p", {}))


def load_calibration(path: str | None = None, system: str | None = None) -> System:
    """The system `system` (default: the file's default_system) of a calibration JSON (default:
    the one shipped in hvdllm/calibration.json)."""
    p = Path(path) if path else DEFAULTS
    try:
        data = json.loads(p.read_text())
    except OSError as e:
        raise ConfigError([f"--calibration: cannot read {p} ({e.strerror or e})"]) from None
    except json.JSONDecodeError as e:
        raise ConfigError([f"--calibration: {p} is not JSON ({e}); write it with hvdllm bench calibrate"]) from None
    systems = data.get("systems", {})
    name = system or data.get("default_system")
    if name not in systems:
        raise ConfigError([f"--system: {name!r} is not in {p} (systems: {', '.join(systems) or 'none'})"])
    s = systems[name]
    dev = data["devices"][s["device"]]
    return System(name, s["device"], dev, _link(data["links"], s["intra_node"]),
                  _link(data["links"], s["inter_node"]), s.get("devices_per_node"), s.get("inter_node_ports", 1))


# ---------------------------------------------------------------------------------------------
# collectives and messages

def ring_allreduce_s(nbytes: float, n: int, link: Link) -> float:
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = link.busbw("allreduce")
    return 2 * (n - 1) / n * nbytes / bw + 2 * (n - 1) * lat


def ring_half_s(kind: str, nbytes: float, n: int, link: Link) -> float:
    """Reduce-scatter or allgather of a buffer of `nbytes` in all."""
    if n <= 1 or nbytes <= 0:
        return 0.0
    bw, lat = link.busbw(kind)
    return (n - 1) / n * nbytes / bw + (n - 1) * lat


def p2p_s(nbytes: float, link: Link) -> float:
    bw, lat = link.p2p_cost()
    return nbytes / bw + lat


# ---------------------------------------------------------------------------------------------
# candidates

@dataclasses.dataclass(frozen=True)
class Candidate:
    dp: int
    pp: int
    tp: int
    zero: int
    micro: int                # sequences per micro-batch
    k: int                    # micro-batches per step per dp rank (pipeline or accumulation)
    checkpointing: str = "none"
    offload: str = "none"

    def sets(self, cfg) -> list[str]:
        """The `--set` overrides that give `cfg` this layout."""
        out = [f"parallel.dp={self.dp}", f"parallel.pp={self.pp}", f"parallel.tp={self.tp}",
               f"parallel.zero={self.zero}"]
        if self.pp > 1:
            out += [f"parallel.microbatches={self.k}", f"train.batch_size={self.micro * self.k}",
                    "aggregation.accumulation=1"]
        else:
            out += ["parallel.microbatches=1", f"train.batch_size={self.micro}",
                    f"aggregation.accumulation={self.k}"]
        if _has(cfg, CKPT_KEY):
            out.append(f"train.activation_checkpointing={self.checkpointing}")
        if _has(cfg, OFFLOAD_KEY):
            out.append(f"parallel.offload={self.offload}")
        return out

    def label(self) -> str:
        z = f" z{self.zero}" if self.zero else ""
        c = " ckpt" if self.checkpointing != "none" else ""
        o = " off" if self.offload != "none" else ""
        return f"dp{self.dp} pp{self.pp} tp{self.tp}{z} b{self.micro}x{self.k}{c}{o}"


def _has(cfg, key) -> bool:
    return hasattr(getattr(cfg, key[0]), key[1])


def apply(cfg, cand: Candidate):
    """A copy of cfg with the candidate's settings (the same values its --set flags give)."""
    par = dict(dp=cand.dp, pp=cand.pp, tp=cand.tp, zero=cand.zero,
               microbatches=cand.k if cand.pp > 1 else 1)
    if _has(cfg, OFFLOAD_KEY):
        par["offload"] = cand.offload
    train = dict(batch_size=cand.micro * (cand.k if cand.pp > 1 else 1))
    if _has(cfg, CKPT_KEY):
        train["activation_checkpointing"] = cand.checkpointing
    agg = dict(accumulation=1 if cand.pp > 1 else cand.k)
    return dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel, **par),
                               train=dataclasses.replace(cfg.train, **train),
                               aggregation=dataclasses.replace(cfg.aggregation, **agg))


def valid(cfg, world: int) -> list[str]:
    """config.validate's problems for cfg at `world` ranks ([] = `hvdllm train` accepts it)."""
    try:
        config_mod.validate(cfg, world)
    except ConfigError as e:
        return list(e.problems) if hasattr(e, "problems") else [str(e)]
    return []


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def candidates(cfg, world: int, devices_per_node: int, global_batch: int):
    """Every layout of `world` ranks for the global batch (sequences per step), before validation:
    tp divides the devices of a node (tp's allreduces per layer belong on its fastest link)."""
    ckpts = ["none", "full"] if _has(cfg, CKPT_KEY) else ["none"]
    layers = params.n_layers(cfg.model)
    for tp in _divisors(devices_per_node):
        if world % tp:
            continue
        for pp in _divisors(world // tp):
            if pp > layers:
                continue
            dp = world // (tp * pp)
            if global_batch % dp:
                continue
            per_rank = global_batch // dp
            for micro in [d for d in _divisors(per_rank) if d <= MAX_MICRO]:
                k = per_rank // micro
                for zero in ZERO_STAGES if dp > 1 else (0,):
                    offloads = ["none", "optimizer"] if zero and _has(cfg, OFFLOAD_KEY) else ["none"]
                    for ck in ckpts:
                        for off in offloads:
                            yield Candidate(dp, pp, tp, zero, micro, k, ck, off)


# ---------------------------------------------------------------------------------------------
# prediction

def _layer_flops_per_token(m, i: int) -> float:
    """Training FLOPs per token of layer i (0 embeddings, 1..L blocks, L+1 head): 6 per
    multiplied parameter, plus attention's 12 * C * s per block (params.flops_per_token's terms)."""
    return _model_flops(memory._frozen(m))[0][i]


@lru_cache(maxsize=256)
def _model_flops(m) -> tuple:
    """(per-layer FLOPs per token, params.flops_per_token) of a model, once per model."""
    shapes = params.param_shapes(m)
    per = [0.0]                                     # the embeddings: a lookup
    for i in range(1, params.n_layers(m)):
        n = sum(math.prod(shapes[x]) for x in params.layer_params(m, i) if len(shapes[x]) >= 2)
        per.append(6.0 * n + (12.0 * m.n_embd * m.block_size if i <= m.n_layer else 0.0))
    return tuple(per), params.flops_per_token(m)


def _link_for(span: int, devices_per_node: int, system: System, per_node: int = 1) -> Link:
    """The link of a group spanning `span` consecutive ranks, `per_node` of its members on each
    node. Across nodes a ring's only slow hop is the one leaving a node; NCCL runs one ring
    (channel) per network port and spreads them over the node's ports, so a group with g members
    per node reduces over min(g, ports) ports at once, never faster than the node's own link
    (NVIDIA/nccl issue 412, NCCL's maintainer: more NICs give more inter-node bus bandwidth "up to
    160GB/s which is the NVLink intra-node bandwidth of your system"; issue 1168: on one cluster,
    about 45 GB/s with 4 GPUs per node and 90 GB/s with 8)."""
    if span <= devices_per_node:
        return system.intra
    ports = min(per_node, system.inter_node_ports)
    if ports <= 1 or system.inter.collectives:
        return system.inter
    bw = min(system.inter.bandwidth * system.inter.efficiency * ports, system.intra.bandwidth * system.intra.efficiency)
    return dataclasses.replace(system.inter, name=f"{system.inter.name} x{ports}", bandwidth=bw, efficiency=1.0)


OVERLAPPABLE = ("tp", "pp", "dp")


def optimizer_bytes(zero: int, fused: bool, clip: bool) -> tuple[int, int]:
    """(bytes read + written per parameter the rank updates, per parameter it holds) by the step
    after the backward, at memory bandwidth:
      update    fused AdamW (torch.optim.AdamW(fused=True) on CUDA, and ZeRO's DeviceAdamW through
                torch._fused_adamw_): p, g, m, v read, p, m, v written, 32; torch.optim.AdamW's
                foreach path (ZeRO 0 off CUDA, torch_backend/adamw_state.py) passes over the
                vectors once per _foreach op (torch/optim/adam.py _multi_tensor_adam): p *= 1-lr*wd
                8, lerp m 12, v *= b2 8, addcmul v 12, sqrt(v) 8, / bias 8, + eps 8, addcdiv p 16: 80
      norm      the gradient norm reads every gradient, 4; clipping scales them in place, 8
      copies    ZeRO 1 joins the gradients and the parameters into flat vectors (concat_flat,
                device_flat_params) and writes the result back (assign_flat), 8 each: 24 per
                parameter held, not per one updated; ZeRO 2/3 join each unit's gradients (8)"""
    update = 32 if fused or zero else 80
    norm = 4 + (8 if clip else 0)
    copies = {0: 0, 1: 24}.get(zero, 8)
    return update + norm, copies


def predict(cfg, cand: Candidate, system: System, devices_per_node: int, precision: str = "fp32",
            reserve: float = 0.1, cal_layers: dict | None = None, overlap: tuple = (),
            param_bytes: int = 4) -> dict:
    """Memory and step time of one layout (cfg already has its settings: apply()). Returns a
    dict of the terms (seconds, bytes) and the totals.

    overlap: communication another system hides behind compute, which hvdllm's engines do not
    (`bench plan --published` compares with such runs): "tp" and "pp" per micro-batch behind its
    compute, "dp" behind the last micro-batch's forward and backward (gradients reduced as the
    backward makes them, parameters gathered as the forward needs them); only the excess shows.
    param_bytes: per parameter in ZeRO's allgathers (hvdllm's engines gather their fp32
    parameters; a system keeping bf16 parameters beside fp32 master copies gathers 2)."""
    m = cfg.model
    act_bytes = 2 if precision in ("bf16", "fp16") else 4
    # a device with a host link is an accelerator, where torch's AdamW is the fused kernel with no
    # step temporary (torch_backend/adamw_state.py); a CPU runs the foreach one
    mem = memory.rank_memory(cfg, cand.dp, checkpointing=cand.checkpointing, offload=cand.offload,
                             dtype_bytes=act_bytes, fused_adamw="host_link_bandwidth" in system.device)
    capacity = system.device["memory_bytes"] * (1 - reserve)
    v = cfg.parallel.virtual_stages if cfg.parallel.schedule == "interleaved" else 1
    tokens_mb = cand.micro * m.block_size
    rate = system.rate(precision)
    per_layer = system.device.get("overhead_per_layer_s", 0.0)
    L = m.n_layer
    tp_link = _link_for(cand.tp, devices_per_node, system)
    pp_link = _link_for(cand.tp * cand.pp, devices_per_node, system)
    dp_link = _link_for(cand.tp * cand.pp * cand.dp, devices_per_node, system,
                        max(1, min(cand.dp, devices_per_node // (cand.tp * cand.pp))))
    act_msg = tokens_mb * m.n_embd * act_bytes
    stages = []
    for chunks in memory.stage_chunks(m, cand.pp, v, cfg.parallel.partition):
        layers = [i for c in chunks for i in c]
        blocks = sum(1 for i in layers if 1 <= i <= L)
        flops = sum(_layer_flops_per_token(m, i) * (4 / 3 if cand.checkpointing == "full" and 1 <= i <= L else 1)
                    for i in layers) * tokens_mb / cand.tp
        compute = len(layers) * per_layer + flops / rate
        n_ar = (4 + (2 if cand.checkpointing == "full" else 0)) * blocks + (0 in layers) + (L + 1 in layers)
        tp_s = n_ar * ring_allreduce_s(act_msg, cand.tp, tp_link) if cand.tp > 1 else 0.0
        if cand.tp > 1 and L + 1 in layers:   # vocabulary-parallel cross-entropy: 3 small ones
            tp_s += 3 * ring_allreduce_s(tokens_mb * 4, cand.tp, tp_link)
        pp_s = 2 * p2p_s(act_msg, pp_link) * len(chunks) if cand.pp > 1 else 0.0
        hidden = (tp_s if "tp" in overlap else 0.0) + (pp_s if "pp" in overlap else 0.0)
        t_mb = compute + tp_s + pp_s - min(hidden, compute)
        stages.append({"layers": layers, "flops": flops, "compute_s": compute, "tp_s": tp_s, "pp_s": pp_s,
                       "t_mb": t_mb})
    slow = max(stages, key=lambda s: s["t_mb"])
    bubble = (cand.pp - 1) / (v * cand.k + cand.pp - 1) if cand.pp > 1 else 0.0
    pipeline_s = cand.k * slow["t_mb"] / (1 - bubble)
    # the data-parallel reduction of the largest stage's gradients (every stage does it at once)
    psi = mem["psi"]
    grad_bytes = psi * (2 if cfg.aggregation.compression in ("fp16", "bf16") else 4)
    dp_terms = {}
    if cand.dp > 1:
        # ZeRO 2/3 (strategies/zero_sharded.py) move one message per unit (layer): the ring's
        # latency once per unit; gradients are reduce-scattered per micro-batch, as backward
        # makes them (synchronously)
        units = len(mem["layers"])
        per_unit = (units - 1) * (cand.dp - 1)
        if cand.zero == 0:
            dp_terms["allreduce"] = ring_allreduce_s(grad_bytes, cand.dp, dp_link)
        elif cand.zero == 1:
            dp_terms["reducescatter"] = ring_half_s("reducescatter", grad_bytes, cand.dp, dp_link)
            dp_terms["allgather"] = ring_half_s("allgather", param_bytes * psi, cand.dp, dp_link)
        else:
            dp_terms["reducescatter"] = cand.k * (ring_half_s("reducescatter", grad_bytes, cand.dp, dp_link)
                                                  + per_unit * dp_link.busbw("reducescatter")[1])
            if cand.zero == 2:
                dp_terms["allgather"] = ring_half_s("allgather", param_bytes * psi, cand.dp, dp_link)
            else:   # a gather per unit for its forward and again for its backward, one unit ahead
                gathers = 2 * cand.k * (ring_half_s("allgather", param_bytes * psi, cand.dp, dp_link)
                                        + per_unit * dp_link.busbw("allgather")[1])
                # inside pipeline stages (ZeroSharded.stage_forward) and beside tp none is issued
                # ahead: exposed
                ahead = cand.pp == 1 and cand.tp == 1
                dp_terms["gathers_exposed"] = max(0.0, gathers - pipeline_s) if ahead else gathers
        if cand.zero:
            dp_terms["norm"] = ring_allreduce_s(8, cand.dp, dp_link)
    dp_s = sum(dp_terms.values())
    if "dp" in overlap and dp_s:
        dp_terms["hidden"] = -min(dp_s, slow["t_mb"])
        dp_s += dp_terms["hidden"]
    tied_s = 0.0
    if cand.pp > 1 and params.tied(m):
        tied_s = 2 * p2p_s(m.vocab_size * m.n_embd / cand.tp * 4, _link_for(cand.tp * cand.pp, devices_per_node,
                                                                            system))
    updated = -(-psi // cand.dp) if cand.zero else psi
    dev = system.device
    bw = dev.get("memory_bandwidth", 1e11)
    per_param, copies = optimizer_bytes(cand.zero, "host_link_bandwidth" in dev, cfg.optim.grad_clip > 0)
    opt_s = (per_param * updated + copies * psi) / bw
    if cand.offload == "optimizer":   # the update in host memory; the shard's gradient down, parameters up
        opt_s = per_param * updated / dev.get("host_memory_bandwidth", bw) + copies * psi / bw
        if dev.get("host_link_bandwidth"):
            opt_s += 8 * updated / dev["host_link_bandwidth"]
    step = pipeline_s + dp_s + tied_s + opt_s
    tokens = cand.dp * cand.micro * cand.k * m.block_size
    world = cand.dp * cand.pp * cand.tp
    model_flops = _model_flops(memory._frozen(m))[1] * tokens
    return {"candidate": cand, "memory": mem, "capacity": capacity, "fits": mem["device"] <= capacity,
            "stages": stages, "slow_stage": stages.index(slow), "bubble": bubble, "pipeline_s": pipeline_s,
            "compute_s": cand.k * slow["compute_s"], "tp_s": cand.k * slow["tp_s"], "pp_s": cand.k * slow["pp_s"],
            "dp": dp_terms, "dp_s": dp_s, "tied_s": tied_s, "optimizer_s": opt_s, "step_s": step,
            "tokens_per_step": tokens, "tokens_per_s": tokens / step,
            "mfu": model_flops / (step * world * system.peak(precision)),
            "links": {"tp": tp_link.name, "pp": pp_link.name, "dp": dp_link.name}}


def plan(cfg, nodes: int, devices_per_node: int, system: System, global_batch: int, precision: str = "fp32",
         reserve: float = 0.1) -> tuple[list[dict], dict]:
    """Every valid layout's prediction, fitting ones first, each group by step time; and counts
    (candidates, rejected by validation, too big)."""
    world = nodes * devices_per_node
    out, counts = [], {"candidates": 0, "invalid": 0, "too_big": 0}
    cache: dict = {}
    for cand in candidates(cfg, world, devices_per_node, global_batch):
        counts["candidates"] += 1
        c = apply(cfg, cand)
        # today's rules see the micro-batch split only through parallel.microbatches (train.batch_size
        # is micro * k by construction): one validation per rest of the layout; the layouts shown
        # are validated again exactly (run), and the unit tier validates every one proposed
        key = (cand.dp, cand.pp, cand.tp, cand.zero, cand.checkpointing, cand.offload, cand.pp > 1 and cand.k)
        if key not in cache:
            cache[key] = valid(c, world)
        if cache[key]:
            counts["invalid"] += 1
            continue
        r = predict(c, cand, system, devices_per_node, precision, reserve)
        counts["too_big"] += not r["fits"]
        out.append(r)
    # equal times (ZeRO 2 and 3 often model alike) go to the lower stage, then the smaller memory
    out.sort(key=lambda r: (not r["fits"], r["step_s"], r["candidate"].zero, r["memory"]["device"]))
    return out, counts


# ---------------------------------------------------------------------------------------------
# output

def commands(config_path: str, cand: Candidate, cfg, nodes: int, devices_per_node: int,
             extra_sets=(), precision: str | None = None) -> dict:
    world = cand.dp * cand.pp * cand.tp
    sets = [*extra_sets, *cand.sets(cfg)]
    if precision and _has(cfg, PRECISION_KEY) and precision != cfg.train.precision:
        sets.append(f"train.precision={precision}")
    train = ["train", config_path] + [a for kv in sets for a in ("--set", kv)]
    launch = ["hvdllm", "launch", "-np", str(world)]
    sbatch = [*launch, "--launcher", "sbatch", "--nodes", str(nodes)]
    return {"launch": shlex.join([*launch, "--", *train]), "sbatch": shlex.join([*sbatch, "--", *train])}


def _gib(b: float) -> float:
    return b / GiB


def rows(results: list[dict]) -> list[dict]:
    """Table rows; numbers as fixed-width strings (format_table would print 4 decimals)."""
    out = []
    for i, r in enumerate(results, 1):
        c, mem = r["candidate"], r["memory"]
        out.append({"#": i, "dp": c.dp, "pp": c.pp, "tp": c.tp, "zero": c.zero, "micro": c.micro, "k": c.k,
                    "ckpt": c.checkpointing, "offload": c.offload, "mem": f"{_gib(mem['device']):7.2f}",
                    "step": f"{r['step_s'] * 1e3:10.1f}", "tok": f"{r['tokens_per_s']:12,.0f}",
                    "mfu": f"{r['mfu']:.3f}", "bubble": f"{r['bubble']:.3f}", "fits": "yes" if r["fits"] else "NO"})
    return out


COLUMNS = [("#", "#"), ("dp", "dp"), ("pp", "pp"), ("tp", "tp"), ("zero", "zero"), ("micro", "b"),
           ("k", "mb/acc"), ("ckpt", "ckpt"), ("offload", "offload"), ("mem", "GiB/dev"), ("step", "step ms"),
           ("tok", "tokens/s"), ("mfu", "MFU"), ("bubble", "bubble"), ("fits", "fits")]


def explain(r: dict) -> str:
    c, mem = r["candidate"], r["memory"]
    s = r["stages"][r["slow_stage"]]
    lines = [f"  {c.label()}  (links: tp {r['links']['tp']}, pp {r['links']['pp']}, dp {r['links']['dp']})",
             f"    memory on stage {mem['stage']}: params {_gib(mem['params']):.2f} + grads {_gib(mem['grads']):.2f} "
             f"+ optimizer {_gib(mem['optimizer']) if not mem['host'] else 0:.2f} "
             f"+ live units and master shard {_gib(mem['live'] + mem['master']):.2f} "
             f"+ fusion buffer {_gib(mem['fusion']):.2f} + max(activations {_gib(mem['activations']):.2f} "
             f"({mem['inflight']} micro-batch(es) in flight, checkpointing {mem['checkpointing']}), step buffers "
             f"{_gib(mem['step']):.2f}) = {_gib(mem['device']):.2f} GiB of "
             f"{_gib(r['capacity']):.2f} usable"
             + (f"; host {_gib(mem['host']):.2f} GiB" if mem["host"] else "") + f"; Ψ = {mem['psi']:,}",
             f"    per micro-batch on the slowest stage {r['slow_stage']} ({len(s['layers'])} layers): compute "
             f"{s['compute_s'] * 1e3:.3f} ms ({s['flops'] / 1e9:.2f} GFLOP) + tp {s['tp_s'] * 1e3:.3f} ms + pp p2p "
             f"{s['pp_s'] * 1e3:.3f} ms",
             f"    step: {c.k} micro-batches x {s['t_mb'] * 1e3:.3f} ms / (1 - bubble {r['bubble']:.3f}) = "
             f"{r['pipeline_s'] * 1e3:.2f} ms, + dp {r['dp_s'] * 1e3:.2f} ms "
             f"({', '.join(f'{k} {v * 1e3:.2f}' for k, v in r['dp'].items()) or 'none'}) + tied wte "
             f"{r['tied_s'] * 1e3:.2f} ms + AdamW {r['optimizer_s'] * 1e3:.2f} ms = "
             f"{r['step_s'] * 1e3:.2f} ms; {r['tokens_per_step']:,} tokens, MFU {r['mfu']:.3f}"]
    return "\n".join(lines)


def plot(results: list[dict], path: str, title: str, labelled: int = 8) -> Path | None:
    """Every layout's predicted step time in rank order (log scale; grey: does not fit), the best
    `labelled` named."""
    from .bench.common import pyplot, save_figure
    plt = pyplot("[hvdllm plan]")
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(10, 5))
    xs = range(1, len(results) + 1)
    ax.scatter(xs, [r["step_s"] for r in results], s=8,
               c=["tab:blue" if r["fits"] else "tab:gray" for r in results])
    best = "\n".join(f"{i}. {r['candidate'].label()}  {r['step_s'] * 1e3:,.1f} ms"
                     for i, r in enumerate(results[:labelled], 1))
    ax.text(0.02, 0.97, best, transform=ax.transAxes, fontsize=7, va="top", family="monospace")
    ax.set_yscale("log")
    ax.set_xlabel("layout, in rank order (grey: does not fit in memory)")
    ax.set_ylabel("predicted step time (s)")
    ax.set_title(title, fontsize=9)
    return save_figure(plt, fig, Path(path))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `hvdllm plan` (cli.py builds its subcommand with them)."""
    p.add_argument("config", help="TOML file")
    p.add_argument("--nodes", type=int, required=True)
    p.add_argument("--devices-per-node", type=int, required=True)
    p.add_argument("--calibration", help="calibration JSON (hvdllm bench calibrate writes one; default: "
                                         "the datasheet defaults in hvdllm/calibration.json)")
    p.add_argument("--system", help="system in the calibration file (default: its default_system)")
    p.add_argument("--global-batch", type=int, default=0,
                   help="sequences per optimizer step (default: the config's train.batch_size x "
                        "aggregation.accumulation on every device)")
    p.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="compute precision (default: the config's train.precision where it exists, else fp32)")
    p.add_argument("--reserve", type=float, default=0.1,
                   help="fraction of device memory kept for what memory.py does not count (default 0.1)")
    p.add_argument("--top", type=int, default=10, help="layouts shown (default 10)")
    p.add_argument("--explain", action="store_true", help="each shown layout's memory and time terms")
    p.add_argument("--plot", metavar="FILE", help="PNG of the predicted step time per layout")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting")
    p.add_argument("--json", metavar="FILE", help="write every prediction as JSON")


def parse(argv):
    p = argparse.ArgumentParser(prog="hvdllm plan", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    return p.parse_args(argv)


def main(argv=None) -> int:
    return run(parse(argv))


def run(a) -> int:
    if a.nodes < 1 or a.devices_per_node < 1 or a.top < 1 or not 0 <= a.reserve < 1:
        raise ConfigError(["--nodes, --devices-per-node and --top must be >= 1, --reserve in [0, 1)"])
    cfg = config_mod.load(a.config, a.set)
    if cfg.model.layers:
        raise ConfigError(["model.layers: hvdllm plan sizes the built-in models (model.family); a user's layer "
                           "list has no formula here"])
    if not cfg.model.vocab_size:   # the tokenizer's, as train resolves it
        vocab = 256 if cfg.data.tokenizer == "byte" else cfg.data.bpe_vocab_size
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab))
    precision = a.precision or (getattr(cfg.train, "precision", "fp32") if _has(cfg, PRECISION_KEY) else "fp32")
    system = load_calibration(a.calibration, a.system)
    world = a.nodes * a.devices_per_node
    gb = a.global_batch or cfg.train.batch_size * cfg.aggregation.accumulation * world
    results, counts = plan(cfg, a.nodes, a.devices_per_node, system, gb, precision, a.reserve)
    fits = [r for r in results if r["fits"]]
    m = cfg.model
    print(f"[hvdllm plan] {a.config}: {m.family} {params.count(m) / 1e6:,.1f}M parameters "
          f"({m.n_layer} x {m.n_embd}, T={m.block_size}, vocab {m.vocab_size}) on {a.nodes} x "
          f"{a.devices_per_node} = {world} devices of {system.name} ({system.device_name}, {precision}); global "
          f"batch {gb} sequences = {gb * m.block_size:,} tokens per step")
    print(f"[hvdllm plan] {counts['candidates']} layouts tried, {counts['invalid']} refused by `hvdllm train`'s "
          f"validation, {counts['too_big']} too big for {_gib(system.device['memory_bytes'] * (1 - a.reserve)):.1f} "
          f"GiB per device, {len(fits)} fit")
    if precision != "fp32" and not _has(cfg, PRECISION_KEY):
        print(f"[hvdllm plan] note: this hvdllm has no train.precision yet; the commands below train in fp32, "
              f"not {precision}")
    shown = (fits or results)[:a.top]
    for r in shown:   # exactly, as `hvdllm train` will
        problems = valid(apply(cfg, r["candidate"]), world)
        if problems:
            raise ConfigError([f"hvdllm plan proposed {r['candidate'].label()}, which validation refuses "
                               f"(a planner bug: please report it):", *problems])
    if not fits:
        print("[hvdllm plan] no layout fits: the smallest are shown; raise --nodes, lower train.batch_size or "
              "--global-batch, or allow ZeRO / checkpointing")
    from .bench.common import print_table
    print_table(rows(shown), COLUMNS)
    for i, r in enumerate(shown, 1):
        cmd = commands(a.config, r["candidate"], cfg, a.nodes, a.devices_per_node, a.set, precision)
        print(f"\n#{i} {r['candidate'].label()}\n  {cmd['launch']}\n  {cmd['sbatch']}")
        if a.explain:
            print(explain(r))
    if a.plot:
        path = plot(results, a.plot, f"{a.config} on {a.nodes}x{a.devices_per_node} {system.name}")
        if path:
            print(f"\n[hvdllm plan] plot: {path}")
    if a.json:
        from .bench.common import write_json
        write_json(a.json, {"config": a.config, "nodes": a.nodes, "devices_per_node": a.devices_per_node,
                            "system": system.name, "precision": precision, "global_batch": gb, "counts": counts,
                            "layouts": [{**{k: v for k, v in r.items() if k not in ("candidate", "memory")},
                                         "candidate": dataclasses.asdict(r["candidate"]),
                                         "memory": {k: v for k, v in r["memory"].items() if k != "stages"}}
                                        for r in results]})
    return 0
