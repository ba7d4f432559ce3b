"""`hvdllm bench hf` end to end on tiny models (timings on a shared machine mean nothing, so none
is asserted): the import rows for np=1 and 2 of a GPT-2 whose 509 ids no tp divides (imported
padded to 512 rows, model.vocab_multiple), and the step rows of a gpt2 and a llama whose
parameter counts agree."""
import json
import sys

import pytest
from launch_util import run


@pytest.mark.integration
def test_bench_hf_smoke(tmp_path):
    out = tmp_path / "hf.json"
    p = run([sys.executable, "-m", "hvdllm", "bench", "hf", "--models", "gpt2-tiny", "--np", "1,2",
             "--width", "32", "--layers", "1", "--steps", "2", "--warmup", "1", "--out", str(out)], timeout=300)
    assert p.returncode == 0, p.stdout[-4000:]
    d = json.loads(out.read_text())
    assert [(r["model"], r["np"]) for r in d["import"]] == [("gpt2-tiny", 1), ("gpt2-tiny", 2)]
    one, two = d["import"]
    assert one["params"] == two["params"] == 104_192 + 512 * 64   # the padded table at both
    assert two["param_mib"] < one["param_mib"]   # tp=2 halves the matrices
    gpt, llama = d["step"]
    assert (gpt["family"], llama["family"]) == ("gpt2", "llama")
    assert abs(llama["params"] / gpt["params"] - 1) < 0.02 and llama["median_s"] > 0
