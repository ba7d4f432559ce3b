"""Labelled data for task.kind = 'classify' (hvdllm/labelled.py): every format reads the same
examples, label maps (sorted strings, integer ids, task.labels, a dataset's ClassLabel names),
bad data as one message naming the file and line, tokenisation to model.block_size, the
rank-disjoint sampler, and the config rules (hvdllm/task.py)."""
import csv
import json
import re

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from hvdllm import config as config_mod
from hvdllm import labelled, task
from hvdllm.errors import ConfigError, HvdllmError
from hvdllm.tokenizer import ByteTokenizer

ROWS = [("a fine day", "pos"), ("rain again", "neg"), ("so so", "neutral"), ("sunny", "pos")]


def write_jsonl(path, rows, text="text", label="label"):
    path.write_text("".join(json.dumps({text: t, label: lab}) + "\n" for t, lab in rows))
    return path


def write_csv(path, rows, delimiter=","):
    with open(path, "w", newline="") as f:
        w = csv.writer(f, delimiter=delimiter)
        w.writerow(["text", "label"])
        w.writerows(rows)
    return path


def write_saved_dataset(folder, texts, labels, names=None):
    """A folder as `datasets`' save_to_disk writes one: Arrow stream files listed in state.json,
    the features (a ClassLabel with its names) in dataset_info.json."""
    folder.mkdir()
    table = pa.table({"text": texts, "label": labels})
    with pa.OSFile(str(folder / "data-00000-of-00001.arrow"), "wb") as sink:
        with pa.ipc.new_stream(sink, table.schema) as w:
            w.write_table(table)
    (folder / "state.json").write_text(json.dumps({"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}))
    label_feature = {"_type": "ClassLabel", "names": names} if names else {"_type": "Value", "dtype": "int64"}
    (folder / "dataset_info.json").write_text(json.dumps({"features": {"text": {"_type": "Value", "dtype": "string"},
                                                                       "label": label_feature}}))
    return folder


def cfg(train, val="", **task_kw):
    c = config_mod.load(None, ["task.kind=classify", f"task.train_file={train}", "model.block_size=8"]
                        + ([f"task.validation_file={val}"] if val else []))
    for k, v in task_kw.items():
        setattr(c.task, k, v)
    return c


def test_every_format_reads_the_same_examples(tmp_path):
    want = labelled.prepare(cfg(write_jsonl(tmp_path / "a.jsonl", ROWS)))
    pq.write_table(pa.table({"text": [t for t, _ in ROWS], "label": [lab for _, lab in ROWS]}), tmp_path / "a.parquet")
    (tmp_path / "a.json").write_text(json.dumps([{"text": t, "label": lab} for t, lab in ROWS]))
    for path in (write_csv(tmp_path / "a.csv", ROWS), write_csv(tmp_path / "a.tsv", ROWS, "\t"),
                 tmp_path / "a.parquet", tmp_path / "a.json"):
        got = labelled.prepare(cfg(path))
        assert got.labels == want.labels == ["neg", "neutral", "pos"], path
        for a, b in ((got.train, want.train), (got.val, want.val)):
            np.testing.assert_array_equal(a.ids, b.ids)
            np.testing.assert_array_equal(a.labels, b.labels)
            np.testing.assert_array_equal(a.lengths, b.lengths)


def test_saved_dataset_folder_with_class_label_names(tmp_path):
    folder = write_saved_dataset(tmp_path / "ds", ["good", "bad", "meh"], [1, 0, 2], names=["neg", "pos", "mid"])
    records, names = labelled.read(folder, "text", "label")
    assert names == ["neg", "pos", "mid"] and [r[1:] for r in records] == [("good", 1), ("bad", 0), ("meh", 2)]
    d = labelled.prepare(cfg(folder, folder))
    assert d.labels == ["neg", "pos", "mid"] and d.val.labels.tolist() == [1, 0, 2]
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(HvdllmError, match=r"DatasetDict with splits train, test: point .*/dd/train"):
        labelled.read(tmp_path / "dd", "text", "label")


def test_label_maps(tmp_path):
    # strings: sorted, positions are ids
    assert labelled.prepare(cfg(write_jsonl(tmp_path / "s.jsonl", ROWS))).labels == ["neg", "neutral", "pos"]
    # integers (and CSV's digit strings) are the ids themselves: 10 sorts after 2
    ints = [(f"t{i}", i) for i in (0, 2, 10, 1)]
    assert labelled.prepare(cfg(write_jsonl(tmp_path / "i.jsonl", ints))).labels == [str(i) for i in range(11)]
    d = labelled.prepare(cfg(write_csv(tmp_path / "i.csv", ints), write_csv(tmp_path / "v.csv", ints[:2])))
    assert d.train.labels.tolist() == [0, 2, 10, 1] and d.val.labels.tolist() == [0, 2]
    # task.labels fixes the names and their order; integer labels index it
    given = write_jsonl(tmp_path / "g.jsonl", [("x", "b"), ("y", 0), ("z", "a")])
    d = labelled.prepare(cfg(given, given, labels=["a", "b"]))
    assert d.labels == ["a", "b"] and d.train.labels.tolist() == d.val.labels.tolist() == [1, 0, 0]
    # the map is the run's: task.resolve records it, num_labels follows
    c = task.resolve(cfg(tmp_path / "s.jsonl"), ["neg", "neutral", "pos"])
    assert c.task.num_labels == 3 and c.task.labels == ["neg", "neutral", "pos"]


def test_tokenised_truncated_and_padded(tmp_path):
    d = labelled.prepare(cfg(write_jsonl(tmp_path / "t.jsonl", [("abcdefghijk", "x"), ("hi", "y")])))
    tok = ByteTokenizer()
    x, y = d.train.batch([0])   # one of the two held out for validation (no task.validation_file)
    both = {tuple(r) for r in np.concatenate([d.train.ids, d.val.ids]).tolist()}
    assert tuple(tok.encode("abcdefgh")) in both                     # cut to block_size = 8
    assert tuple(tok.encode("hi") + [0] * 6) in both                  # right-padded with 0
    assert x.dtype == y.dtype == np.int64 and x.shape == (1, 8) and y.shape == (1, 2)
    assert len(d.train) == len(d.val) == 1
    assert sorted(np.concatenate([d.train.lengths, d.val.lengths]).tolist()) == [2, 8]


def text_file(name, content):
    return lambda tmp: (tmp / name).write_text(content) and tmp / name


# case: (training file maker, validation file maker or None, the message, {f}: the file it names)
BAD = {
    "missing_field": (text_file("m.jsonl", '{"text": "a", "label": "x"}\n\n{"txt": "b", "label": "y"}\n'), None,
                      r"{f}, line 3: no 'text' field \(set task.text_field"),
    "missing_column": (text_file("m.csv", "body,label\nhello,x\n"), None,
                       r"{f}, line 1: the header has no column 'text' \(columns: body, label\)"),
    "unknown_label": (lambda tmp: write_jsonl(tmp / "t.jsonl", ROWS),
                      lambda tmp: write_jsonl(tmp / "v.jsonl", [("ok", "pos"), ("hm", "positive")]),
                      r"{f}, line 2: unknown label 'positive' \(the training data's labels: neg, neutral, pos\)"),
    "empty_file": (text_file("e.csv", "text,label\n"), None, r"{f}: no examples \(the file is empty\)"),
    "empty_text": (lambda tmp: write_csv(tmp / "t.csv", [("fine", "a"), ("", "b")]), None,
                   r"{f}, line 3: the text is empty"),
    "bad_json": (text_file("b.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", label: y}\n'), None,
                 r"{f}, line 2: not a JSON object"),
    "empty_label": (lambda tmp: write_csv(tmp / "l.csv", [("fine", "a"), ("ok", " ")]), None,
                    r"{f}, line 3: the 'label' field is empty"),
    "unknown_format": (text_file("data.xlsx", "x"), None, r"{f}: unknown format '.xlsx': pass JSONL"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_data_names_the_file_and_line(tmp_path, case):
    make_train, make_val, want = BAD[case]
    train = make_train(tmp_path)
    val = make_val(tmp_path) if make_val else ""
    with pytest.raises(HvdllmError) as e:
        labelled.prepare(cfg(train, val))
    message = str(e.value)
    assert len(message.splitlines()) == 1, message                  # one message
    assert re.search(want.format(f=re.escape(str(val or train))), message), message


def test_sampler_is_rank_disjoint_and_equals_one_process():
    n = 101
    ex = labelled.Examples(np.arange(n)[:, None].repeat(4, 1), np.arange(n) % 3, np.full(n, 4))
    for dp in (2, 4):
        for step in (0, 5, 13, 40):   # 40: past the first epoch (a new permutation)
            one = labelled.ExampleSampler(ex, 4 * dp, 1, 0, seed=3).batch(step)[0][:, 0]
            parts = [labelled.ExampleSampler(ex, 4, dp, r, seed=3).batch(step)[0][:, 0] for r in range(dp)]
            got = np.concatenate(parts)
            assert len(set(got.tolist())) == len(got) == 4 * dp
            assert sorted(got.tolist()) == sorted(one.tolist())
    with pytest.raises(HvdllmError, match="fewer than one global batch"):
        labelled.ExampleSampler(ex, 60, 2, 0, seed=0)


def test_config_rules(tmp_path):
    good = write_jsonl(tmp_path / "train.jsonl", ROWS)
    base = ["task.kind=classify", f"task.train_file={good}"]

    def problems(*sets, world=None):
        with pytest.raises(ConfigError) as e:
            config_mod.validate(config_mod.load(None, [*base, *sets]), world)
        return str(e.value)
    assert config_mod.validate(config_mod.load(None, base)).task.kind == "classify"
    assert config_mod.validate(config_mod.load(None, [*base, "parallel.tp=2"]), 2).parallel.tp == 2
    assert config_mod.validate(config_mod.load(None, [*base, "parallel.pp=2"]), 2).parallel.pp == 2
    assert config_mod.validate(config_mod.load(None, [*base, "roles.evaluators=1"]), 2).roles.evaluators == 1
    assert "roles.generators: a classifier has no language-model output" in problems("roles.generators=1", world=2)
    assert "task.pooling: 'max' is not one of 'last', 'mean'" in problems("task.pooling=max")
    assert "task.validation_file: /nowhere.csv does not exist" in problems("task.validation_file=/nowhere.csv")
    assert "data.tokenizer: task.kind = 'classify' tokenises with the byte tokenizer" in problems("data.tokenizer=bpe")
    assert "ps.servers: not combinable" in problems("ps.servers=1", world=2)
    with pytest.raises(ConfigError, match="only task.kind = 'classify' reads them"):
        config_mod.validate(config_mod.load(None, [f"task.train_file={good}"]))
    with pytest.raises(ConfigError, match="task.class_weights: 2 weights for 3 labels"):
        task.resolve(cfg(good, class_weights=[1.0, 2.0]), ["a", "b", "c"])
    with pytest.raises(ConfigError, match="task.num_labels: 2 but task.train_file has 3 labels"):
        task.resolve(cfg(good, num_labels=2), ["a", "b", "c"])
