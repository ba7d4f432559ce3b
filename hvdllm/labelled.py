"""Labelled texts for task.kind = 'classify': read, checked, mapped to label ids and tokenised.

Formats, by what the path is:
  *.jsonl / *.ndjson / *.json   one JSON object per line (a *.json holding one array of objects
                                also works)
  *.csv / *.tsv                 a header row naming the fields
  *.parquet                     columns (pyarrow)
  a folder                      a Hugging Face dataset saved with `save_to_disk`: read with the
                                `datasets` package when it is installed, else straight from the
                                folder's Arrow files (pyarrow); a DatasetDict's split folder
                                (DIR/train) is one dataset
Other files: one message saying which formats there are.

Labels: task.labels (names in id order) when given; else integer labels (ints, or digit strings
as CSV writes them) are the ids themselves, a dataset's ClassLabel names name them; else the
distinct strings, sorted, are the names and their positions the ids. The validation file uses the
training file's map: a label it does not know is an error.

Every problem (an unreadable line, a missing field, an empty text, an unknown label, an empty
file) is one HvdllmError naming the file and the line (the row, for Parquet and datasets), raised
while the data is read, before the run writes anything.

Texts are tokenised with the run's tokenizer and truncated to model.block_size; shorter ones are
right-padded with 0 (the causal model never lets padding change a real token's hidden state;
hvdllm/task.py). `ExampleSampler` hands out training batches in data.Sampler's order.
"""
from __future__ import annotations

import hashlib
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import data
from .errors import HvdllmError
from .records import JSON_SUFFIXES
from .records import csv_records as _csv_records
from .records import err as _err
from .records import json_records as _json_records
from .records import pyarrow as _pyarrow
from .records import table_records as _table_records

FORMATS = "JSONL (.jsonl), CSV (.csv / .tsv), Parquet (.parquet) or a saved Hugging Face dataset folder"


# ---------------------------------------------------------------------------------------------
# Reading: (where, record) pairs, `where` the line ("line 12") or row ("row 12") for messages
# (the readers it shares with corpora live in hvdllm/records.py).

def _saved_dataset(path: Path, fields):
    """A `save_to_disk` folder: (records, ClassLabel names of the label field or None)."""
    if (path / "dataset_dict.json").exists():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise _err(path, None, f"a DatasetDict with splits {', '.join(splits)}: point task.train_file / "
                               f"task.validation_file at a split's folder, e.g. {path / (splits or ['train'])[0]}")
    if not (path / "state.json").exists():
        raise _err(path, None, f"a folder, but not a saved Hugging Face dataset (no state.json); pass "
                               f"{FORMATS}")
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None:
        ds = datasets.load_from_disk(str(path))
        table = ds.data.table if hasattr(ds.data, "table") else ds.data
        feature = ds.features.get(fields[1])
        return _table_records(table, path, fields), getattr(feature, "names", None)
    # without `datasets`: the folder's Arrow stream files, in state.json's order
    pa = _pyarrow(path)
    state = json.loads((path / "state.json").read_text())
    tables = []
    for entry in state.get("_data_files", []):
        with pa.memory_map(str(path / entry["filename"])) as f:
            tables.append(pa.ipc.open_stream(f).read_all())
    if not tables:
        raise _err(path, None, "the saved dataset lists no data files (state.json)")
    info = json.loads((path / "dataset_info.json").read_text()) if (path / "dataset_info.json").exists() else {}
    feature = (info.get("features") or {}).get(fields[1]) or {}
    names = feature.get("names") if feature.get("_type") == "ClassLabel" else None
    return _table_records(pa.concat_tables(tables), path, fields), names


def read(path, text_field: str, label_field: str) -> tuple[list[tuple[str, str, object]], list | None]:
    """([(where, text, raw label)], the label names the file itself declares or None)."""
    path = Path(path).expanduser()
    fields = (text_field, label_field)
    names = None
    if path.is_dir():
        records, names = _saved_dataset(path, fields)
    elif path.suffix in JSON_SUFFIXES:
        records = _json_records(path)
    elif path.suffix in (".csv", ".tsv"):
        records = _csv_records(path, fields)
    elif path.suffix == ".parquet":
        records = _table_records(_pyarrow(path).parquet.read_table(path, columns=None), path, fields)
    else:
        raise _err(path, None, f"unknown format {path.suffix or '(no suffix)'!r}: pass {FORMATS}")
    out = []
    for where, rec in records:
        if not isinstance(rec, dict):
            raise _err(path, where, f"expected an object with {text_field!r} and {label_field!r}, got {rec!r:.80}")
        for k in fields:
            if rec.get(k) is None:
                raise _err(path, where, f"no {k!r} field (set task.{'text' if k == text_field else 'label'}_field "
                                        f"if the file calls it otherwise)")
        if isinstance(rec[label_field], str) and not rec[label_field].strip():
            raise _err(path, where, f"the {label_field!r} field is empty")
        if not isinstance(rec[text_field], str):
            raise _err(path, where, f"{text_field!r} is {rec[text_field]!r:.60}, not a text")
        out.append((where, rec[text_field], rec[label_field]))
    if not out:
        raise _err(path, None, "no examples (the file is empty)")
    return out, names


def read_texts(path, text_field: str) -> list[tuple[str, str]]:
    """[(where, text)] of unlabelled texts (hvdllm predict): JSONL / CSV / TSV / Parquet records'
    `text_field`, or any other file's non-blank lines."""
    path = Path(path).expanduser()
    if path.suffix in JSON_SUFFIXES:
        records = _json_records(path)
    elif path.suffix in (".csv", ".tsv"):
        records = _csv_records(path, (text_field,))
    elif path.suffix == ".parquet":
        records = _table_records(_pyarrow(path).parquet.read_table(path), path, (text_field,))
    else:
        records = ((f"line {i}", {text_field: line}) for i, line in
                   enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1) if line.strip())
    out = []
    for where, rec in records:
        text = rec.get(text_field) if isinstance(rec, dict) else None
        if not isinstance(text, str):
            raise _err(path, where, f"no text in field {text_field!r} (the run's task.text_field)")
        out.append((where, text))
    if not out:
        raise _err(path, None, "no texts (the file is empty)")
    return out


# ---------------------------------------------------------------------------------------------
# Labels

def _as_int(v):
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, float) and v.is_integer():
        return int(v)
    if isinstance(v, str) and v.strip().lstrip("-").isdigit():
        return int(v.strip())
    return None


def label_names(records, path, given: list, declared: list | None) -> tuple[list[str], bool]:
    """(the names in id order, whether an integer label is an id): task.labels, else the file's
    ClassLabel names, else (integer labels) '0'..'max', else the distinct labels sorted (then an
    integer is a name like any other)."""
    if given:
        return [str(n) for n in given], True
    if declared:
        return [str(n) for n in declared], True
    ints = [_as_int(lab) for _, _, lab in records]
    if all(i is not None for i in ints):
        bad = next(((w, i) for (w, _, _), i in zip(records, ints) if i < 0), None)
        if bad:
            raise _err(path, bad[0], f"label {bad[1]} is negative; integer labels are ids 0, 1, ...")
        return [str(i) for i in range(max(ints) + 1)], True
    return sorted({str(lab) for _, _, lab in records}), False


def label_ids(records, path, names: list[str], ints_are_ids: bool) -> np.ndarray:
    """Each record's label id under `names`; an unknown label is an error naming its line."""
    index = {n: i for i, n in enumerate(names)}
    out = np.empty(len(records), np.int64)
    for k, (where, _, lab) in enumerate(records):
        i = index.get(str(lab))
        if i is None and ints_are_ids:   # an integer label is an id (3.0 from a float column, too)
            j = _as_int(lab)
            i = j if j is not None and 0 <= j < len(names) else None
        if i is None:
            shown = ", ".join(names[:10]) + (" ..." if len(names) > 10 else "")
            raise _err(path, where, f"unknown label {lab!r} (the training data's labels: {shown}); fix the "
                                    f"label, or list every name in task.labels")
        out[k] = i
    return out


# ---------------------------------------------------------------------------------------------
# Examples

@dataclass
class Examples:
    """Tokenised examples: ids (N, T) right-padded with 0, labels (N,), lengths (N,) >= 1."""
    ids: np.ndarray
    labels: np.ndarray
    lengths: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def batch(self, idx) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) for the examples at `idx`: x (b, T) int64, y (b, 2) int64 = [label, length]
        (the classify batch of hvdllm/engine.py)."""
        idx = np.asarray(idx, np.int64)
        return (np.asarray(self.ids[idx], np.int64),
                np.stack([self.labels[idx], self.lengths[idx]], axis=1).astype(np.int64))

    def take(self, idx) -> "Examples":
        return Examples(self.ids[idx], self.labels[idx], self.lengths[idx])

    def digest(self) -> str:
        h = hashlib.sha256()
        for a in (self.ids, self.labels, self.lengths):
            h.update(np.ascontiguousarray(a).tobytes())
        return h.hexdigest()


def encode(texts, labels: np.ndarray, tok, block_size: int, path, wheres) -> tuple[Examples, int]:
    """(Examples, how many texts were truncated to block_size). An empty text is an error."""
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.int32
    ids = np.zeros((len(texts), block_size), dtype)
    lengths = np.empty(len(texts), np.int64)
    cut = 0
    for k, text in enumerate(texts):
        t = tok.encode(text)
        if not t:
            raise _err(path, wheres[k], "the text is empty; drop the example or give it a text")
        cut += len(t) > block_size
        t = t[:block_size]
        ids[k, :len(t)] = t
        lengths[k] = len(t)
    return Examples(ids, labels, lengths), cut


@dataclass
class LabelledData:
    """What the classify trainer trains on (the attributes checkpoint.identity reads are those of
    data.TokenData: tokenizer and meta)."""
    train: Examples
    val: Examples
    tokenizer: object
    labels: list[str]
    meta: dict


def prepare(cfg, rank: int = 0) -> LabelledData:
    """Read, check and tokenise task.train_file and task.validation_file (every rank the same;
    no cache: labelled sets are small next to a pretraining corpus). Without a validation file
    the last data.val_fraction of the training examples, in a seeded order, is held out."""
    from .tokenizer import get_tokenizer
    t, T = cfg.task, cfg.model.block_size
    tok = get_tokenizer(cfg.data)
    records, declared = read(t.train_file, t.text_field, t.label_field)
    names, ints_are_ids = label_names(records, t.train_file, t.labels, declared)
    train, cut = encode([r[1] for r in records], label_ids(records, t.train_file, names, ints_are_ids), tok, T,
                        t.train_file, [r[0] for r in records])
    if t.validation_file:
        vrec, _ = read(t.validation_file, t.text_field, t.label_field)
        val, vcut = encode([r[1] for r in vrec], label_ids(vrec, t.validation_file, names, ints_are_ids), tok, T,
                           t.validation_file, [r[0] for r in vrec])
        cut += vcut
    else:
        if len(train) < 2:
            raise _err(t.train_file, None, "one example: too few to hold out a validation set; add "
                                           "examples or set task.validation_file")
        order = np.random.default_rng([cfg.train.seed, 7]).permutation(len(train))
        n_val = max(1, int(round(len(train) * cfg.data.val_fraction)))
        val, train = train.take(np.sort(order[:n_val])), train.take(np.sort(order[n_val:]))
    meta = {"tokens_sha256": hashlib.sha256((train.digest() + val.digest()).encode()).hexdigest(),
            "n_train": len(train), "n_val": len(val), "labels": names,
            "source": ", ".join(filter(None, [t.train_file, t.validation_file]))}
    if rank == 0:
        counts = np.bincount(train.labels, minlength=len(names))
        print(f"[hvdllm] classify: {len(train)} training and {len(val)} validation examples, "
              f"{len(names)} labels (" + ", ".join(f"{n}: {c}" for n, c in zip(names[:8], counts[:8]))
              + (" ..." if len(names) > 8 else "") + f"); {cut} texts truncated to model.block_size={T}",
              file=sys.stderr)
    return LabelledData(train, val, tok, names, meta)


class ExampleSampler(data.Sampler):
    """Training batches of examples in data.Sampler's order: an epoch's seeded permutation of
    the N examples, step s owning a global slice of dp*b of them, rank r taking every dp-th
    (disjoint across ranks; np=k sees exactly np=1's examples per step). The base class counts
    windows of a token array: one "token" per example gives one window per example."""

    def __init__(self, examples: Examples, batch_size: int, dp_size: int, dp_rank: int, seed: int):
        if len(examples) < dp_size * batch_size:
            raise HvdllmError(f"the training data has {len(examples)} examples, fewer than one global batch "
                              f"of {dp_size}x{batch_size} (dp x train.batch_size x aggregation.accumulation): "
                              f"lower train.batch_size or add examples")
        super().__init__(np.empty(len(examples) + 1, np.uint8), 1, batch_size, dp_size, dp_rank, seed)
        self.examples = examples

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        return self.examples.batch(self.windows(step))
