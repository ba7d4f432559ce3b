"""Configuration: a tree of small dataclasses, loaded from TOML and overridden by `--set a.b=c`.

Precedence: `--set` > TOML file > defaults. Each component receives only its own section.
`validate()` collects every problem and raises one ConfigError naming each key to fix.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_type_hints

import tomllib

from .errors import ConfigError


def doc(text, default, **kw):
    """A field with its help text (shown by `hvdllm train --help-config`)."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text}, **kw)


@dataclass
class ModelConfig:
    n_layer: int = doc("transformer blocks", 4)
    n_head: int = doc("attention heads per block (must divide n_embd)", 4)
    n_embd: int = doc("model width", 128)
    block_size: int = doc("context length in tokens", 128)
    vocab_size: int = doc("vocabulary size; 0 takes the tokenizer's", 0)
    vocab_multiple: int = doc("pad the embedding and head tables to a multiple of this many rows, so "
                              "that parallel.tp can split a vocabulary it does not divide (e.g. 128 "
                              "for GPT-2's 50257); the padded ids are masked, never predicted, and "
                              "dropped on export", 1)
    dropout: float = doc("dropout probability (0 keeps runs bit-reproducible); gpt2 only", 0.0)
    family: str = doc("architecture: 'gpt2' (LayerNorm, learned positions, GELU MLP, biases) or 'llama' "
                      "(RMSNorm, rotary positions, SwiGLU MLP, grouped-query attention, no biases); "
                      "parameter names and their Hugging Face keys in hvdllm/params.py", "gpt2")
    n_kv_head: int = doc("llama: key/value heads of grouped-query attention (must divide n_head; "
                         "under parallel.tp, tp must divide it); 0 = n_head", 0)
    ffn_hidden: int = doc("MLP width; 0 = the family's: 4*n_embd (gpt2), 8/3*n_embd rounded up to a "
                          "multiple of 64 (llama)", 0)
    norm_eps: float = doc("epsilon of LayerNorm (gpt2) / RMSNorm (llama)", 1e-5)
    rope_theta: float = doc("llama: base of the rotary position embedding's frequencies", 10000.0)
    tie_embeddings: bool = doc("the output head reuses the token embedding wte (false: its own "
                               "lm_head, as Llama 2/3 8B and larger; true suits small models, as "
                               "Llama 3.2 1B/3B and GPT-2)", True)
    layers: str = doc("a user's model as 'module:function' returning an ordered list of layers (torch "
                      "nn.Modules, or Keras layers / callables for TensorFlow); '' = the built-in GPT", "")
    tp_plan: str = doc("with model.layers and parallel.tp > 1: which Linear / Dense modules split, as "
                       "'pattern=style, ...' with fnmatch patterns over module paths ('1.fc', '4') and "
                       "styles column, row or replicate, e.g. '*.fc=column, *.proj=row' (see "
                       "hvdllm/user_model.py)", "")


@dataclass
class DataConfig:
    corpus: list = doc("text files or folders, JSONL / CSV / Parquet files, saved Hugging Face dataset "
                       "folders (one document a record, hvdllm/data.py) or patterns like 'shards/*.jsonl'; "
                       "empty means the Python standard library's sources", [])
    text_field: str = doc("the field (column) of a JSONL / Parquet / saved-dataset corpus that holds each "
                          "document's text", "text")
    tokenizer: str = doc("'byte' (256 symbols) or 'bpe' (trained locally, cached)", "byte")
    bpe_vocab_size: int = doc("vocabulary size of the BPE tokenizer", 2048)
    val_fraction: float = doc("fraction of tokens held out for validation", 0.05)
    max_bytes: int = doc("cap on corpus bytes read (0 = no cap)", 8_000_000)
    cache_dir: str = doc("where prepared token files are cached ('' = ~/.cache/hvdllm/data)", "")


@dataclass
class ParallelConfig:
    dp: int = doc("data-parallel ranks; 0 = every rank left after pp, tp and role ranks", 0)
    pp: int = doc("pipeline stages", 1)
    tp: int = doc("tensor-parallel ranks", 1)
    microbatches: int = doc("micro-batches per step in a pipeline (train.batch_size must divide)", 1)
    schedule: str = doc("pipeline schedule: 'gpipe', '1f1b' or 'interleaved'", "1f1b")
    virtual_stages: int = doc("model chunks per pipeline rank (the interleaved schedule's v)", 1)
    partition: str = doc("how layers are split over stages: 'uniform', 'params' or 'time'", "params")
    zero: int = doc("ZeRO stage: 0 = replicated AdamW state, 1 = state sharded over the dp group, 2 = "
                    "gradients too (reduce-scattered per unit), 3 = parameters too (gathered per unit)", 0)
    zero_unit: str = doc("what ZeRO-2/3 gathers and reduces at once: 'block' (the embeddings, each "
                         "transformer block, the head)", "block")
    offload: str = doc("ZeRO-2/3: 'optimizer' keeps the master shard and AdamW state on the host "
                       "('none': on the device)", "none")


@dataclass
class AggregationConfig:
    op: str = doc("gradient reduction: 'average', 'sum' or 'adasum'", "average")
    compression: str = doc("wire format for gradients: 'none', 'fp16' or 'bf16'", "none")
    accumulation: int = doc("micro-batches accumulated per optimizer step (one reduction per step)", 1)
    predivide: float = doc("divide gradients by this before the sum and by size/this after "
                           "(Horovod's gradient_predivide_factor; 1 = plain average)", 1.0)
    fusion_threshold_mb: float = doc("Horovod tensor-fusion buffer in MiB (0 = Horovod's default)", 0.0)
    cycle_time_ms: float = doc("Horovod background cycle time in ms (0 = Horovod's default)", 0.0)


@dataclass
class LocalSGDConfig:
    every: int = doc("average parameters every H steps (0 = off: synchronous gradients)", 0)
    outer_lr: float = doc("outer learning rate on the averaged change (1 with momentum 0 = plain "
                          "averaging; DiLoCo uses 0.7)", 1.0)
    outer_momentum: float = doc("outer momentum (DiLoCo: 0.9)", 0.0)
    nesterov: bool = doc("Nesterov form of the outer momentum", True)


@dataclass
class PSConfig:
    servers: int = doc("parameter-server ranks (extra ranks after the trainers; 0 = none)", 0)
    mode: str = doc("'sync' (equals data parallelism), 'async' (apply each push on arrival) or "
                    "'ssp' (bounded staleness)", "sync")
    staleness: int = doc("ssp: no worker runs more than this many steps ahead of the slowest", 2)
    stale_lr: str = doc("async/ssp: a push s updates stale gets lr/(1+s) ('inverse'), "
                        "lr/sqrt(1+s) ('sqrt') or lr ('constant')", "inverse")
    straggler_rank: int = doc("testing/bench aid: this worker's steps are slowed (-1 = none)", -1)
    straggler_factor: float = doc("the straggler's work per step, in gradient passes (2 = twice as slow)", 2.0)


@dataclass
class RolesConfig:
    evaluators: int = doc("ranks that evaluate weight snapshots while the trainers train", 0)
    generators: int = doc("ranks that write samples from the latest snapshot", 0)
    snapshot_every: int = doc("steps between weight snapshots offered to evaluators/generators", 50)
    prompts_file: str = doc("generators answer each line of this file ('' = train.sample_prompt)", "")
    nice: int = doc("CPU priority offset (Unix nice, 0-19) of evaluator and generator processes, so "
                    "they yield to trainers on a shared node (0 = same priority)", 10)


@dataclass
class OptimConfig:
    lr: float = doc("peak learning rate", 1e-3)
    min_lr: float = doc("learning rate at the end of the cosine decay", 1e-4)
    warmup_steps: int = doc("linear warm-up steps", 10)
    weight_decay: float = doc("AdamW decoupled weight decay (matrices and embeddings only)", 0.1)
    beta1: float = doc("AdamW beta1", 0.9)
    beta2: float = doc("AdamW beta2", 0.95)
    eps: float = doc("AdamW epsilon", 1e-8)
    grad_clip: float = doc("global gradient-norm clip; 0 disables", 1.0)


@dataclass
class TrainConfig:
    steps: int = doc("optimizer steps", 200)
    batch_size: int = doc("sequences per rank per step (the micro-batch)", 16)
    seed: int = doc("seed for weights, sampling and dropout", 1337)
    out_dir: str = doc("output folder: config, metrics.jsonl, plot, checkpoints, samples", "runs/default")
    log_every: int = doc("steps between metric records", 1)
    eval_every: int = doc("steps between evaluations (0 = only at the end)", 50)
    eval_batches: int = doc("validation batches per rank per evaluation", 4)
    checkpoint_every: int = doc("steps between checkpoints (0 = only at the end)", 100)
    keep_checkpoints: int = doc("checkpoints kept on disk", 2)
    resume: bool = doc("resume from the latest intact checkpoint in out_dir (a damaged one is skipped, "
                       "with a message)", False)
    init_from: str = doc("start from this model's weights (fresh optimizer, step 0): a Hugging Face "
                         "model folder (config.json, model.safetensors or its index, tokenizer.json) or "
                         "an hvdllm run / checkpoint folder; its model settings replace model.* (not "
                         "dropout, tp_plan) and its tokenizer tokenizes data.corpus; train.resume with "
                         "a checkpoint in out_dir wins ('' = random init)", "")
    resume_allow: list = doc(
        "settings a resume may find changed since the checkpoint; any other change makes the resume "
        "refuse, naming it. Checked: model.* (not tp_plan), optim.*, train.seed, train.batch_size (the "
        "global batch dp x train.batch_size x aggregation.accumulation, which fixes the sample order), "
        "data.tokenizer (the tokenizer stored with the checkpoint) and data.corpus (the prepared tokens: "
        "corpus files, data.max_bytes, data.val_fraction). The layout (parallel.*, backend) and "
        "train.steps may change freely. List keys or whole sections, e.g. [\"optim.lr\", "
        "\"train.batch_size\"] or [\"optim\"]; the run prints each change it allows", [])
    progress: bool = doc("show a progress bar on rank 0", True)
    tensorboard: bool = doc("also write metrics.jsonl's records as TensorBoard scalars under "
                            "out_dir/tensorboard (the tensorboard package; no TensorFlow needed)", False)
    plot: bool = doc("draw loss.png from metrics.jsonl at the end (rank 0)", True)
    device: str = doc("where each rank computes: 'auto' (cuda:<local rank> when the framework sees a GPU, "
                      "else the CPU), 'cpu', or 'cuda' (an error where no GPU is visible); one GPU per "
                      "rank, so more ranks on a node than GPUs is an error (hvdllm/device.py)", "auto")
    threads: int = doc("compute threads per rank (0 = cores / ranks on this node)", 0)
    precision: str = doc("compute precision: 'fp32', or 'bf16' (matmuls and attention in bfloat16 "
                         "under torch.autocast / TF casts, float32 parameters, gradients, AdamW state, "
                         "norms, softmax and loss; runs on CPU too), or 'fp16' (the same in float16, "
                         "with dynamic loss scaling: a step whose gradients overflow is skipped on "
                         "every rank and the scale halves; dp, tp, pp, ZeRO-1/2/3, a model.layers list, "
                         "parameter servers, and local SGD, where a rank skips its own; hvdllm/loss_scale.py)", "fp32")
    activation_checkpointing: str = doc(
        "recompute in backward instead of keeping: 'none'; 'full' (each transformer block keeps only "
        "its input and is run again in backward); 'selective' (each block's attention core, QK^T, "
        "softmax and the weighted sum, whose activations grow with the context squared, is run again; "
        "the rest is kept). The built-in GPT, either backend, under dp, ZeRO-1, pp and tp", "none")
    compile: bool = doc(
        "compile the training step: torch.compile of each transformer block (inductor; on CPU it "
        "needs a C++ compiler), TensorFlow's XLA (jit_compile) on the loss-and-gradients function, "
        "Horovod's collectives outside it (torch: a graph break at each tp collective; TensorFlow "
        "pipeline stages: each chunk's forward and its gradient); the built-in GPT, not with "
        "model.layers; TensorFlow also not with parallel.tp > 1 or parallel.zero >= 2", False)
    prefetch: int = doc("batches made ahead on a background thread (pinned memory on CUDA); 0 = "
                        "each batch made in the loop", 2)
    sample_tokens: int = doc("tokens generated as a sample at the end (0 = none)", 200)
    sample_prompt: str = doc("prompt for the final sample", "def ")
    step_timeout: float = doc("seconds a step (or evaluation, checkpoint) may take before the job is "
                              "ended as hung", 600.0)
    stop_signal: str = doc("on this signal (Slurm: #SBATCH --signal=USR1@120, scancel --signal=USR1) "
                           "stop at a step boundary with a checkpoint, exit 75; 'none' = ignore it", "USR1")
    stop_check_s: float = doc("about this many seconds between the ranks' checks for that signal", 5.0)
    elastic: bool = doc("Horovod elastic mode under `horovodrun --gloo --min-np/--max-np` (hvdllm launch "
                        "--elastic): a lost worker is dropped and the rest continue from the last "
                        "in-memory commit, a joining worker gets it; data parallelism only "
                        "(hvdllm/elastic.py)", False)
    elastic_commit_every: int = doc("train.elastic: steps between in-memory commits of the state (a lost "
                                    "worker costs at most this many steps)", 10)
    elastic_global_batch: int = doc("train.elastic: sequences per step over all workers, kept as the world "
                                    "size changes (each worker takes global/size, so every size the job runs "
                                    "at must divide it; train.batch_size is then derived); 0 = "
                                    "train.batch_size per worker, the global batch following the size", 0)
    elastic_join_timeout: float = doc("train.elastic: from the first resize on, the seconds Horovod's "
                                      "rendezvous waits for a joining worker to start (its imports and "
                                      "init), and so also a collective for a lost peer (Gloo has one "
                                      "timeout, HOROVOD_GLOO_TIMEOUT_SECONDS, which rules until then)", 120.0)
    fail_at_step: int = doc("testing aid: raise on fail_rank at this step (-1 = never)", -1)
    fail_rank: int = doc("testing aid: the rank that raises at fail_at_step", 0)
    fail_mode: str = doc("testing aid: how fail_rank fails at fail_at_step: 'raise' an error (every rank "
                         "ends, naming it), 'kill' itself with SIGKILL (a lost process: no message, no "
                         "cleanup) or 'overflow' its fp16 gradients (train.precision = 'fp16': the step "
                         "is skipped everywhere); either only on a launch's first attempt ($HVDLLM_ATTEMPT, which "
                         "`hvdllm launch --max-restarts` sets), so a restarted job runs past it", "raise")
    step_sleep_s: float = doc("testing aid: seconds every rank sleeps after each step, outside its timing "
                              "(stretches a drill so that what happens outside the job, an elastic host's "
                              "return after its cooldown, lands mid-run); 0 = none", 0.0)


@dataclass
class TaskConfig:
    kind: str = doc("what the model learns: 'lm' (next-token prediction on data.corpus) or 'classify' (a "
                    "label per text, from task.train_file; hvdllm/task.py)", "lm")
    train_file: str = doc("classify: the labelled training data: JSONL, CSV / TSV, Parquet or a saved "
                          "Hugging Face dataset folder (hvdllm/labelled.py)", "")
    validation_file: str = doc("classify: the labelled validation data, in those formats ('' = hold out "
                               "data.val_fraction of task.train_file)", "")
    text_field: str = doc("classify: the field (column) that holds the text", "text")
    label_field: str = doc("classify: the field (column) that holds the label", "label")
    num_labels: int = doc("classify: classes (0 = the labels found in task.train_file)", 0)
    labels: list = doc("classify: the label names in id order ([] = from task.train_file: integer labels "
                       "are the ids, strings sorted); the run records them here and in labels.json", [])
    pooling: str = doc("classify: the head reads the final-norm hidden state of the last real token "
                       "('last') or its mean over the real tokens ('mean')", "last")
    class_weights: list = doc("classify: a loss weight per label, in id order ([] = all 1), e.g. for "
                              "imbalanced classes", [])


@dataclass
class FinetuneConfig:
    # A section of its own, not task.*: LoRA applies to either task.kind (a language model or a
    # classifier), as train.init_from does (hvdllm/lora.py).
    lora_rank: int = doc("LoRA: the adapters' rank r (0 = off: every parameter trains); the base weights "
                         "from train.init_from stay frozen and only the adapters (and a classifier's "
                         "head) train, are reduced and are stored (hvdllm/lora.py)", 0)
    lora_alpha: float = doc("LoRA: the adapters' output is scaled by lora_alpha / lora_rank", 16.0)
    lora_targets: list = doc("LoRA: patterns over the blocks' linear weights, e.g. 'attn.c_attn', 'mlp.*', "
                             "'h.0.attn.q' ([] = the family's default, PEFT's: gpt2 'attn.c_attn', "
                             "llama 'attn.q' and 'attn.v')", [])
    lora_dropout: float = doc("LoRA: dropout probability on the adapters' input in training, as PEFT's "
                              "lora_dropout (0 = none: the adapters fold into the weight, one matmul; "
                              "> 0 runs them beside it); evaluation and the merged model never drop", 0.0)


@dataclass
class Config:
    backend: str = doc("'torch' or 'tensorflow'", "torch")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    localsgd: LocalSGDConfig = field(default_factory=LocalSGDConfig)
    ps: PSConfig = field(default_factory=PSConfig)
    roles: RolesConfig = field(default_factory=RolesConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


CHOICES = {
    "backend": ("torch", "tensorflow"),
    "model.family": ("gpt2", "llama"),
    "data.tokenizer": ("byte", "bpe"),
    "aggregation.op": ("average", "sum", "adasum"),
    "parallel.schedule": ("gpipe", "1f1b", "interleaved"),
    "parallel.partition": ("uniform", "params", "time"),
    "ps.mode": ("sync", "async", "ssp"),
    "ps.stale_lr": ("inverse", "sqrt", "constant"),
    "train.stop_signal": ("USR1", "USR2", "none"),
    "train.fail_mode": ("raise", "kill", "overflow"),
    "aggregation.compression": ("none", "fp16", "bf16"),
    "train.precision": ("fp32", "bf16", "fp16"),
    "train.device": ("auto", "cpu", "cuda"),
    "parallel.zero_unit": ("block",),
    "parallel.offload": ("none", "optimizer"),
}


# ---------------------------------------------------------------------------------------------
# Loading: TOML + overrides into the dataclass tree, collecting problems rather than stopping.

def _parse_value(text: str) -> Any:
    """`--set` values are TOML literals (1, 0.5, true, [..], "s"); anything else is a string."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def _coerce(value, typ, key, problems):
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is list and isinstance(value, str):
        return [value]
    ok = isinstance(value, typ) and not (typ is int and isinstance(value, bool))
    if not ok:
        problems.append(f"{key}: expected {typ.__name__}, got {value!r}")
        return None
    return value


# keys users reach for in the wrong section (the issue texts and other tools spell them so)
ELSEWHERE = {"parallel.servers": "ps.servers", "parallel.evaluators": "roles.evaluators",
             "parallel.generators": "roles.generators", "parallel.staleness": "ps.staleness",
             "parallel.accumulation": "aggregation.accumulation", "train.lr": "optim.lr",
             "parallel.local_sgd": "localsgd.every", "local_sgd": "localsgd",
             "train.grad_clip": "optim.grad_clip"}


def _fill(obj, values: dict, prefix: str, problems: list):
    hints = get_type_hints(type(obj))
    names = {f.name for f in dataclasses.fields(obj)}
    for name, value in values.items():
        key = f"{prefix}{name}"
        if name not in names:
            moved = f"; did you mean {ELSEWHERE[key]}?" if key in ELSEWHERE else ""
            problems.append(f"{key}: unknown key (known: {', '.join(sorted(names))}){moved}")
            continue
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            if not isinstance(value, dict):
                problems.append(f"{key}: expected a table of settings, got {value!r}")
            else:
                _fill(getattr(obj, name), value, key + ".", problems)
            continue
        coerced = _coerce(value, typ, key, problems)
        if coerced is not None:
            setattr(obj, name, coerced)


def _nest(overrides: list[str], problems: list) -> dict:
    tree: dict = {}
    for item in overrides:
        if "=" not in item:
            problems.append(f"--set {item!r}: expected key=value, e.g. --set train.steps=100")
            continue
        key, text = item.split("=", 1)
        node = tree
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            node = node.setdefault(part, {})
            if not isinstance(node, dict):   # e.g. --set model=3 --set model.n_layer=2
                table = ".".join(parts[:i + 1])
                problems.append(f"--set {item!r}: {table} is a table of settings, but another --set "
                                f"gives it the value {node!r}; drop that --set {table}=...")
                break
        else:
            if isinstance(node.get(parts[-1]), dict):   # --set model.n_layer=2 --set model=3
                problems.append(f"--set {item!r}: {key.strip()} is a table of settings; set its keys, "
                                f"e.g. --set {key.strip()}.<key>=value")
                continue
            node[parts[-1]] = _parse_value(text.strip())
    return tree


def _merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load(path: str | Path | None = None, overrides: list[str] = ()) -> Config:
    """Build a Config from an optional TOML file and `key=value` overrides (not yet validated)."""
    problems: list[str] = []
    values: dict = {}
    if path is not None:
        try:
            values = tomllib.loads(Path(path).read_bytes().decode("utf-8"))
        except FileNotFoundError:
            problems.append(f"config file {path}: not found")
        except IsADirectoryError:
            problems.append(f"config file {path}: is a folder; pass the TOML file inside it")
        except PermissionError as e:
            problems.append(f"config file {path}: cannot be read ({e.strerror}); check its permissions")
        except OSError as e:
            problems.append(f"config file {path}: cannot be read ({e.strerror or e})")
        except UnicodeDecodeError as e:
            problems.append(f"config file {path}: not UTF-8 text (byte {e.start}: {e.reason}); "
                            f"save it as UTF-8")
        except tomllib.TOMLDecodeError as e:
            problems.append(f"config file {path}: not valid TOML ({e})")
    values = _merge(values, _nest(list(overrides), problems))
    cfg = Config()
    _fill(cfg, values, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


def from_dict(values: dict, overrides: list[str] = ()) -> Config:
    """A Config from a `to_dict()` tree (a checkpoint's stored config) and `key=value` overrides."""
    problems: list[str] = []
    values = _merge(values, _nest(list(overrides), problems))
    cfg = Config()
    _fill(cfg, values, "", problems)
    if problems:
        raise ConfigError(problems)
    return cfg


# ---------------------------------------------------------------------------------------------
# Validation: every rule, every problem, one message.

def _get(cfg, key):
    obj = cfg
    for part in key.split("."):
        obj = getattr(obj, part)
    return obj


def validate(cfg: Config, world_size: int | None = None) -> Config:
    """Check every rule; raise one ConfigError listing all problems. Returns cfg for chaining."""
    p: list[str] = []
    for key, allowed in CHOICES.items():
        if _get(cfg, key) not in allowed:
            p.append(f"{key}: {_get(cfg, key)!r} is not one of {', '.join(map(repr, allowed))}")
    positive = ["model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_multiple",
                "parallel.pp",
                "parallel.tp", "train.batch_size", "train.log_every", "train.keep_checkpoints",
                "train.steps"]
    for key in positive:
        if _get(cfg, key) < 1:
            p.append(f"{key}: must be >= 1, got {_get(cfg, key)}")
    for key in ["ps.servers", "ps.staleness", "roles.evaluators", "roles.generators", "train.eval_every",
                "train.eval_batches", "train.checkpoint_every",
                "train.threads", "train.sample_tokens", "parallel.dp", "model.vocab_size",
                "data.max_bytes", "optim.warmup_steps", "optim.grad_clip", "optim.weight_decay",
                "aggregation.fusion_threshold_mb", "aggregation.cycle_time_ms"]:
        if not _get(cfg, key) >= 0:   # `not >=`: a nan fails too
            p.append(f"{key}: must be >= 0, got {_get(cfg, key)}")
    for key in ("train.stop_check_s", "train.step_timeout", "optim.eps"):
        if not 0 < _get(cfg, key) < math.inf:
            p.append(f"{key}: must be a finite number > 0, got {_get(cfg, key)}")
    p.extend(_input_problems(cfg, world_size))
    m = cfg.model
    if m.n_head >= 1 and m.n_embd % m.n_head:
        p.append(f"model.n_embd: {m.n_embd} is not divisible by model.n_head={m.n_head}")
    if not 0.0 <= m.dropout < 1.0:
        p.append(f"model.dropout: must be in [0, 1), got {m.dropout}")
    p.extend(_family_problems(m))
    if not 0.0 < cfg.data.val_fraction < 0.5:
        p.append(f"data.val_fraction: must be in (0, 0.5), got {cfg.data.val_fraction}")
    if cfg.data.tokenizer == "bpe" and cfg.data.bpe_vocab_size < 260:
        p.append(f"data.bpe_vocab_size: must be >= 260, got {cfg.data.bpe_vocab_size}")
    o = cfg.optim
    if o.lr <= 0 or o.min_lr < 0 or o.min_lr > o.lr:
        p.append(f"optim.lr / optim.min_lr: need 0 <= min_lr <= lr and lr > 0, got lr={o.lr} min_lr={o.min_lr}")
    for key in ("optim.beta1", "optim.beta2"):
        if not 0.0 <= _get(cfg, key) < 1.0:
            p.append(f"{key}: must be in [0, 1), got {_get(cfg, key)}")
    from .user_model import problems as layers_problems  # model.layers (a user's layer list)
    p.extend(layers_problems(cfg))
    p.extend(_strategy_problems(cfg))
    from .elastic import problems as elastic_problems  # train.elastic's rules (hvdllm/elastic.py)
    p.extend(elastic_problems(cfg, world_size))
    if cfg.train.tensorboard:
        from .events import available
        if not available():
            p.append("train.tensorboard: needs the tensorboard package (pip install tensorboard, or make env); "
                     "or set train.tensorboard = false")
    p.extend(_ps_roles_problems(cfg, world_size))
    from .task import problems as task_problems  # task.kind's rules (hvdllm/task.py)
    p.extend(task_problems(cfg))
    from .lora import problems as lora_problems  # finetune.lora_* (hvdllm/lora.py)
    p.extend(lora_problems(cfg))
    if not cfg.train.out_dir:
        p.append("train.out_dir: must name a folder")
    if world_size is not None:
        p.extend(_grid_problems(cfg, world_size))
    if p:
        raise ConfigError(p)
    return cfg


# What a resume compares between the checkpoint and this run (checkpoint.check_resume); each may be
# listed in train.resume_allow (or its section). train.batch_size stands for the global batch,
# data.tokenizer for the stored tokenizer and data.corpus for the prepared tokens.
RESUME_CHECKED = ("model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "model.vocab_size",
                  "model.vocab_multiple",
                  "model.dropout", "model.layers", "model.family", "model.n_kv_head", "model.ffn_hidden",
                  "model.norm_eps", "model.rope_theta", "model.tie_embeddings", "optim.lr", "optim.min_lr",
                  "optim.warmup_steps",
                  "optim.weight_decay", "optim.beta1", "optim.beta2", "optim.eps", "optim.grad_clip",
                  "train.seed", "train.batch_size", "data.tokenizer", "data.corpus",
                  "task.kind", "task.num_labels", "task.labels", "task.pooling", "task.class_weights",
                  "finetune.lora_rank", "finetune.lora_alpha", "finetune.lora_targets", "finetune.lora_dropout")


def resume_allowed(cfg: Config, key: str) -> bool:
    allow = cfg.train.resume_allow
    return key in allow or key.split(".")[0] in allow


def vocab_problems(cfg: Config, tokenizer_vocab: int) -> list[str]:
    """model.vocab_size must hold every id the tokenizer emits (0 = take the tokenizer's): validate
    checks the byte tokenizer's 256, the trainer a trained BPE's size once the corpus is prepared."""
    v = cfg.model.vocab_size
    if 0 < v < tokenizer_vocab:
        return [f"model.vocab_size: {v} is smaller than the {cfg.data.tokenizer} tokenizer's vocabulary "
                f"of {tokenizer_vocab}; token ids up to {tokenizer_vocab - 1} must fit: set "
                f"model.vocab_size=0 (the tokenizer's) or >= {tokenizer_vocab}"]
    return []


def _family_problems(m: ModelConfig) -> list[str]:
    """The architecture's own rules (model.family): what grouped-query attention, rotary
    embeddings and the MLP width need, and the settings only llama reads."""
    p = []
    llama = m.family == "llama"
    if m.n_kv_head < 0 or m.ffn_hidden < 0:
        p.extend(f"model.{k}: must be >= 0 (0 = the default), got {getattr(m, k)}"
                 for k in ("n_kv_head", "ffn_hidden") if getattr(m, k) < 0)
    if not 0 < m.norm_eps < 1:
        p.append(f"model.norm_eps: must be in (0, 1), got {m.norm_eps}")
    if not llama:
        for key, bad in (("n_kv_head", m.n_kv_head not in (0, m.n_head)), ("rope_theta", m.rope_theta != 10000.0)):
            if bad:
                p.append(f"model.{key}: only model.family = 'llama' uses it (gpt2 has multi-head "
                         f"attention and learned positions); remove it or set model.family = 'llama'")
        return p
    if m.n_head >= 1 and m.n_kv_head > 0 and m.n_head % m.n_kv_head:
        p.append(f"model.n_kv_head: {m.n_kv_head} does not divide model.n_head={m.n_head} (each key/value "
                 f"head serves n_head / n_kv_head query heads)")
    if m.n_head >= 1 and not m.n_embd % m.n_head and (m.n_embd // m.n_head) % 2:
        p.append(f"model.n_head: the head dimension n_embd / n_head = {m.n_embd // m.n_head} must be even "
                 f"for rotary embeddings (each frequency rotates a pair of features)")
    if not 0 < m.rope_theta < math.inf:
        p.append(f"model.rope_theta: must be a finite number > 0, got {m.rope_theta}")
    if m.dropout:
        p.append("model.dropout: llama has no dropout (as Hugging Face's Llama); set it to 0")
    if m.layers:
        p.append("model.family: applies to the built-in model; model.layers trains a user's layer list")
    return p


def _input_problems(cfg: Config, world_size: int | None) -> list[str]:
    """Values that would otherwise crash deep inside a run, or pass silently."""
    p, t = [], cfg.train
    bad = [c for c in cfg.data.corpus if not isinstance(c, str) or not c]
    if bad:
        p.append(f"data.corpus: entries must be paths as non-empty strings, got {bad[0]!r}; e.g. "
                 f"data.corpus = [\"texts/\", \"more.txt\"]")
    if not isinstance(cfg.data.text_field, str) or not cfg.data.text_field:
        p.append(f"data.text_field: {cfg.data.text_field!r} is not a field name; set it to the field that "
                 f"holds the text in the corpus's records, e.g. data.text_field = \"text\"")
    for entry in t.resume_allow:
        if not isinstance(entry, str) or not (entry in RESUME_CHECKED or
                                              entry in {k.split(".")[0] for k in RESUME_CHECKED}):
            p.append(f"train.resume_allow: {entry!r} is not a setting a resume checks; those are "
                     f"{', '.join(RESUME_CHECKED)} (or a whole section: model, optim, train, data)")
    if cfg.data.tokenizer == "byte":   # BPE's size is known once trained (the trainer checks it then)
        p.extend(vocab_problems(cfg, 256))
    if t.fail_rank < 0 or (world_size is not None and t.fail_rank >= world_size):
        upto = f"0..{world_size - 1}" if world_size is not None else ">= 0"
        p.append(f"train.fail_rank: {t.fail_rank} is not a rank of this job (ranks {upto})")
    if not t.step_sleep_s >= 0:
        p.append(f"train.step_sleep_s: must be >= 0 seconds, got {t.step_sleep_s}")
    if t.out_dir:
        out = Path(t.out_dir)
        for q in (out, *out.parents):
            if q.exists():
                if not q.is_dir():
                    p.append(f"train.out_dir: {q} is a file, not a folder; choose another "
                             f"train.out_dir (or move that file)")
                break
    return p


def _compile_problems(cfg: Config) -> list[str]:
    """train.compile where it is not wired yet: a user's layer list (its modules are the user's);
    in TensorFlow ZeRO-2/3 beside tp or inside pipeline stages (a unit's forward there holds
    Horovod's ops, which have no XLA kernels, or is the stage's, not compiled per unit yet).
    torch compiles each block beside tp (a graph break at each collective) and ZeRO-2/3;
    TensorFlow compiles each ZeRO-2/3 unit's forward, the pieces of each block between its tp
    collectives, and each pipeline chunk's forward and its gradient."""
    if not cfg.train.compile:
        return []
    tf, sharded = cfg.backend == "tensorflow", cfg.parallel.zero >= 2
    other = [k for k, on in (("model.layers", cfg.model.layers),
                             ("parallel.zero with parallel.tp", tf and sharded and cfg.parallel.tp > 1),
                             ("parallel.zero with parallel.pp", tf and sharded and cfg.parallel.pp > 1)) if on]
    if not other:
        return []
    where = " in TensorFlow" if tf and other != ["model.layers"] else ""
    fix = " or use the torch backend" if where else ""
    return [f"train.compile: not wired with {', '.join(other)}{where} yet; set train.compile = false there{fix}"]


def _strategy_problems(cfg: Config) -> list[str]:
    p, a, ls = [], cfg.aggregation, cfg.localsgd
    ac = cfg.train.activation_checkpointing
    if ac not in ("none", "full", "selective"):
        p.append(f"train.activation_checkpointing: must be 'none', 'full' or 'selective', got {ac!r}")
    elif ac != "none" and cfg.model.layers:
        p.append("train.activation_checkpointing: applies to the built-in GPT; a model.layers list "
                 "can checkpoint inside its own modules (set it to 'none')")
    elif ac != "none" and cfg.backend == "tensorflow" and cfg.model.dropout > 0:
        p.append("train.activation_checkpointing: TensorFlow's recomputation draws new dropout masks "
                 "(its generator is stateful); set model.dropout = 0 or use the torch backend")
    elif ac == "full" and cfg.backend == "tensorflow" and cfg.finetune.lora_dropout:
        # 'selective' recomputes only the attention core, where no adapter sits
        p.append("train.activation_checkpointing: TensorFlow's recomputation of a whole block draws new "
                 "finetune.lora_dropout masks (its generator is stateful); set finetune.lora_dropout = 0, "
                 "use 'selective' or the torch backend")
    p.extend(_compile_problems(cfg))
    if cfg.train.prefetch < 0:
        p.append(f"train.prefetch: must be >= 0 (0 = no background batches), got {cfg.train.prefetch}")
    if a.accumulation < 1:
        p.append(f"aggregation.accumulation: must be >= 1, got {a.accumulation}")
    if a.predivide <= 0:
        p.append(f"aggregation.predivide: must be > 0, got {a.predivide}")
    if a.predivide != 1.0 and a.op != "average":
        p.append("aggregation.predivide: only applies with aggregation.op = 'average'")
    if cfg.parallel.zero not in (0, 1, 2, 3):
        p.append(f"parallel.zero: must be 0, 1, 2 or 3, got {cfg.parallel.zero}")
    if cfg.parallel.zero and a.op != "average":
        p.append("parallel.zero: ZeRO reduce-scatters averaged gradients; set aggregation.op = 'average'")
    p.extend(_zero_sharded_problems(cfg))
    if ls.every < 0:
        p.append(f"localsgd.every: must be >= 0, got {ls.every}")
    if ls.every and cfg.parallel.zero:
        p.append("localsgd.every: local SGD keeps a full optimizer per rank; set parallel.zero = 0")
    if ls.every and cfg.train.checkpoint_every % ls.every:
        p.append(f"train.checkpoint_every: must be a multiple of localsgd.every={ls.every} so a "
                 f"checkpoint holds the averaged model")
    if ls.outer_lr <= 0 or not 0 <= ls.outer_momentum < 1:
        p.append("localsgd.outer_lr / localsgd.outer_momentum: need outer_lr > 0 and 0 <= momentum < 1")
    p.extend(_pipeline_problems(cfg))
    return p


def _zero_sharded_problems(cfg: Config) -> list[str]:
    """ZeRO-2/3 (strategies/zero_sharded.py) runs the built-in GPT's layers as units over one dp
    group; model.layers, ps.servers and localsgd.every are refused where they are checked."""
    par, p = cfg.parallel, []
    if par.offload != "none" and par.zero < 2:
        p.append("parallel.offload: offloads ZeRO-2/3's sharded optimizer; set parallel.zero = 2 or 3")
    return p


def _pipeline_problems(cfg: Config) -> list[str]:
    par, p = cfg.parallel, []
    if par.microbatches < 1 or par.virtual_stages < 1:
        return ["parallel.microbatches / parallel.virtual_stages: must be >= 1"]
    if cfg.train.batch_size % par.microbatches:
        p.append(f"parallel.microbatches: {par.microbatches} does not divide train.batch_size="
                 f"{cfg.train.batch_size}")
    if par.schedule == "interleaved":
        if par.pp < 2 or par.virtual_stages < 2:
            p.append("parallel.schedule: 'interleaved' needs parallel.pp >= 2 and parallel.virtual_stages >= 2")
        elif par.microbatches % par.pp:
            p.append(f"parallel.microbatches: the interleaved schedule needs a multiple of parallel.pp="
                     f"{par.pp}, got {par.microbatches}")
    elif par.virtual_stages != 1:
        p.append("parallel.virtual_stages: only the 'interleaved' schedule uses more than 1")
    if par.tp > 1:
        from .strategies.tensor_parallel import problems
        if not cfg.model.layers:   # the built-in GPT's split; a user's list has model.tp_plan
            p.extend(problems(cfg.model, par.tp))
        if cfg.localsgd.every:
            p.append("localsgd.every: not combinable with parallel.tp > 1 yet")
    if par.pp > 1:
        for key, bad in (("localsgd.every", cfg.localsgd.every),
                         ("aggregation.accumulation", cfg.aggregation.accumulation - 1)):
            if bad:
                p.append(f"{key}: not combinable with parallel.pp > 1 yet (pipelines accumulate "
                         f"over parallel.microbatches)")
    return p


def _ps_roles_problems(cfg: Config, world_size: int | None) -> list[str]:
    """Parameter servers (strategies/param_server.py) and task separation (strategies/roles.py).

    Servers hold the whole optimizer and take plain float32 gradients from workers that each hold
    the whole model: so no pipeline / tensor parallelism, ZeRO, local SGD or other reduction op.
    Evaluators and generators take snapshots that trainer rank 0 sends (gathered from pipeline
    stages and tensor-parallel slices when it does not hold the whole model): any layout works.
    """
    p, ps, ro, par, agg = [], cfg.ps, cfg.roles, cfg.parallel, cfg.aggregation
    if ps.servers:
        why = "(parameter servers hold the optimizer; workers push whole float32 gradients)"
        for key, bad in (("parallel.pp", par.pp != 1), ("parallel.tp", par.tp != 1),
                         ("parallel.zero", par.zero), ("localsgd.every", cfg.localsgd.every),
                         ("aggregation.op", agg.op != "average"),
                         ("aggregation.compression", agg.compression != "none"),
                         ("aggregation.predivide", agg.predivide != 1.0)):
            if bad:
                p.append(f"{key}: not combinable with ps.servers > 0 {why}")
    else:
        if ps.mode != "sync":
            p.append(f"ps.mode: {ps.mode!r} needs parameter servers; set ps.servers >= 1")
        if ps.straggler_rank >= 0:
            p.append("ps.straggler_rank: slows a parameter-server worker; set ps.servers >= 1")
    if ps.stale_lr != "inverse" and ps.mode == "sync":
        p.append("ps.stale_lr: only ps.mode 'async' or 'ssp' scales the lr by staleness (sync pushes "
                 "are never stale); remove it or set ps.mode")
    if ps.straggler_factor < 1.0:
        p.append(f"ps.straggler_factor: must be >= 1, got {ps.straggler_factor}")
    if world_size is not None and ps.straggler_rank >= max(1, world_size - extra_ranks(cfg)):
        p.append(f"ps.straggler_rank: {ps.straggler_rank} is not a trainer rank (trainers are ranks "
                 f"0..{world_size - extra_ranks(cfg) - 1})")
    if (ro.evaluators or ro.generators) and ro.snapshot_every < 1:
        p.append(f"roles.snapshot_every: must be >= 1, got {ro.snapshot_every}")
    if not 0 <= ro.nice <= 19:
        p.append(f"roles.nice: must be in 0..19, got {ro.nice}")
    if ro.generators and cfg.train.sample_tokens < 1:
        p.append("train.sample_tokens: generators write samples of this length; set it >= 1")
    if ro.prompts_file and not Path(ro.prompts_file).is_file():
        p.append(f"roles.prompts_file: {ro.prompts_file} is not a file")
    return p


def extra_ranks(cfg: Config) -> int:
    """Ranks that are not trainers: parameter servers, evaluators, generators."""
    return cfg.ps.servers + cfg.roles.evaluators + cfg.roles.generators


def _grid_problems(cfg: Config, world_size: int) -> list[str]:
    par = cfg.parallel
    extra = extra_ranks(cfg)
    if extra >= world_size:
        return [f"ps.servers / roles.evaluators / roles.generators: {extra} role ranks leave no trainer "
                f"among the {world_size} launched ranks"]
    world_size -= extra
    model_ranks = par.pp * par.tp
    if par.dp == 0:
        if model_ranks >= 1 and world_size % model_ranks:
            return [f"parallel.dp: {world_size} ranks cannot be split into pp*tp={model_ranks}-rank groups"]
        return []
    if par.dp * model_ranks != world_size:
        return [f"parallel.dp: dp*pp*tp = {par.dp}*{par.pp}*{par.tp} = {par.dp * model_ranks} "
                f"but {world_size} trainer ranks were launched (set parallel.dp=0 to use all ranks)"]
    return []


def describe() -> list[tuple[str, Any, str]]:
    """(key, default, help) for every setting, for `--help-config`."""
    rows = []

    def walk(obj, prefix):
        for f in dataclasses.fields(obj):
            val = getattr(obj, f.name)
            if dataclasses.is_dataclass(val):
                walk(val, prefix + f.name + ".")
            else:
                rows.append((prefix + f.name, val, f.metadata.get("help", "")))
    walk(Config(), "")
    return rows


def to_toml(cfg: Config) -> str:
    """Serialise (for the run's resolved config.toml)."""
    def lit(v):
        if isinstance(v, bool):
            return "true" if v else "false"
        if isinstance(v, str):
            return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
        if isinstance(v, list):
            return "[" + ", ".join(lit(x) for x in v) + "]"
        return repr(v)
    d = cfg.to_dict()
    lines = [f"backend = {lit(d.pop('backend'))}"]
    for section, values in d.items():
        lines.append(f"\n[{section}]")
        lines.extend(f"{k} = {lit(v)}" for k, v in values.items())
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Resolution: derived values filled in once, then the settings are frozen.

def resolve(cfg: Config, world_size: int | None, vocab_size: int) -> Config:
    """The run's final settings: model.vocab_size = 0 becomes the tokenizer's `vocab_size`
    (then validated again: tp must divide it), and the result is frozen, so no component can
    change a setting after the engine exists. Returns a copy; `cfg` itself is unchanged.
    A model.vocab_size too small for the tokenizer (a trained BPE's size is known only here) is
    a ConfigError, raised before anything is written."""
    if vocab_problems(cfg, vocab_size):
        raise ConfigError(vocab_problems(cfg, vocab_size))
    if cfg.model.vocab_size == 0:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=vocab_size))
        validate(cfg, world_size)
    from .elastic import sized  # train.elastic_global_batch: the per-worker batch for this size
    cfg = sized(cfg, world_size) if world_size else cfg
    sections = {f.name: dataclasses.replace(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)
                if dataclasses.is_dataclass(getattr(cfg, f.name))}
    cfg = dataclasses.replace(cfg, **sections)
    for obj in (cfg, *sections.values()):
        object.__setattr__(obj, "_frozen", True)
    return cfg


def _frozen_setattr(self, name, value):
    if getattr(self, "_frozen", False):
        raise AttributeError(f"the resolved configuration is frozen: {type(self).__name__}.{name} cannot "
                             f"change during a run (set it in the config file or with --set)")
    object.__setattr__(self, name, value)


for _cls in (ModelConfig, DataConfig, ParallelConfig, AggregationConfig, LocalSGDConfig, PSConfig,
             RolesConfig, OptimConfig, TrainConfig, TaskConfig, Config):
    _cls.__setattr__ = _frozen_setattr
