"""LoRA (finetune.lora_rank, hvdllm/lora.py) through `hvdllm train` and `hvdllm convert`: a base
run, then a LoRA run on it (train.init_from) at np=2 (ZeRO-3) and the same at np=1 (ZeRO-2) that fails after its
step-3 checkpoint and is resumed (the base read again from train.init_from, the adapters from
the checkpoint): the np=1 run's losses and gradient norms are the np=2 run's, the checkpoints
hold only the adapters and name their exact base (a resume onto another is refused), and
`convert --merge-lora` (.npz and --to-hf) writes base + s A^T B^T,
which is also what `hvdllm generate` / `predict` load from a LoRA run.
Five short launches; the layouts' equality to one process in detail, both frameworks:
test_classify.py's launch and tests/unit/test_lora.py."""
import json
from pathlib import Path

import numpy as np
import pytest

LORA = ["finetune.lora_rank=4", 'finetune.lora_targets=["attn.c_attn","mlp.c_proj"]', "optim.grad_clip=0.05",
        "train.sample_tokens=0", "train.eval_every=0"]


@pytest.mark.integration
def test_lora_train_resume_and_merge(tmp_path):
    from launch_util import TINY, hvdllm, records, same_run, train

    from hvdllm import checkpoint, cli, lora
    from hvdllm import config as config_mod
    r, base = train(tmp_path, "base", sets=["train.sample_tokens=0", "train.eval_every=0"])
    assert r.returncode == 0, r.stdout[-3000:]
    sets = [*LORA, f"train.init_from={base}"]
    # the np=2 run under ZeRO-3, the np=1 one under ZeRO-2 (zero_sharded.units_for: the adapters
    # sharded, the base whole): the trainer's path there (train.init_from into the sharded
    # engine, sharded checkpoints of the adapters, their resume, merge from them)
    r, ref = train(tmp_path, "np2", np_=2, sets=[*sets, "train.batch_size=4", "parallel.zero=3"])
    assert r.returncode == 0, r.stdout[-3000:]
    out = tmp_path / "np1"
    one = [*sets, "train.batch_size=8", "train.fail_at_step=4", "train.resume=true", "parallel.zero=2"]
    r, _ = train(tmp_path, "np1", sets=one)
    assert r.returncode != 0 and "injected failure at step 4" in r.stdout, r.stdout[-3000:]
    args = ["train"] + [a for kv in [*TINY, f"train.out_dir={out}", *one] for a in ("--set", kv)]
    r = hvdllm(1, args, HVDLLM_ATTEMPT=1)   # a relaunch: the injected failure is the first attempt's
    assert r.returncode == 0 and "resumed from" in r.stdout and "(step 3)" in r.stdout, r.stdout[-3000:]
    assert [x["step"] for x in records(out) if "loss" in x][-3:] == [4, 5, 6]
    same_run(out, ref, rtol=1e-5, keys=("loss", "grad_norm"), what="LoRA np=1 ZeRO-2 resumed vs np=2 ZeRO-3")
    # a resume onto another base (a copy elsewhere stands for a base that moved on) is refused
    import shutil
    shutil.copytree(base, tmp_path / "other_base")
    moved = [*TINY, f"train.out_dir={out}", *one, f"train.init_from={tmp_path / 'other_base'}"]   # the last wins
    r = hvdllm(1, ["train"] + [a for kv in moved for a in ("--set", kv)], HVDLLM_ATTEMPT=1)
    assert r.returncode != 0 and "adapters were trained on the base" in r.stdout, r.stdout[-3000:]
    norms = [x["grad_norm"] for x in records(ref) if "grad_norm" in x]
    print("LoRA np=2 grad norms", norms)
    assert max(norms) > 0.05   # clipping acted

    # the checkpoint: adapters and their moments only (the base stays in the base run)
    state, meta = checkpoint.load(checkpoint.latest(out))
    cfg = config_mod.from_dict(meta["config"])
    assert meta["lora_base"] == str(checkpoint.latest(base).resolve())   # the exact base it was trained on
    assert {k for k in state if not k.startswith("optim.")} == set(lora.adapter_shapes(cfg))
    base_state, _ = checkpoint.load(checkpoint.latest(base))
    want = lora.merge(base_state, state, cfg)

    assert cli.main(["convert", str(out), str(tmp_path / "merged.npz"), "--merge-lora"]) == 0
    with np.load(tmp_path / "merged.npz") as z:
        merged = {k: z[k] for k in z.files if k != "__meta__"}
        assert json.loads(str(z["__meta__"]))["config"]["finetune"]["lora_rank"] == 0   # a plain model
    assert sorted(merged) == sorted(want)
    for k, w in want.items():
        np.testing.assert_array_equal(merged[k], w, err_msg=k)
        same = np.array_equal(w, np.asarray(base_state[k]))
        assert same == (k not in lora.targets(cfg)), k   # exactly the targets moved
    assert cli.main(["convert", str(out), "--to-hf", str(tmp_path / "hf"), "--merge-lora"]) == 0
    from safetensors.numpy import load_file
    hf = load_file(str(Path(tmp_path) / "hf" / "model.safetensors"))
    np.testing.assert_array_equal(hf["transformer.h.1.mlp.c_proj.weight"], want["h.1.mlp.c_proj.weight"])
    assert cli.main(["convert", str(base), str(tmp_path / "x.npz"), "--merge-lora"]) != 0   # not a LoRA run
    # hvdllm generate / predict read a LoRA run as its merged model
    from argparse import Namespace

    from hvdllm.generate import generate_inputs
    gcfg, _, gstate, _, _ = generate_inputs(Namespace(out_dir=str(out), backend=None))
    assert gcfg.finetune.lora_rank == 0 and sorted(gstate) == sorted(want)
    assert all(np.array_equal(gstate[k], w) for k, w in want.items())

