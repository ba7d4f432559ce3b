"""model.family = "llama" (hvdllm/params.py): torch and TensorFlow compute the same logits from the
same parameters, and both compute what Hugging Face's LlamaForCausalLM computes on the same weights
(a tiny random model built by `transformers` itself, no network); the names, shapes, layer lists,
tensor-parallel plan and configuration rules of the family; GPT-2 unchanged."""
import horovod.tensorflow  # noqa: F401  (installed by make env)
import horovod.torch  # noqa: F401  (installed by make env)
import numpy as np
import pytest
import tensorflow as tf
import torch

import tf_backend
import torch_backend
from hvdllm import config as config_mod
from hvdllm import params
from hvdllm.config import ModelConfig
from hvdllm.errors import ConfigError
from hvdllm.strategies import tensor_parallel as tp_plan

V, T = 64, 16
CASES = {  # name: ModelConfig settings beyond the family's
    "gqa_tied": dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=80),
    "mqa_untied_theta": dict(n_layer=2, n_embd=32, n_head=4, n_kv_head=1, ffn_hidden=48,
                             tie_embeddings=False, rope_theta=500000.0, norm_eps=1e-6),
    "mha_default_ffn": dict(n_layer=1, n_embd=48, n_head=3),
}


def llama(**kw) -> ModelConfig:
    return ModelConfig(family="llama", block_size=T, vocab_size=V, **kw)


def ids(seed=0, b=2, t=T):
    return np.random.default_rng(seed).integers(0, V, (b, t))


def torch_logits(m, values, x):
    model = torch_backend.GPT(m, 0).eval()
    with torch.no_grad():
        for n, p in model.named():
            p.copy_(torch.from_numpy(values[n]))
        return model(torch.from_numpy(x)).double().numpy()


def tf_logits(m, values, x):
    model = tf_backend.GPT(m, 0)
    for n, v in model.params.items():
        v.assign(values[n])
    return np.asarray(model(tf.constant(x)), np.float64)


def hf_model(m: ModelConfig, seed=0):
    """A random LlamaForCausalLM of this shape, its weights drawn larger than HF's init (attention
    patterns and norms far from trivial), and the same weights under hvdllm's names."""
    from transformers import LlamaConfig, LlamaForCausalLM
    hc = LlamaConfig(vocab_size=m.vocab_size, hidden_size=m.n_embd, intermediate_size=params.ffn_hidden(m),
                     num_hidden_layers=m.n_layer, num_attention_heads=m.n_head,
                     num_key_value_heads=params.kv_heads(m), max_position_embeddings=m.block_size,
                     rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta, tie_word_embeddings=m.tie_embeddings,
                     attention_bias=False, mlp_bias=False, hidden_act="silu")
    torch.manual_seed(seed)
    model = LlamaForCausalLM(hc).eval().float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:
                p.copy_(1.0 + 0.2 * torch.randn_like(p))
            else:
                p.normal_(0.0, 0.3 if "embed" in name else 0.15)
    sd = model.state_dict()
    values = {ours: np.ascontiguousarray((sd[key].T if t else sd[key]).numpy().astype(np.float32))
              for ours, (key, t) in params.hf_llama_names(m).items()}
    return model, values


def rel(a, b) -> float:
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.mark.parametrize("case", list(CASES))
def test_torch_and_tensorflow_equal_transformers(case):
    m = llama(**CASES[case])
    hf, values = hf_model(m)
    assert set(values) == set(params.param_shapes(m))
    for n, shape in params.param_shapes(m).items():
        assert values[n].shape == shape, n
    # HF read our rotary settings (its config may spell rope_theta elsewhere)
    np.testing.assert_allclose(hf.model.rotary_emb.inv_freq.numpy(), params.rope_inv_freq(m), rtol=1e-6)
    x = ids(1)
    with torch.no_grad():
        want = hf(input_ids=torch.from_numpy(x)).logits.double().numpy()
    a, b = torch_logits(m, values, x), tf_logits(m, values, x)
    # elementwise rtol 1e-5 with an atol of 1e-5 of the logits' scale (logits near 0 have no
    # relative precision), and the largest difference relative to that scale
    scale = float(np.max(np.abs(want)))
    for got, what in ((a, "torch"), (b, "tensorflow")):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * scale, err_msg=f"{what} vs transformers")
        assert rel(got, want) <= 1e-5, (what, rel(got, want))
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5 * scale, err_msg="torch vs tensorflow")
    print(f"{case}: max relative difference to transformers: torch {rel(a, want):.2e}, "
          f"tensorflow {rel(b, want):.2e}")


def test_same_initial_weights_logits_and_loss_in_both_frameworks():
    m = llama(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, tie_embeddings=False)
    tm, fm = torch_backend.GPT(m, 7), tf_backend.GPT(m, 7)
    assert [n for n, _ in tm.named()] == list(fm.params) == list(params.param_shapes(m))
    for n, p in tm.named():
        np.testing.assert_array_equal(p.detach().numpy(), fm.params[n].numpy(), err_msg=n)
    x, y = ids(2), ids(3)
    with torch.no_grad():
        a = tm(torch.from_numpy(x)).numpy()
        la = float(tm.loss(torch.from_numpy(x), torch.from_numpy(y)))
    b = fm(tf.constant(x)).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert abs(la - float(fm.loss(tf.constant(x), tf.constant(y)))) < 1e-5 * la


def test_causal_and_shorter_sequences():
    """A prefix's logits do not depend on later tokens (causal mask, positions from 0)."""
    m = llama(n_layer=1, n_embd=32, n_head=4, n_kv_head=2)
    values = params.init_params(m, 3)
    x = ids(4)
    full_t, short_t = torch_logits(m, values, x), torch_logits(m, values, x[:, :5])
    full_f, short_f = tf_logits(m, values, x), tf_logits(m, values, x[:, :5])
    np.testing.assert_allclose(short_t, full_t[:, :5], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(short_f, full_f[:, :5], rtol=1e-5, atol=1e-6)


def test_names_shapes_and_layers():
    m = llama(n_layer=3, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=80, tie_embeddings=False)
    s = params.param_shapes(m)
    assert list(s)[:1] == ["wte"] and "wpe" not in s and list(s)[-2:] == ["ln_f.weight", "lm_head"]
    assert not [n for n in s if n.endswith(".bias")]
    assert s["h.0.attn.q.weight"] == (32, 32) and s["h.0.attn.k.weight"] == (32, 16)
    assert s["h.0.attn.o.weight"] == (32, 32) and s["h.2.mlp.down.weight"] == (80, 32)
    assert s["lm_head"] == (V, 32)
    # pipeline layers: every parameter once, the head its own lm_head when untied
    layers = [params.layer_params(m, i) for i in range(params.n_layers(m))]
    assert layers[0] == ["wte"] and layers[-1] == ["ln_f.weight", "lm_head"]
    assert sorted(n for ls in layers for n in ls) == sorted(s)
    assert params.names_for_layers(m, range(params.n_layers(m))) == list(s)
    assert sum(params.layer_costs(m)) == params.count(m)
    tied = llama(n_layer=3, n_embd=32, n_head=4)
    assert params.layer_params(tied, 4)[-1] == "wte" and "lm_head" not in params.param_shapes(tied)
    # the HF table covers every parameter, with HF's keys
    hf = params.hf_llama_names(m)
    assert set(hf) == set(s)
    assert hf["h.1.attn.k.weight"] == ("model.layers.1.self_attn.k_proj.weight", True)
    assert hf["lm_head"] == ("lm_head.weight", False) and hf["ln_f.weight"] == ("model.norm.weight", False)
    # default MLP width: 8/3 C rounded up to 64
    assert params.ffn_hidden(llama(n_layer=1, n_embd=96, n_head=4)) == 256
    assert params.ffn_hidden(llama(n_layer=1, n_embd=768, n_head=12)) == 2048


def test_init_draws_and_untied_head_keeps_the_tied_values():
    m = llama(n_layer=2, n_embd=32, n_head=4, n_kv_head=2)
    a = params.init_params(m, 5)
    b = params.init_params(llama(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, tie_embeddings=False), 5)
    for n in a:
        np.testing.assert_array_equal(a[n], b[n], err_msg=n)
    assert np.all(a["h.0.ln_1.weight"] == 1) and np.all(a["ln_f.weight"] == 1)
    assert abs(a["h.0.attn.o.weight"].std() / a["h.0.attn.q.weight"].std() - 0.5) < 0.1   # 1/sqrt(2L)


def test_gpt2_unchanged():
    """The GPT-2 layout and its order, written out."""
    m = ModelConfig(n_layer=2, n_embd=32, n_head=4, block_size=T, vocab_size=V)
    block = [("ln_1.weight", (32,)), ("ln_1.bias", (32,)), ("attn.c_attn.weight", (32, 96)),
             ("attn.c_attn.bias", (96,)), ("attn.c_proj.weight", (32, 32)), ("attn.c_proj.bias", (32,)),
             ("ln_2.weight", (32,)), ("ln_2.bias", (32,)), ("mlp.c_fc.weight", (32, 128)),
             ("mlp.c_fc.bias", (128,)), ("mlp.c_proj.weight", (128, 32)), ("mlp.c_proj.bias", (32,))]
    want = [("wte", (V, 32)), ("wpe", (T, 32))] + [(f"h.{i}.{n}", s) for i in range(2) for n, s in block] \
        + [("ln_f.weight", (32,)), ("ln_f.bias", (32,))]
    assert list(params.param_shapes(m).items()) == want
    assert list(params.param_shapes(m))[:2] == ["wte", "wpe"]
    assert params.param_shapes(m)["h.1.mlp.c_fc.weight"] == (32, 128)
    assert params.layer_params(m, 0) == ["wte", "wpe"]
    assert params.layer_params(m, 3) == ["ln_f.weight", "ln_f.bias", "wte"]
    assert params.flops_per_token(m) == 6 * params.count(m) + 12 * 2 * 32 * T


def test_flops_per_token():
    m = llama(n_layer=2, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=80, tie_embeddings=False)
    block = 32 * 32 + 2 * 32 * 16 + 32 * 32 + 3 * 32 * 80 + 2 * 32
    matrices = 2 * block + 32 + V * 32            # the head multiplies; the untied wte is looked up
    assert params.flops_per_token(m) == 6 * matrices + 12 * 2 * 32 * T
    assert torch_backend.model.flops_per_token(m) == params.flops_per_token(m)


def test_tensor_parallel_plan():
    m = llama(n_layer=1, n_embd=32, n_head=4, n_kv_head=2, ffn_hidden=80, tie_embeddings=False)
    styles = {n: tp_plan.style(n) for n in params.param_shapes(m)}
    assert {n for n, s in styles.items() if s == "column"} == {
        "h.0.attn.q.weight", "h.0.attn.k.weight", "h.0.attn.v.weight", "h.0.mlp.gate.weight", "h.0.mlp.up.weight"}
    assert {n for n, s in styles.items() if s == "row"} == {"h.0.attn.o.weight", "h.0.mlp.down.weight"}
    assert styles["wte"] == styles["lm_head"] == "vocab" and styles["h.0.ln_1.weight"] == "replicate"
    full = params.init_params(m, 0)
    local = tp_plan.local_shapes(params.param_shapes(m), 2)
    assert local["h.0.attn.k.weight"] == (32, 8) and local["h.0.attn.o.weight"] == (16, 32)
    for n, a in full.items():   # rank r holds key/value head r: columns [8r, 8r+8) of k
        shards = [tp_plan.shard(n, a, 2, r) for r in range(2)]
        assert shards[0].shape == local[n], n
        np.testing.assert_array_equal(tp_plan.unshard(n, shards), a, err_msg=n)
    np.testing.assert_array_equal(tp_plan.shard("h.0.attn.k.weight", full["h.0.attn.k.weight"], 2, 1),
                                  full["h.0.attn.k.weight"][:, 8:])
    assert tp_plan.problems(m, 2) == []
    msgs = tp_plan.problems(llama(n_layer=1, n_embd=32, n_head=4, n_kv_head=1), 2)
    assert len(msgs) == 1 and msgs[0].startswith("model.n_kv_head:") and "split across tp ranks" in msgs[0]
    assert "model.ffn_hidden" in tp_plan.problems(llama(n_layer=1, n_embd=32, n_head=4, ffn_hidden=81), 2)[0]


def problems_of(*sets):
    cfg = config_mod.load(None, ["model.vocab_size=64", *sets])
    with pytest.raises(ConfigError) as e:
        config_mod.validate(cfg)
    return e.value.problems if hasattr(e.value, "problems") else [str(e.value)]


def test_config_rules():
    ok = config_mod.load(None, ["model.family=\"llama\"", "model.n_kv_head=2"])
    config_mod.validate(ok)
    config_mod.validate(config_mod.load(None, ["model.family=\"llama\"", "parallel.tp=2"]), world_size=2)
    cases = [
        (["model.family=\"llama\"", "model.n_kv_head=3"], "model.n_kv_head: 3 does not divide model.n_head=4"),
        (["model.family=\"llama\"", "model.n_embd=12", "model.n_head=4"], "model.n_head: the head dimension"),
        (["model.family=\"llama\"", "model.dropout=0.1"], "model.dropout: llama has no dropout"),
        (["model.family=\"llama\"", "model.rope_theta=0.0"], "model.rope_theta:"),
        (["model.n_kv_head=2"], "model.n_kv_head: only model.family = 'llama'"),
        (["model.rope_theta=500000.0"], "model.rope_theta: only model.family = 'llama'"),
        (["model.family=\"mamba\""], "model.family: 'mamba' is not one of 'gpt2', 'llama'"),
        (["model.norm_eps=0.0"], "model.norm_eps:"),
    ]
    for sets, want in cases:
        msg = "\n".join(map(str, problems_of(*sets)))
        assert want in msg, (sets, msg)
    msg = "\n".join(map(str, problems_of("model.family=\"llama\"", "model.n_kv_head=1", "parallel.tp=2")))
    assert "model.n_kv_head: parallel.tp=2 does not divide the 1 key/value heads" in msg
