"""Hugging Face checkpoints in and out: config.json <-> hvdllm's model settings, parameter names
<-> Hugging Face names (with the transposes), safetensors read lazily, and the tokenizer.

Import (`hvdllm convert --from-hf DIR OUT`, `train.init_from = DIR`): DIR is a local model folder
as `save_pretrained` writes it: config.json, model.safetensors or model.safetensors.index.json
with its shards, and tokenizer.json. `HFWeights` is a lazy {hvdllm name: whole array} mapping
with the `slice(name, placement)` and `shapes` a sharded checkpoint has (checkpoint.Sharded), so
the engines' loaders read through it exactly as they read a checkpoint under any layout: each
rank asks only for the slices it holds (placement.py), and each slice is read from its file with
safetensors' `get_slice` (nothing else of the tensor is read; nothing is materialised whole).

Export (`hvdllm convert RUN_DIR --to-hf DIR`): config.json, model.safetensors (and the
tokenizer as tokenizer.json + tokenizer_config.json) that transformers' `from_pretrained` loads.

The tables, per family:

  gpt2 (GPT2LMHeadModel): hvdllm's names are GPT-2's own under `transformer.`; GPT-2's Conv1D
       weights are (in, out) as hvdllm's are, so nothing is transposed; the head is tied to wte.
  llama (LlamaForCausalLM): the table in hvdllm/params.py (`hf_llama_names`): nn.Linear weights
       are (out, in), so they are transposed; an untied head is `lm_head`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from . import placement as placement_mod
from .errors import CheckpointError, ConfigError

CONFIG = "config.json"
WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
TOKENIZER = "tokenizer.json"
# what a config.json carries that the model settings do not: kept beside an imported checkpoint
HF_CONFIG_FILE = "hf_config.json"


# ---------------------------------------------------------------------------------------------
# config.json <-> model settings

def _model_fields() -> set[str]:
    from .config import ModelConfig
    return {f.name for f in dataclasses.fields(ModelConfig)}


def model_cfg(model: dict):
    """A ModelConfig from a dict of model.* settings (keys this hvdllm lacks are dropped)."""
    from .config import ModelConfig
    fields = _model_fields()
    return ModelConfig(**{k: v for k, v in model.items() if k in fields})


def _keep(out: dict) -> dict:
    fields = _model_fields()
    return {k: v for k, v in out.items() if k in fields}


def model_settings(hf: dict, where="config.json") -> dict:
    """hvdllm model.* values for a Hugging Face config.json (a dict). CheckpointError naming what
    is not supported."""
    mt = hf.get("model_type")
    fields = _model_fields()
    if mt == "gpt2":
        bad = []
        act = hf.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh"):
            bad.append(f"activation_function={act!r} (hvdllm's GPT-2 uses the tanh GELU, gelu_new)")
        if hf.get("n_inner") not in (None, 4 * hf["n_embd"]) and "ffn_hidden" not in fields:
            bad.append(f"n_inner={hf['n_inner']} (hvdllm's MLP is 4 * n_embd wide)")
        eps = float(hf.get("layer_norm_epsilon", 1e-5))
        if abs(eps - 1e-5) > 1e-12 and "norm_eps" not in fields:
            bad.append(f"layer_norm_epsilon={eps} (hvdllm uses 1e-5)")
        for key, ok in (("scale_attn_by_inverse_layer_idx", False), ("scale_attn_weights", True),
                        ("tie_word_embeddings", True), ("add_cross_attention", False)):
            if bool(hf.get(key, ok)) != ok:
                bad.append(f"{key}={hf[key]} (hvdllm needs {ok})")
        if bad:
            raise CheckpointError(f"{where}: this GPT-2 differs from hvdllm's GPT in " + "; ".join(bad))
        return _keep({"family": "gpt2", "n_layer": hf["n_layer"], "n_head": hf["n_head"],
                      "n_embd": hf["n_embd"], "block_size": hf["n_positions"], "vocab_size": hf["vocab_size"],
                      "n_kv_head": 0, "ffn_hidden": hf.get("n_inner") or 0, "norm_eps": eps,
                      "rope_theta": 10000.0, "tie_embeddings": True})
    if mt == "llama":
        if "family" not in fields:
            raise CheckpointError(f"{where}: a Llama model (model.family = 'llama' is not in this "
                                  f"hvdllm yet)")
        return _llama_settings(hf, where)
    raise CheckpointError(f"{where}: model_type {mt!r} is not supported; hvdllm imports 'gpt2' "
                          f"(GPT2LMHeadModel) and 'llama' (LlamaForCausalLM) models")


def _llama_settings(hf: dict, where) -> dict:
    bad = []
    if hf.get("hidden_act", "silu") != "silu":
        bad.append(f"hidden_act={hf['hidden_act']!r} (SwiGLU uses silu)")
    if hf.get("attention_bias") or hf.get("mlp_bias"):
        bad.append("attention_bias / mlp_bias (hvdllm's Llama has no biases)")
    rs = hf.get("rope_scaling")
    if rs and (rs.get("rope_type") or rs.get("type")) not in (None, "default"):
        bad.append(f"rope_scaling={rs} (plain RoPE only)")
    n_head = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // n_head):
        bad.append(f"head_dim={hf['head_dim']} (hvdllm's heads are hidden_size / num_attention_heads)")
    if bad:
        raise CheckpointError(f"{where}: this Llama differs from hvdllm's in " + "; ".join(bad))
    theta = hf.get("rope_theta")
    if theta is None:   # transformers v5 keeps it in rope_parameters
        theta = (hf.get("rope_parameters") or rs or {}).get("rope_theta", 10000.0)
    return _keep({"family": "llama", "n_layer": hf["num_hidden_layers"], "n_head": n_head,
                  "n_embd": hf["hidden_size"], "vocab_size": hf["vocab_size"],
                  "block_size": hf.get("max_position_embeddings", 2048),
                  "n_kv_head": hf.get("num_key_value_heads") or n_head,
                  "ffn_hidden": hf["intermediate_size"], "rope_theta": float(theta),
                  "norm_eps": float(hf.get("rms_norm_eps", 1e-6)),
                  "tie_embeddings": bool(hf.get("tie_word_embeddings", False))})


def family(model: dict) -> str:
    return model.get("family") or "gpt2"


# what an exported config.json keeps of the imported model's own (the rest follows the run's settings)
KEPT_FROM_SOURCE = ("bos_token_id", "eos_token_id", "pad_token_id", "max_position_embeddings",
                    "initializer_range", "transformers_version")


def hf_config(model: dict, tokenizer_text: str | None = None, dropout: float = 0.0,
              source: dict | None = None) -> dict:
    """A config.json for hvdllm model settings `model` (a dict of model.*). `source`: the config.json
    of the model the run started from (train.init_from / convert --from-hf), if it is the same
    family: its special token ids and a Llama's max_position_embeddings (when not smaller than
    the run's block_size) are kept."""
    cfg = _hf_config(model, tokenizer_text, dropout)
    if source and source.get("model_type") == cfg["model_type"]:
        for key in KEPT_FROM_SOURCE:
            if key in source and key not in ("max_position_embeddings",):
                cfg[key] = source[key]
        if cfg["model_type"] == "llama" and source.get("max_position_embeddings", 0) > cfg["max_position_embeddings"]:
            cfg["max_position_embeddings"] = source["max_position_embeddings"]
    return cfg


def _hf_config(model: dict, tokenizer_text: str | None, dropout: float) -> dict:
    from . import params
    m = model_cfg(model)
    special = _special_ids(tokenizer_text)
    F = params.ffn_hidden(m)
    if family(model) == "gpt2":
        cfg = {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2",
               "vocab_size": m.vocab_size, "n_positions": m.block_size,
               "n_embd": m.n_embd, "n_layer": m.n_layer, "n_head": m.n_head,
               "n_inner": None if F == 4 * m.n_embd else F, "activation_function": "gelu_new",
               "resid_pdrop": dropout, "embd_pdrop": dropout, "attn_pdrop": dropout,
               "layer_norm_epsilon": float(getattr(m, "norm_eps", 1e-5)),
               "initializer_range": 0.02, "scale_attn_weights": True, "use_cache": True,
               "tie_word_embeddings": True, "torch_dtype": "float32"}
    else:
        cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama",
               "vocab_size": m.vocab_size, "hidden_size": m.n_embd, "num_hidden_layers": m.n_layer,
               "num_attention_heads": m.n_head, "num_key_value_heads": params.kv_heads(m),
               "head_dim": params.head_dim(m), "intermediate_size": F,
               "max_position_embeddings": m.block_size, "rope_theta": float(m.rope_theta),
               "rms_norm_eps": float(m.norm_eps), "hidden_act": "silu",
               "attention_bias": False, "mlp_bias": False, "attention_dropout": 0.0,
               "tie_word_embeddings": bool(params.tied(m)),
               "initializer_range": 0.02, "use_cache": True, "torch_dtype": "float32"}
    cfg.update({"bos_token_id": special.get("bos_token_id"), "eos_token_id": special.get("eos_token_id")})
    return cfg


def _special_ids(tokenizer_text: str | None) -> dict:
    """bos/eos ids the tokenizer defines (GPT-2's <|endoftext|>, Llama's <s> / </s>)."""
    if not tokenizer_text:
        return {}
    try:
        added = {t["content"]: t["id"] for t in json.loads(tokenizer_text).get("added_tokens") or []}
    except (ValueError, TypeError, KeyError, AttributeError):
        return {}
    bos = next((added[t] for t in ("<s>", "<|begin_of_text|>", "<|endoftext|>") if t in added), None)
    eos = next((added[t] for t in ("</s>", "<|end_of_text|>", "<|endoftext|>") if t in added), None)
    return {"bos_token_id": bos, "eos_token_id": eos}


# ---------------------------------------------------------------------------------------------
# names <-> Hugging Face names

@dataclasses.dataclass(frozen=True)
class Part:
    key: str                 # the Hugging Face tensor
    size: int | None = None  # its extent along the hvdllm array's `axis` (None: the whole array)
    transpose: bool = False  # the HF tensor is the hvdllm array's transpose (nn.Linear (out, in))


@dataclasses.dataclass(frozen=True)
class Spec:
    """An hvdllm array as one or more HF tensors, concatenated along `axis` (of the hvdllm array)."""
    parts: tuple
    axis: int = 0


def _shapes(model: dict) -> dict:
    from . import params
    return params.param_shapes(model_cfg(model))


def specs(model: dict, keys=None) -> dict[str, Spec]:
    """{hvdllm parameter: Spec} for model settings `model`; `keys` (the HF file's tensor names, if
    known) picks the prefix a GPT-2 checkpoint uses (GPT2LMHeadModel's `transformer.` or
    GPT2Model's none)."""
    if family(model) == "gpt2":
        prefix = "transformer."
        if keys is not None and "transformer.wte.weight" not in keys and "wte.weight" in keys:
            prefix = ""
        return {n: Spec((Part(f"{prefix}{n}.weight" if n in ("wte", "wpe") else prefix + n),))
                for n in _shapes(model)}
    from . import params
    return {n: Spec((Part(key, transpose=t),)) for n, (key, t) in params.hf_llama_names(model_cfg(model)).items()}


# ---------------------------------------------------------------------------------------------
# reading: safetensors, lazily

def _ranges(n: int, pl: dict | None) -> list[tuple[int, int]]:
    """The index ranges along the placement's axis that the slice takes (one per group)."""
    if pl is None:
        return [(0, n)]
    g, p, i = pl["groups"], pl["parts"], pl["index"]
    block = n // g
    q, r = divmod(block, p)   # np.array_split's pieces
    lo = i * q + min(i, r)
    hi = lo + q + (1 if i < r else 0)
    return [(k * block + lo, k * block + hi) for k in range(g)]


class _Files:
    """Open safetensors files (one handle each), tensor -> file."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / INDEX
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (OSError, ValueError, KeyError, TypeError) as e:
                raise CheckpointError(f"{index}: not a safetensors index ({e})") from e
            self.where = {k: folder / f for k, f in weight_map.items()}
        elif (folder / WEIGHTS).exists():
            self.where = None
        else:
            raise CheckpointError(f"{folder}: no {WEIGHTS} or {INDEX} (only safetensors checkpoints are "
                                  f"read; save with save_pretrained(..., safe_serialization=True))")
        self._open: dict = {}
        if self.where is None:
            keys = self._handle(folder / WEIGHTS).keys()
            self.where = {k: folder / WEIGHTS for k in keys}
        for f in set(self.where.values()):
            if not f.exists():
                raise CheckpointError(f"{f}: listed in {INDEX} but missing")

    def _handle(self, path: Path, framework: str = "numpy"):
        key = (path, framework)
        if key not in self._open:
            try:
                from safetensors import safe_open
            except ImportError as e:
                raise CheckpointError("reading Hugging Face checkpoints needs the `safetensors` "
                                      "package (pip install safetensors)") from e
            try:
                self._open[key] = safe_open(str(path), framework=framework)
            except Exception as e:   # safetensors raises its own error types
                raise CheckpointError(f"{path}: not a readable safetensors file ({e})") from e
        return self._open[key]

    def keys(self):
        return self.where.keys()

    def shape(self, key: str) -> tuple:
        return tuple(self._handle(self.where[key]).get_slice(key).get_shape())

    def read(self, key: str, index: tuple) -> np.ndarray:
        """tensor[index] as float32 (bf16 goes through torch, which numpy cannot hold)."""
        path = self.where[key]
        sl = self._handle(path).get_slice(key)
        if sl.get_dtype() in ("BF16", "F8_E4M3", "F8_E5M2"):
            import torch
            return self._handle(path, "pt").get_slice(key)[index].to(torch.float32).numpy()
        return np.asarray(sl[index], dtype=np.float32)


class HFWeights(Mapping):
    """A Hugging Face model folder's weights as {hvdllm name: whole array} under hvdllm's names and
    orientation, with checkpoint.Sharded's `shapes` and `slice(name, placement)`: a slice is read
    from the file with `get_slice`, nothing more."""

    def __init__(self, folder, model: dict):
        self.folder = Path(folder)
        self.files = _Files(self.folder)
        self.specs = specs(model, set(self.files.keys()))
        missing = [p.key for s in self.specs.values() for p in s.parts if p.key not in self.files.where]
        if missing:
            raise CheckpointError(f"{self.folder}: the checkpoint lacks {len(missing)} tensor(s) the "
                                  f"{family(model)} model of its config.json has: "
                                  + ", ".join(missing[:4]) + (" ..." if len(missing) > 4 else ""))
        self.shapes = {}
        problems = []
        for name, spec in self.specs.items():
            shapes = []
            for p in spec.parts:
                s = self.files.shape(p.key)
                shapes.append(s[::-1] if p.transpose else s)
            shape = list(shapes[0])
            shape[spec.axis] = sum(s[spec.axis] for s in shapes)
            for p, s in zip(spec.parts, shapes):
                if p.size is not None and s[spec.axis] != p.size:
                    problems.append(f"{p.key}: shape {s} does not fit the config")
            self.shapes[name] = tuple(shape)
        if problems:
            raise CheckpointError(f"{self.folder}: " + "; ".join(problems[:4]))

    def __getitem__(self, name: str) -> np.ndarray:
        if name not in self.specs:
            raise KeyError(name)
        return self.slice(name, None)

    def __iter__(self):
        return iter(self.specs)

    def __len__(self) -> int:
        return len(self.specs)

    def __contains__(self, name) -> bool:
        return name in self.specs

    def rows(self, name: str, lo: int, hi: int) -> np.ndarray:
        """Indices [lo, hi) along axis 0, read alone (VocabTables pads a tp rank's table rows)."""
        return self._region(self.specs[name], self.shapes[name], 0, lo, hi)

    def slice(self, name: str, pl: dict | None) -> np.ndarray:
        if pl is not None and "range" in pl:
            a, b = pl["range"]
            return self.slice(name, placement_mod.base(pl)).reshape(-1)[a:b]
        spec, shape = self.specs[name], self.shapes[name]
        ax = pl["axis"] if pl is not None else 0
        pieces = [self._region(spec, shape, ax, lo, hi) for lo, hi in _ranges(shape[ax], pl)]
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces, axis=ax)

    def _region(self, spec: Spec, shape, ax: int, lo: int, hi: int) -> np.ndarray:
        """Indices [lo, hi) along axis `ax` of the hvdllm array, read from its parts."""
        out, off = [], 0
        for p in spec.parts:
            size = p.size if p.size is not None else shape[spec.axis]
            if ax == spec.axis:   # the parts are stacked along the sliced axis: only overlaps
                a, b = max(lo, off), min(hi, off + size)
                if a < b:
                    out.append(self._read(p, len(shape), ax, a - off, b - off))
            else:
                out.append(self._read(p, len(shape), ax, lo, hi))
            off += size
        return out[0] if len(out) == 1 else np.concatenate(out, axis=spec.axis)

    def _read(self, p: Part, ndim: int, ax: int, lo: int, hi: int) -> np.ndarray:
        index = [slice(None)] * ndim
        index[ax] = slice(lo, hi)
        if p.transpose:
            return np.ascontiguousarray(self.files.read(p.key, tuple(index[::-1])).T)
        return self.files.read(p.key, tuple(index))


# ---------------------------------------------------------------------------------------------
# what train.init_from names, and the model folder as a source

def is_hf_dir(path) -> bool:
    p = Path(path)
    return (p / CONFIG).is_file() and ((p / WEIGHTS).exists() or (p / INDEX).exists())


def read_hf_config(folder) -> dict:
    path = Path(folder) / CONFIG
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable config.json ({e})") from e


def read_hf_tokenizer(folder) -> str:
    """The model's tokenizer as tokenizer.json text (GPT-2's vocab.json + merges.txt are turned
    into one when there is no tokenizer.json)."""
    folder = Path(folder)
    if (folder / TOKENIZER).is_file():
        text = (folder / TOKENIZER).read_text(encoding="utf-8")
    elif (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        tok = Tokenizer(models.BPE.from_file(str(folder / "vocab.json"), str(folder / "merges.txt")))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        text = tok.to_str()
    else:
        raise CheckpointError(f"{folder}: no {TOKENIZER} (save the tokenizer with the model: "
                              f"tokenizer.save_pretrained(folder))")
    from .errors import HvdllmError
    from .tokenizer import from_serialized
    try:
        from_serialized(text)
    except HvdllmError as e:
        raise CheckpointError(f"{folder / TOKENIZER}: {e}") from e
    return text


@dataclasses.dataclass
class Source:
    """A model to start from: a Hugging Face folder or an hvdllm run / checkpoint."""
    kind: str                  # "hf" or "hvdllm"
    path: Path                 # the HF folder, or the checkpoint folder
    model: dict                # model.* settings
    tokenizer_text: str | None

    def weights(self) -> Mapping:
        """The parameters, lazily (`slice` reads only what a rank holds); no optimizer state."""
        if self.kind == "hf":
            return HFWeights(self.path, self.model)
        from . import checkpoint
        state, _ = checkpoint.load(self.path)
        return ParamsOnly(state)

    def hf_config_text(self) -> str | None:
        """The config.json of the Hugging Face model this one comes from (kept through runs, so an
        export keeps its special token ids and context length); None for a model of hvdllm's own."""
        if self.kind == "hf":
            return json.dumps(read_hf_config(self.path), indent=1)
        from . import checkpoint
        state, _ = checkpoint.load(self.path)
        text = state.read_file(HF_CONFIG_FILE)
        return text.decode("utf-8") if text is not None else None


class ParamsOnly(Mapping):
    """A checkpoint's parameters without its optimizer state (a fresh start from its weights)."""

    def __init__(self, state):
        self.state = state
        self.names = [k for k in state if not k.startswith(("optim.", "localsgd."))]
        all_shapes = getattr(state, "shapes", None) or {k: np.shape(state[k]) for k in self.names}
        self.shapes = {k: tuple(all_shapes[k]) for k in self.names}

    def __getitem__(self, name):
        if name not in self.shapes:
            raise KeyError(name)
        return self.state[name]

    def slice(self, name, pl):
        if hasattr(self.state, "slice"):
            return self.state.slice(name, pl)
        return placement_mod.take(np.asarray(self.state[name]), pl)

    def __iter__(self):
        return iter(self.names)

    def __len__(self):
        return len(self.names)

    def __contains__(self, name):
        return name in self.shapes


# model settings a fine-tune may choose itself (a different vocab_multiple: fit_vocab_tables)
ARCH_KEYS_SKIPPED = ("dropout", "tp_plan", "vocab_multiple")


class VocabTables(ParamsOnly):
    """A source's weights with `wte` / `lm_head` cut or zero-padded to the run's table rows (its
    model.vocab_multiple differs from the source's; rows past vocab_size are padding either way).
    A tp rank's rows of a Hugging Face folder are read alone (HFWeights.rows); from an hvdllm
    checkpoint, or for a ZeRO range, the table is read whole and then cut."""

    def __init__(self, inner: Mapping, rows: int):
        from .params import VOCAB_TABLES
        super().__init__(inner)
        self.rows, self.tables = rows, [n for n in VOCAB_TABLES if n in self.shapes]
        for n in self.tables:
            self.shapes[n] = (rows, *self.shapes[n][1:])

    def _table(self, name, lo: int = 0, hi: int | None = None) -> np.ndarray:
        """Rows [lo, hi) of the run's table: the source's rows there, zeros past its end."""
        hi = self.rows if hi is None else hi
        have = min(hi, self.inner_rows(name))
        if lo >= have:
            a = np.zeros((0, *self.shapes[name][1:]), np.float32)
        elif hasattr(self.state, "rows"):
            a = self.state.rows(name, lo, have)
        else:
            a = np.asarray(self.state[name], np.float32)[lo:have]
        return np.concatenate([a, np.zeros((hi - lo - len(a), *a.shape[1:]), np.float32)]) if len(a) < hi - lo else a

    def inner_rows(self, name) -> int:
        shapes = getattr(self.state, "shapes", None)
        return (shapes[name] if shapes else np.shape(self.state[name]))[0]

    def __getitem__(self, name):
        return self._table(name) if name in self.tables else super().__getitem__(name)

    def slice(self, name, pl):
        if name not in self.tables:
            return super().slice(name, pl)
        if pl is None or "range" in pl or pl["axis"] != 0 or pl["groups"] != 1:
            return placement_mod.take(self._table(name), pl)
        (lo, hi), = _ranges(self.rows, pl)   # a tp rank's rows: only those are read
        return self._table(name, lo, hi)


def fit_vocab_tables(weights: Mapping, model_cfg) -> Mapping:
    """`weights` as they are when their vocabulary tables have the run's rows, else VocabTables."""
    from .params import VOCAB_TABLES, table_vocab
    rows = table_vocab(model_cfg)
    shapes = getattr(weights, "shapes", None) or {k: np.shape(weights[k]) for k in weights}
    if all(tuple(shapes[n])[0] == rows for n in VOCAB_TABLES if n in shapes):
        return weights
    return VocabTables(weights, rows)


def open_source(path) -> Source:
    """train.init_from's target: a Hugging Face model folder, an hvdllm run folder (its newest
    intact checkpoint) or a checkpoints/step_* folder. CheckpointError saying what it is not."""
    from . import checkpoint
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"{p} does not exist: pass a Hugging Face model folder (config.json, "
                              f"model.safetensors, tokenizer.json) or an hvdllm run folder")
    if is_hf_dir(p):
        return Source("hf", p, model_settings(read_hf_config(p), str(p / CONFIG)), read_hf_tokenizer(p))
    if (p / checkpoint.MANIFEST).exists():
        ckpt = p
    elif p.is_dir() and (p / "checkpoints").is_dir():
        ckpt = checkpoint.latest(p)
        if ckpt is None:
            raise CheckpointError(f"no checkpoint under {p / 'checkpoints'}")
    else:
        raise CheckpointError(f"{p} is neither a Hugging Face model folder (config.json with "
                              f"model.safetensors) nor an hvdllm run folder (checkpoints/)")
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: a single-file checkpoint; train.init_from takes checkpoint "
                              f"folders (convert it back with a run)")
    state, meta = checkpoint.load(ckpt)
    model = dict((meta.get("config") or {}).get("model") or {})
    if not model:
        raise CheckpointError(f"{ckpt}: its manifest records no model config")
    text = state.read_file(checkpoint.TOKENIZER_FILE)
    return Source("hvdllm", ckpt, model, text.decode("utf-8") if text is not None else None)


def apply_init_from(cfg) -> Source | None:
    """Before validation (cli train): the model settings of train.init_from's model replace
    cfg.model's architecture (not dropout or tp_plan; a gpt2 trains at its n_positions, a llama
    at model.block_size up to its max_position_embeddings). ConfigError naming train.init_from
    when it cannot be read; None when it is not set."""
    if not cfg.train.init_from:
        return None
    from .errors import HvdllmError
    try:
        src = open_source(cfg.train.init_from)
    except HvdllmError as e:
        raise ConfigError([f"train.init_from: {e}"]) from e
    problems = []
    if cfg.data.tokenizer != "byte":
        problems.append(f"data.tokenizer: train.init_from brings its model's own tokenizer; remove "
                        f"data.tokenizer={cfg.data.tokenizer!r}")
    if cfg.model.layers and src.kind == "hf":
        problems.append("model.layers: a Hugging Face model loads into the built-in GPT; remove model.layers")
    if problems:
        raise ConfigError(problems)
    fields = _model_fields()
    own_block = cfg.model.block_size
    for k, v in src.model.items():
        if k in fields and k not in ARCH_KEYS_SKIPPED:
            setattr(cfg.model, k, v)
    if family(src.model) == "llama":   # rotary positions: no parameters, any context up to the model's
        cfg.model.block_size = min(own_block, src.model["block_size"])
    return src


def use_source_tokenizer(cfg, src: Source | None):
    """After validation: the run tokenizes its corpus with the model's tokenizer (registered for
    tokenizer.get_tokenizer under a content-derived name, so the token cache is per tokenizer)."""
    from . import tokenizer
    if src is None or src.tokenizer_text is None:
        return cfg
    if json.loads(src.tokenizer_text).get("hvdllm_tokenizer") == "byte":
        return cfg
    cfg.data.tokenizer = tokenizer.register(src.tokenizer_text)
    return cfg


def for_toml(cfg):
    """The config as a user writes it (config.toml): data.tokenizer as given, not the registered
    name of train.init_from's tokenizer (which a fresh run derives again)."""
    if not cfg.data.tokenizer.startswith("hf:"):
        return cfg
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer="byte"))


# ---------------------------------------------------------------------------------------------
# writing a run folder from a Hugging Face model, and a Hugging Face folder from a run

def import_run(hf_dir, out_dir, backend: str = "torch") -> Path:
    """OUT as an hvdllm run folder: config.toml, checkpoints/step_00000000/ (one shard, the
    parameters under hvdllm's names, the tokenizer, the original config.json)."""
    from . import checkpoint
    from .config import Config, to_toml
    hf_dir, out = Path(hf_dir), Path(out_dir)
    if not is_hf_dir(hf_dir):
        raise CheckpointError(f"{hf_dir}: not a Hugging Face model folder (config.json and "
                              f"{WEIGHTS} or {INDEX})")
    if (out / "checkpoints").exists() and checkpoint.all_steps(out):
        raise CheckpointError(f"{out} holds checkpoints already: choose a new folder for the import")
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file: choose a folder for the import")
    hf = read_hf_config(hf_dir)
    model = model_settings(hf, str(hf_dir / CONFIG))
    text = read_hf_tokenizer(hf_dir)
    weights = HFWeights(hf_dir, model)
    checkpoint.check_compatible(weights, _shapes(model), hf_dir)
    cfg = Config()
    cfg.backend = backend
    for k, v in model.items():
        setattr(cfg.model, k, v)
    cfg.train.out_dir = str(out)
    cfg.train.init_from = str(hf_dir.resolve())
    from .tokenizer import from_serialized
    tok = from_serialized(text)
    if tok.vocab_size > cfg.model.vocab_size:
        raise CheckpointError(f"{hf_dir}: its tokenizer has {tok.vocab_size} ids, more than the "
                              f"model's vocab_size={cfg.model.vocab_size}")
    state = {n: weights[n] for n in weights}
    meta = {"config": cfg.to_dict(), "layout": "dp=1 pp=1 tp=1 (imported)", "backend": "huggingface",
            "tokenizer": tok.name, "hf_source": str(hf_dir.resolve()),
            checkpoint.EXTRA_FILES: {checkpoint.TOKENIZER_FILE: text, HF_CONFIG_FILE: json.dumps(hf, indent=1)}}
    out.mkdir(parents=True, exist_ok=True)
    path = checkpoint.save(out, 0, state, meta)
    (out / "config.toml").write_text(to_toml(cfg))
    return path


def hf_tensors(state: Mapping, model: dict) -> dict[str, np.ndarray]:
    """{Hugging Face key: float32 array} of a checkpoint's whole parameters (names, transposes)."""
    from . import params
    table = specs(model)
    missing = [n for n in table if n not in state]
    if missing:
        raise CheckpointError(f"the checkpoint lacks {', '.join(missing[:4])}: not a {family(model)} model")
    tensors = {}
    for name, spec in table.items():
        whole = np.asarray(state[name], dtype=np.float32)
        if name in params.VOCAB_TABLES:   # a padded table's extra rows are not the model's
            whole = whole[:model["vocab_size"]]
        sizes = [p.size if p.size is not None else whole.shape[spec.axis] for p in spec.parts]
        cuts = np.cumsum(sizes)[:-1]
        for p, piece in zip(spec.parts, np.split(whole, cuts, axis=spec.axis)):
            tensors[p.key] = np.ascontiguousarray(piece.T if p.transpose else piece)
    return tensors


def export(state: Mapping, model: dict, tokenizer_text: str, out_dir, dropout: float = 0.0,
           source: dict | None = None) -> Path:
    """config.json, model.safetensors, tokenizer.json and tokenizer_config.json in `out_dir`
    (`source`: the config.json the run's model was imported with, see hf_config)."""
    try:
        from safetensors.numpy import save_file
    except ImportError as e:
        raise CheckpointError("writing Hugging Face checkpoints needs the `safetensors` package "
                              "(pip install safetensors)") from e
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out} is a file: --to-hf writes a folder (config.json, {WEIGHTS}, ...)")
    tensors = hf_tensors(state, model)
    out.mkdir(parents=True, exist_ok=True)
    cfg = hf_config(model, tokenizer_text, dropout, source)
    tok_cfg = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": model["block_size"],
               "clean_up_tokenization_spaces": False}
    special = json.loads(tokenizer_text).get("added_tokens") or []
    by_id = {t["id"]: t["content"] for t in special}
    for key in ("bos_token_id", "eos_token_id"):
        if cfg.get(key) in by_id:
            tok_cfg[key[:-3]] = by_id[cfg[key]]
    _write_atomic(out / WEIGHTS, lambda path: save_file(tensors, str(path), metadata={"format": "pt"}))
    _write_atomic(out / TOKENIZER, lambda path: path.write_text(tokenizer_text, encoding="utf-8"))
    _write_atomic(out / "tokenizer_config.json", lambda path: path.write_text(json.dumps(tok_cfg, indent=1)))
    _write_atomic(out / CONFIG, lambda path: path.write_text(json.dumps(cfg, indent=1)))
    return out


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:16]
