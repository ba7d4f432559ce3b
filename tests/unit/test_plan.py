"""`hvdllm plan` (hvdllm/plan.py): every layout it proposes is one `hvdllm train` accepts, the
commands it prints parse back to exactly that layout, it ranks by predicted step time with the
layouts that fit first, and its time terms are the formulas it states."""
import json
import shlex

import pytest

from hvdllm import cli, memory, plan
from hvdllm import config as config_mod
from hvdllm.errors import ConfigError

SMALL = ["model.n_layer=4", "model.n_embd=64", "model.n_head=4", "model.block_size=64", "model.vocab_size=256",
         "train.batch_size=4"]


def small_cfg(sets=()):
    return config_mod.load(None, [*SMALL, *sets])


@pytest.mark.parametrize("nodes, g", [(1, 4), (2, 4), (3, 2)])
def test_every_proposed_layout_passes_trains_validation(nodes, g):
    cfg = small_cfg()
    system = plan.load_calibration()
    results, counts = plan.plan(cfg, nodes, g, system, global_batch=4 * nodes * g)
    assert results and counts["invalid"] > 0          # validation refused some (tp=8 > heads, ...)
    for r in results:
        c = plan.apply(cfg, r["candidate"])
        config_mod.validate(c, nodes * g)             # raises if `hvdllm train` would refuse it
        assert r["candidate"].dp * r["candidate"].pp * r["candidate"].tp == nodes * g
        assert r["tokens_per_step"] == 4 * nodes * g * cfg.model.block_size
    # ZeRO-2/3 inside pipeline stages (zero_sharded.ShardedStageBase) validate, so they are proposed
    assert any(r["candidate"].pp > 1 and r["candidate"].dp > 1 and r["candidate"].zero >= 2 for r in results)


def test_refused_layouts_are_never_proposed():
    """n_head=4: tp=8 is refused by validation, so no tp=8 layout appears on 8-device nodes."""
    cfg = small_cfg()
    results, _ = plan.plan(cfg, 1, 8, plan.load_calibration(), global_batch=32)
    assert {r["candidate"].tp for r in results} <= {1, 2, 4}
    with pytest.raises(ConfigError):
        config_mod.validate(plan.apply(cfg, plan.Candidate(1, 1, 8, 0, 4, 8)), 8)


def test_ranked_by_step_time_fitting_first(tmp_path):
    """A device too small for the replicated layouts: the ones that fit come first, each group in
    order of predicted step time, and what does not fit is marked."""
    data = json.loads(plan.DEFAULTS.read_text())
    cfg = small_cfg(["model.n_layer=8", "model.n_embd=256", "model.block_size=128"])
    whole = memory.rank_memory(plan.apply(cfg, plan.Candidate(1, 1, 1, 0, 4, 1)), 1)["device"]
    data["devices"]["h100-sxm"]["memory_bytes"] = whole     # less than that after the reserve
    path = tmp_path / "cal.json"
    path.write_text(json.dumps(data))
    results, counts = plan.plan(cfg, 1, 4, plan.load_calibration(str(path)), global_batch=16)
    fits = [r["fits"] for r in results]
    assert any(fits) and not all(fits) and counts["too_big"] == fits.count(False)
    assert fits == sorted(fits, reverse=True)
    for group in (True, False):
        times = [r["step_s"] for r in results if r["fits"] is group]
        assert times == sorted(times)
    assert all(r["memory"]["device"] <= r["capacity"] for r in results if r["fits"])


def test_time_terms_are_the_stated_formulas():
    link = plan.Link("x", bandwidth=10e9, latency_s=1e-5, efficiency=0.5)
    assert plan.ring_allreduce_s(1e9, 4, link) == pytest.approx(2 * 3 / 4 * 1e9 / 5e9 + 6 * 1e-5)
    assert plan.ring_half_s("allgather", 1e9, 4, link) == pytest.approx(3 / 4 * 1e9 / 5e9 + 3 * 1e-5)
    assert plan.ring_allreduce_s(1e9, 1, link) == 0.0
    cfg = small_cfg()
    system = plan.load_calibration()
    cand = plan.Candidate(dp=2, pp=2, tp=1, zero=0, micro=1, k=4)
    r = plan.predict(plan.apply(cfg, cand), cand, system, 8)
    assert r["bubble"] == pytest.approx(1 / 5)          # (p-1)/(m+p-1)
    slow = r["stages"][r["slow_stage"]]
    assert r["pipeline_s"] == pytest.approx(4 * slow["t_mb"] / (1 - 1 / 5))
    grads = 4 * r["memory"]["psi"]
    assert r["dp"]["allreduce"] == pytest.approx(plan.ring_allreduce_s(grads, 2, system.intra))
    assert r["step_s"] == pytest.approx(r["pipeline_s"] + r["dp_s"] + r["tied_s"] + r["optimizer_s"])
    z = plan.Candidate(dp=2, pp=2, tp=1, zero=1, micro=1, k=4)
    rz = plan.predict(plan.apply(cfg, z), z, system, 8)
    assert rz["dp"]["reducescatter"] == pytest.approx(plan.ring_half_s("reducescatter", grads, 2, system.intra))
    # a dp group over 2 nodes takes the network's link
    far = plan.predict(plan.apply(cfg, cand), cand, system, 2)
    assert far["links"]["dp"] == system.inter.name and far["dp_s"] > r["dp_s"]


def _printed_commands(out: str) -> list[list[str]]:
    return [shlex.split(line.strip()) for line in out.splitlines() if line.strip().startswith("hvdllm launch")]


def test_printed_commands_parse_back_to_the_layout(tmp_path, capsys):
    conf = tmp_path / "small.toml"
    conf.write_text(config_mod.to_toml(small_cfg()))
    assert cli.main(["plan", str(conf), "--nodes", "2", "--devices-per-node", "2", "--top", "4", "--explain",
                     "--plot", str(tmp_path / "plan.png"), "--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out
    cmds = _printed_commands(out)
    assert len(cmds) == 8 and "step: " in out and (tmp_path / "plan.png").stat().st_size > 0
    best = json.loads((tmp_path / "plan.json").read_text())["layouts"][0]["candidate"]
    for argv in cmds:
        la = cli.parser().parse_args(argv[1:])
        assert la.cmd == "launch" and la.np == 4
        assert la.launcher in ("mpirun", "sbatch") and (la.launcher != "sbatch" or la.nodes == 2)
        train_argv = la.command[1:] if la.command[0] == "--" else la.command
        ta = cli.parser().parse_args(train_argv)
        cfg = config_mod.validate(config_mod.load(ta.config, ta.set), la.np)
        assert cfg.parallel.dp * cfg.parallel.pp * cfg.parallel.tp == 4
    first = cli.parser().parse_args(cmds[0][1:])
    cfg = config_mod.load(first.command[2], cli.parser().parse_args(first.command[1:]).set)
    assert (cfg.parallel.dp, cfg.parallel.pp, cfg.parallel.tp, cfg.parallel.zero) == \
        (best["dp"], best["pp"], best["tp"], best["zero"])


@pytest.mark.parametrize("conf, nodes", [("configs/gpt2_124m.toml", 1), ("configs/llama7b.toml", 64)])
def test_the_issues_tables_print(conf, nodes, capsys):
    """GPT-2 124M and the 7B Llama shape on nodes of 8 devices: a ranked table whose best layout fits."""
    assert plan.main([conf, "--nodes", str(nodes), "--devices-per-node", "8", "--top", "3",
                      "--precision", "bf16"]) == 0
    out = capsys.readouterr().out
    assert "tokens/s" in out and len(_printed_commands(out)) == 6
    table = [line for line in out.splitlines() if line[:2] in ("1 ", "2 ", "3 ")]
    assert len(table) == 3 and all(line.rstrip().endswith("yes") for line in table)


def test_calibration_errors_say_what_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="--system"):
        plan.load_calibration(system="nope")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(ConfigError, match="bench calibrate"):
        plan.load_calibration(str(bad))


def test_the_planned_precision_is_in_the_command(tmp_path, capsys):
    conf = tmp_path / "small.toml"
    conf.write_text(config_mod.to_toml(small_cfg()))
    assert plan.main([str(conf), "--nodes", "1", "--devices-per-node", "2", "--top", "1", "--precision", "bf16"]) == 0
    for argv in _printed_commands(capsys.readouterr().out):
        la = cli.parser().parse_args(argv[1:])
        ta = cli.parser().parse_args(la.command[1:])
        assert config_mod.load(ta.config, ta.set).train.precision == "bf16"
