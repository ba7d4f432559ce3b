"""Records (JSON objects, table rows) read from JSONL, Parquet and Arrow files, streamed.

Shared by labelled data (hvdllm/labelled.py) and language-model corpora (hvdllm/data.py). Every
reader yields (where, record) pairs, `where` the line ("line 12") or row ("row 12") that error
messages name; none holds a whole file in memory except a *.json array (one JSON value).
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from .errors import HvdllmError

JSON_SUFFIXES = (".jsonl", ".ndjson", ".json")
ROWS_PER_BATCH = 256            # Parquet / Arrow rows read at a time: bounded memory per file


def err(path, where, what: str) -> HvdllmError:
    return HvdllmError(f"{path}{f', {where}' if where else ''}: {what}")


def json_records(path: Path):
    if path.suffix == ".json":
        text = path.read_text(encoding="utf-8", errors="replace")
        if text.lstrip().startswith("["):
            try:
                items = json.loads(text)
            except ValueError as e:
                raise err(path, None, f"not valid JSON ({e})") from e
            for i, item in enumerate(items, 1):
                yield f"record {i}", item
            return
    # line by line: a JSONL corpus may be larger than memory
    with open(path, encoding="utf-8", errors="replace", newline="") as f:
        for i, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield f"line {i}", json.loads(line)
            except ValueError as e:
                raise err(path, f"line {i}", f"not a JSON object ({e}); a JSONL file holds one object a line") from e


def csv_records(path: Path, fields, keys: str = "task.text_field / task.label_field"):
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        reader = csv.DictReader(f, delimiter="\t" if path.suffix == ".tsv" else ",")
        missing = [k for k in fields if k not in (reader.fieldnames or [])]
        if reader.fieldnames and missing:
            raise err(path, "line 1", f"the header has no column {missing[0]!r} (columns: "
                                      f"{', '.join(reader.fieldnames)}); set {keys}")
        for row in reader:
            yield f"line {reader.line_num}", row


def pyarrow(path: Path):
    try:
        import pyarrow
        import pyarrow.parquet  # noqa: F401  (pyarrow.parquet is a submodule, not loaded by pyarrow)
    except ImportError as e:
        raise err(path, None, "reading Parquet and Arrow files needs the `pyarrow` package "
                              "(pip install pyarrow); or export the data as JSONL or CSV") from e
    return pyarrow


def check_columns(names, path: Path, fields, keys: str) -> None:
    missing = [k for k in fields if k not in names]
    if missing:
        raise err(path, None, f"no column {missing[0]!r} (columns: {', '.join(names)}); set {keys}")


def batch_records(batches, path: Path, fields):
    """Rows of record batches (or tables) as {field: value}, numbered across batches."""
    row = 0
    for batch in batches:
        cols = [batch.column(k).to_pylist() for k in fields]
        for values in zip(*cols):
            row += 1
            yield f"row {row}", dict(zip(fields, values))


def table_records(table, path: Path, fields, keys: str = "task.text_field / task.label_field"):
    check_columns(table.column_names, path, fields, keys)
    yield from batch_records([table], path, fields)


def parquet_records(path: Path, fields, keys: str):
    """A Parquet file's rows, a batch at a time, a row group at a time: iter_batches over the whole
    file reads ahead (Arrow's pool held more than the file), over one row group it holds that
    group's pages at most."""
    pa = pyarrow(path)
    try:
        pf = pa.parquet.ParquetFile(path, memory_map=True)
    except (OSError, pa.ArrowException) as e:
        raise err(path, None, f"not a readable Parquet file ({e})") from e
    check_columns(pf.schema_arrow.names, path, fields, keys)
    batches = (b for g in range(pf.metadata.num_row_groups)
               for b in pf.iter_batches(batch_size=ROWS_PER_BATCH, row_groups=[g], columns=list(fields)))
    try:
        yield from batch_records(batches, path, fields)
    except (OSError, pa.ArrowException) as e:
        raise err(path, None, f"a damaged Parquet file ({e})") from e


def arrow_stream_records(path: Path, fields, keys: str):
    """An Arrow stream file's rows (a saved Hugging Face dataset's data-*.arrow), a batch at a time."""
    pa = pyarrow(path)
    try:
        with pa.memory_map(str(path)) as f:
            reader = pa.ipc.open_stream(f)
            check_columns(reader.schema.names, path, fields, keys)
            yield from batch_records(reader, path, fields)
    except (OSError, pa.ArrowException) as e:
        raise err(path, None, f"not a readable Arrow stream file ({e})") from e
