"""Smoke test of `hvdllm bench dp`: it runs end to end and writes the expected JSON.

Not a timing test: timings on shared CI machines mean nothing, so no speed is asserted here.
"""
import json
import re
import sys

import horovod.torch  # noqa: F401  (installed by make env)
from launch_util import run

from hvdllm.bench import common


def test_table_flags_a_speedup_above_the_rank_count():
    rows = [{"np": 2, "speedup": 1.5}, {"np": 2, "speedup": 2.4}, {"np": 2, "speedup": None}]
    text = common.format_table(rows, ["np", "speedup"], {"speedup": lambda r: r["np"]})
    assert "2.4000!" in text and "1.5000!" not in text and text.splitlines()[-1] == common.ABOVE_NOTE
    assert common.ABOVE_NOTE not in common.format_table(rows[:1], ["np", "speedup"], {"speedup": 2})


def test_interleaved_solo_turns_end_in_the_idle_barrier():
    calls = []
    fns = {"a": lambda: calls.append("a"), "solo": None}  # solo: this rank is not the one timed
    times = common.interleaved(fns, 2, warmup=1, per_round=1, before=lambda: calls.append("|"),
                               solo=["solo"], idle=lambda: calls.append("idle"))
    assert len(times["a"]) == 2 and times["solo"] == []
    assert calls == ["|", "a", "|", "idle"] * 3  # warm-up, then two rounds


def test_bench_dp_smoke(tmp_path):
    out = tmp_path / "dp.json"
    argv = [sys.executable, "-m", "hvdllm", "bench", "dp", "--np", "2", "--steps", "2", "--warmup",
            "1", "--model", "tiny", "--backends", "torch", "--out", str(out)]
    # two launches (np=2, np=1); < 30 s on an idle 2-core machine, the deadline allows for load
    p = run(argv, timeout=150)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "mpirun -np 2" in p.stdout and "mpirun -np 1" in p.stdout  # commands are printed
    assert "median step s" in p.stdout and "hvdllm/hand" in p.stdout  # the table and the goals
    for variant, np_ in (("hvdllm", 2), ("hand", 2), ("ddp", 2), ("solo", 1), ("hvdllm", 1)):
        assert re.search(rf"^torch +{variant} +{np_} ", p.stdout, re.M), variant  # a row each

    d = json.loads(out.read_text())
    for key in ("benchmark", "model", "params", "commands", "runs", "rows", "ratios", "goals"):
        assert key in d, key
    assert d["benchmark"] == "dp" and d["model"] == "tiny" and d["failed"] == []
    assert sorted((r["backend"], r["np"]) for r in d["runs"]) == [("torch", 1), ("torch", 2)]
    for r in d["runs"]:
        # np=2 adds 'solo': rank 0 alone, interleaved in the same group (np=1 time for scaling)
        assert set(r["variants"]) == {"hvdllm", "hand", "ddp"} | ({"solo"} if r["np"] == 2 else set())
        for name, v in r["variants"].items():
            assert v["n"] == 2 and v["median_s"] > 0 and v["tokens_per_s"] > 0
            assert len(v["rank_medians_s"]) == (1 if name == "solo" else r["np"])
        # every variant did the same arithmetic: same weights after the same steps
        for key in ("weights_rel_diff_after_warmup", "weights_rel_diff_vs_first"):
            agree = r[key]
            assert set(agree) == {"hand", "ddp"} and max(agree.values()) < 1e-5, (key, agree)
    rat = d["ratios"]["torch"]
    assert {"hvdllm/hand", "hvdllm/ddp", "scaling_efficiency", "scaling_efficiency_in_group"} <= set(rat)
    assert set(rat["scaling_efficiency"]) == {"hvdllm", "hand", "ddp"}
    assert set(rat["scaling_efficiency_in_group"]) == {"hvdllm", "hand", "ddp"}
    assert {(g["goal"]) for g in d["goals"]} >= {"hvdllm/hand", "hvdllm/ddp"}
    above = any(v is not None and v > 1 for g in d["goals"] if "scaling eff" in g["goal"]
                for v in (g["value"], g["paired"]))  # an efficiency above 1 is flagged
    assert (common.ABOVE_NOTE in p.stdout) == above
    assert (tmp_path / "dp.png").stat().st_size > 0


def test_bench_dp_tensorflow_hand_loop_is_the_same_arithmetic(tmp_path):
    """The TF hand-written loop computes torch's update (clip factor, float64 step scalars, a
    trace for any batch shape): after the same steps its weights equal hvdllm's bit for bit, as
    the torch variants' do. (With tf.clip_by_global_norm they differed by 1e-7 after the warm-up
    and 5e-2 after 30 medium steps.)"""
    out = tmp_path / "dp.json"
    p = run([sys.executable, "-m", "hvdllm", "bench", "dp", "--np", "2", "--steps", "3", "--warmup", "1",
             "--model", "tiny", "--backends", "tensorflow", "--no-scaling", "--no-plot", "--out", str(out)],
            timeout=150)
    assert p.returncode == 0, p.stdout[-4000:]
    assert "same arithmetic, bit for bit" in p.stdout, p.stdout[-4000:]
    (r,) = json.loads(out.read_text())["runs"]
    assert r["weights_rel_diff_after_warmup"] == r["weights_rel_diff_vs_first"] == {"hand": 0.0}
