"""`hvdllm predict RUN_DIR --input FILE`: a classify run's labels and probabilities for new texts,
from its newest intact checkpoint, in batches, with either framework (--backend).

Input: JSONL / CSV / TSV / Parquet records (the run's task.text_field) or plain text, one text a
line. Output: one JSON object a text, in input order: {"text", "label", "label_id", "probs"}
(probs: {label name: softmax probability}).
"""
from __future__ import annotations

import json
import sys

import numpy as np

from . import backends, labelled, task


def softmax(logits: np.ndarray) -> np.ndarray:
    z = np.asarray(logits, np.float64)
    z = np.exp(z - z.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


def predictions(engine, examples, batch_size: int) -> np.ndarray:
    """(N, num_labels) float64 probabilities, batch by batch (labels are not read: 0 stands in)."""
    out = []
    for lo in range(0, len(examples), batch_size):
        x, y = examples.batch(np.arange(lo, min(lo + batch_size, len(examples))))
        out.append(softmax(engine.evaluate(x, y).logits))
    return np.concatenate(out)


def records(texts, probs: np.ndarray, names: list[str]):
    for text, p in zip(texts, probs):
        i = int(np.argmax(p))
        yield {"text": text, "label": names[i], "label_id": i,
               "probs": {n: round(float(q), 6) for n, q in zip(names, p)}}


def run(args) -> int:
    from . import runtime
    from .errors import HvdllmError
    from .generate import generate_inputs
    from .parallelize import build_solo_engine
    if args.batch_size < 1:
        raise HvdllmError(f"--batch-size must be >= 1, got {args.batch_size}")
    cfg, path, state, meta, tok = generate_inputs(args)   # every check before a framework starts
    if not task.is_classify(cfg):
        raise HvdllmError(f"{args.out_dir} holds a language model (task.kind = 'lm'): hvdllm predict reads "
                          f"classify runs; hvdllm generate samples from this one")
    names = list(cfg.task.labels)
    rows = labelled.read_texts(args.input, cfg.task.text_field)
    texts = [t for _, t in rows]
    examples, cut = labelled.encode(texts, np.zeros(len(texts), np.int64), tok, cfg.model.block_size,
                                    args.input, [w for w, _ in rows])
    backend = backends.load(cfg.backend)
    rt = runtime.start(backend)
    engine = build_solo_engine(cfg, rt, backend)
    engine.load_state_dict(state)
    probs = predictions(engine, examples, args.batch_size)
    out = open(args.output, "w") if args.output else sys.stdout
    try:
        for rec in records(texts, probs, names):
            out.write(json.dumps(rec) + "\n")
    finally:
        if args.output:
            out.close()
    print(f"[hvdllm] {cfg.backend}: {len(texts)} texts classified with {path} (trained with "
          f"{meta.get('backend')}; {cut} truncated to model.block_size={cfg.model.block_size})", file=sys.stderr)
    return 0
