"""The optimized model behaves like the model (DESIGN.md, "The artifact"): Hugging Face default configs, any batch
and length from an example of batch 1, the original call forms, training and gradients, dtype moves,
torch.compile, save/load and the original state_dict, sentence-transformers, MoE, quality budgets. References:
the original Hugging Face model with the same weights, and a fresh Python process."""
from __future__ import annotations

import json
import math
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnforge
from conftest import rel_err


def _llama(layers=2, **kw):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, **kw)
    return tf.LlamaForCausalLM(cfg).eval()  # the default config: use_cache=True, sdpa


def _default_config_lm(family: str):
    import transformers as tf

    torch.manual_seed(0)
    if family == "llama":
        return _llama()
    if family == "gpt2":
        return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=100, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                                bos_token_id=0, eos_token_id=0)).eval()
    return tf.Qwen2ForCausalLM(tf.Qwen2Config(vocab_size=100, hidden_size=64, intermediate_size=96,
                                              num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                              max_position_embeddings=512)).eval()


@pytest.fixture(scope="module")
def llama_from_batch_1():
    model = _llama()
    assert model.config.use_cache
    opt = attnforge.optimize(model, "exact", (torch.randint(0, 100, (1, 16)),))
    return model, opt


@pytest.mark.parametrize("family", ["llama", "gpt2", "qwen2"])
def test_default_config_causal_lms_are_fully_fused_from_a_batch_1_example(family):
    model = _default_config_lm(family)
    assert model.config.use_cache
    opt = attnforge.optimize(model, "exact", (torch.randint(0, 100, (1, 16)),))
    assert opt.report.counts() == {"fuse_attention": 2, "fuse_ffn": 2}, opt.report.to_text()
    assert opt.report.shapes == {"input_ids": ["B", "N"]} and opt.report.passed
    ids = torch.randint(0, 100, (3, 45))
    with torch.no_grad():
        assert rel_err(opt(ids).logits, model(ids).logits) <= 1e-5


@pytest.mark.parametrize("shape", [(3, 45), (1, 1), (2, 300)])
def test_any_batch_and_length_with_and_without_a_mask_keyword_or_positional(llama_from_batch_1, shape):
    model, opt = llama_from_batch_1
    torch.manual_seed(1)
    ids = torch.randint(0, 100, shape)
    mask = torch.ones(shape, dtype=torch.long)
    if shape[1] > 1:
        mask[0, :shape[1] // 3] = 0  # a left-padded row
    calls = [((ids,), {}), ((), {"input_ids": ids}), ((ids,), {"attention_mask": mask}),
             ((), {"input_ids": ids, "attention_mask": mask}), ((ids, mask), {}),
             ((ids,), {"return_dict": True, "use_cache": True})]
    with torch.no_grad():
        for args, kwargs in calls:
            want = model(*args, **kwargs).logits
            assert rel_err(opt(*args, **kwargs).logits, want) <= 1e-5, (args, list(kwargs))
        assert isinstance(opt(ids, return_dict=False), tuple)  # the flag is honoured: another capture
    assert len(opt.report.recaptures) <= 4  # one program per call form, not per call


def test_a_bare_qkv_module_is_rewritten():
    """Inputs that are q, k, v themselves: their head dim stays static, only batch and length are symbolic."""
    class Bare(nn.Module):
        def forward(self, q, k, v):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    q, k, v = (torch.randn(1, 4, 40, 16) for _ in range(3))
    recipe = {"steps": [{"rewrite": "sliding_window", "params": {"window": 8}}]}
    opt = attnforge.optimize(Bare(), recipe, (q, k, v))
    assert opt.report.counts() == {"sliding_window": 1}, opt.report.to_text()
    q2, k2, v2 = (torch.randn(2, 4, 33, 16) for _ in range(3))
    keep = torch.tensor([[0 <= i - j < 8 for j in range(33)] for i in range(33)])
    want = torch.softmax((q2 @ k2.transpose(-1, -2) / 4).masked_fill(~keep, -math.inf), -1) @ v2
    with torch.no_grad():
        assert rel_err(opt(q2, k2, v2), want) <= 1e-5


@pytest.mark.parametrize("recipe", ["exact", {"steps": [{"rewrite": "sliding_window", "params": {"window": 4}}]},
                                    {"steps": [{"rewrite": "block_sparse", "params": {"block": 8, "local": 1}}]},
                                    {"steps": [{"rewrite": "linear", "params": {"feature_map": "elu"}}]},
                                    {"steps": [{"rewrite": "gqa", "params": {"kv_heads": 1}}]}],
                         ids=["exact", "sliding_window", "block_sparse", "linear", "gqa"])
def test_backward_and_an_optimizer_step(recipe):
    model = _llama()
    ids = torch.randint(0, 100, (2, 16))
    opt = attnforge.optimize(model, recipe, (ids,)).train()
    loss = opt(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad for n, p in opt.named_parameters() if p.grad is not None}
    assert grads and all(torch.isfinite(g).all() for g in grads.values())
    if recipe == "exact":  # gradients equal the original model's, parameter by parameter
        ref = _llama().train()
        ref.load_state_dict(model.state_dict())
        ref(ids, labels=ids).loss.backward()
        want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
        assert set(want) <= set(grads)
        for n, g in want.items():
            assert rel_err(grads[n], g) <= 1e-4, n
    torch.optim.SGD(opt.parameters(), lr=0.5).step()
    with torch.no_grad():
        assert opt(ids, labels=ids).loss < loss


def test_training_mode_honours_dropout():
    """With attention dropout in training, the sites keep the model's own ops (dropout runs, with its backward)."""
    model = _llama(attention_dropout=0.5)
    ids = torch.randint(0, 100, (2, 16))
    opt = attnforge.optimize(model, "exact", (ids,))
    opt.train()
    torch.manual_seed(0)
    a = opt(ids).logits
    b = opt(ids).logits
    assert not torch.equal(a, b)  # dropout is on
    a.sum().backward()
    train = opt.report.recaptures[-1]
    assert train["counts"].get("fuse_attention", 0) == 0 and train["counts"]["fuse_ffn"] == 2
    opt.eval()
    with torch.no_grad():
        assert rel_err(opt(ids).logits, model(ids).logits) <= 1e-5


def test_torch_compile_inference_and_a_training_step():
    model = _llama(layers=1)
    ids = torch.randint(0, 100, (2, 16))
    opt = attnforge.optimize(model, "exact", (ids,))
    compiled = torch.compile(opt)  # inductor (a C++ compiler on CPU)
    with torch.no_grad():
        assert rel_err(compiled(ids).logits, model(ids).logits) <= 1e-5
    opt.train()
    loss = compiled(ids, labels=ids).loss
    loss.backward()
    assert all(p.grad is not None for p in opt.parameters() if p.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_a_dtype_move_after_optimize_equals_optimize_after_it(dtype):
    model = _llama()
    ids = torch.randint(0, 100, (2, 16))
    moved = attnforge.optimize(model, "exact", (ids,)).to(dtype)
    direct = attnforge.optimize(_llama().to(dtype), "exact", (ids,))
    with torch.no_grad():
        got, want = moved(ids).logits, direct(ids).logits
    assert got.dtype == dtype and torch.equal(got, want)
    assert moved.report.recaptures and moved.report.recaptures[-1]["counts"] == {"fuse_attention": 2, "fuse_ffn": 2}
    with torch.no_grad():
        half = moved.half() if dtype == torch.bfloat16 else moved.bfloat16()  # and once more
        assert half(ids).logits.dtype != dtype


def test_state_dict_has_the_original_names_and_an_original_checkpoint_loads():
    model = _llama()
    ids = torch.randint(0, 100, (2, 16))
    opt = attnforge.optimize(model, "exact", (ids,))
    assert set(opt.state_dict()) == set(model.state_dict())
    other = _llama()
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.01)
    opt.load_state_dict(other.state_dict())
    with torch.no_grad():
        assert rel_err(opt(ids).logits, other(ids).logits) <= 1e-5
    assert opt.config is model.config or opt.config.to_dict() == model.config.to_dict()


def test_save_then_load_in_a_fresh_process(tmp_path):
    model = _llama()
    ids = torch.randint(0, 100, (2, 16))
    opt = attnforge.optimize(model, {"steps": [{"rewrite": "gqa", "params": {"kv_heads": 1}},
                                                {"rewrite": "fuse_ffn"}]}, (ids,))
    path = attnforge.save(opt, tmp_path / "model.attnforge")
    torch.save(ids, tmp_path / "ids.pt")
    with torch.no_grad():
        torch.save(opt(ids).logits, tmp_path / "want.pt")
    script = (f"import torch, attnforge\nopt = attnforge.load({str(path)!r})\n"
              f"ids = torch.load({str(tmp_path / 'ids.pt')!r})\nwant = torch.load({str(tmp_path / 'want.pt')!r})\n"
              "with torch.no_grad():\n    got = opt(ids).logits\nprint(float((got - want).abs().max()), "
              "opt.report.counts())\n")
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    err, counts = p.stdout.strip().split(" ", 1)
    assert float(err) <= 1e-5 and "gqa" in counts
    with pytest.raises(TypeError, match="attnforge.save"):
        torch.save(opt, tmp_path / "pickled.pt")


def test_save_pretrained_writes_weights_config_and_recipe(tmp_path):
    from safetensors.torch import load_file

    model = _llama()
    opt = attnforge.optimize(model, "exact", (torch.randint(0, 100, (2, 16)),))
    out = opt.save_pretrained(tmp_path / "hf")
    assert set(load_file(str(out / "model.safetensors"))) == set(model.state_dict())
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 2
    assert json.loads((out / "attnforge.json").read_text())["recipe"]["name"] == "exact"


def test_minilm_through_sentence_transformers_keeps_encode(minilm_path):
    st_mod = pytest.importorskip("sentence_transformers")
    st = st_mod.SentenceTransformer(minilm_path, device="cpu")
    sentences = ["A man is eating food.", "The new movie is awesome, the critics say, and so do we.", "Hi"]
    want = st.encode(sentences, convert_to_tensor=True)
    opt = attnforge.optimize(st, "exact")
    assert isinstance(opt, st_mod.SentenceTransformer)
    assert opt.report.counts() == {"fuse_attention": 6, "fuse_ffn": 6}
    got = opt.encode(sentences, convert_to_tensor=True)
    assert float(F.cosine_similarity(got, want).min()) > 1 - 1e-6
    assert any(isinstance(m, attnforge.OptimizedModel) for m in opt._first_module().children())


def test_mixtral_returns_with_attention_fused_and_experts_reported():
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.MixtralConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    model = tf.MixtralForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 16))
    opt = attnforge.optimize(model, "exact", (ids,))
    assert opt.report.counts() == {"fuse_attention": 2}
    experts = [m for m in opt.report.misses if m.kind == "ffn"]
    assert len(experts) == 2 and all("mixture-of-experts" in m.reason for m in experts)
    assert not [m for m in opt.report.misses if m.kind == "attention"]  # the router's softmax is not attention
    with torch.no_grad():
        assert rel_err(opt(ids).logits, model(ids).logits) <= 1e-5


def test_a_graph_that_cannot_be_replayed_falls_back_with_the_reason(monkeypatch):
    from attnforge.passes import manager

    def broken(*a, **k):
        raise RuntimeError("the replay exploded")

    monkeypatch.setattr(manager, "record", broken)
    model = _llama()
    ids = torch.randint(0, 100, (2, 16))
    with pytest.warns(RuntimeWarning, match="replay exploded"):
        opt = attnforge.optimize(model, "exact", (ids,))
    assert "replayed" in opt.report.capture_error and opt.report.counts() == {}
    with torch.no_grad():
        assert torch.equal(opt(ids).logits, model(ids).logits)
    with pytest.raises(attnforge.CaptureError, match="replay exploded"):
        attnforge.optimize(model, "exact", (ids,), strict=True)


def test_a_capture_failure_warns():
    class DataDependent(nn.Module):
        def forward(self, x):
            return x * 2 if x.sum() > 0 else -x

    with pytest.warns(RuntimeWarning, match="runs unchanged"):
        opt = attnforge.optimize(DataDependent(), "exact", (torch.randn(2, 3),))
    assert opt.report.capture_error


def test_approximate_recipes_are_judged_by_their_quality_budget():
    model = _llama()
    ids = torch.randint(0, 100, (2, 32))
    window = {"steps": [{"rewrite": "fuse_attention"}, {"rewrite": "sliding_window", "params": {"window": 4}}]}
    opt = attnforge.optimize(model, window, (ids,))
    row = opt.report.outputs[0]
    assert row["budget"] == "cosine >= 0.9" and row["passed"] == (row["cosine"] >= 0.9)
    assert row["max_abs"] > 1e-4  # an approximation: the exact tolerance would have failed it
    strict = dict(window, verify={"min_cosine": 0.9999999, "max_rel_error": 1e-9})
    over = attnforge.optimize(model, strict, (ids,))
    assert not over.report.passed and "rel <= 1e-09" in over.report.outputs[0]["budget"]
    assert "allowed" in over.report.to_text()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning for a model that captured fine
        attnforge.optimize(model, "exact", (ids,))


def test_a_shape_the_graph_guards_against_gets_its_own_graph_not_a_guard_error():
    class Branchy(nn.Module):
        """Python control flow on a size: the capture keeps the example's branch and guards on it."""

        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8)

        def forward(self, x):
            return self.lin(x) * 2 if x.shape[1] > 10 else self.lin(x)

    model = Branchy().eval()
    opt = attnforge.optimize(model, "exact", (torch.randn(2, 16, 8),))
    with torch.no_grad():
        for n in (5, 30, 5):
            x = torch.randn(3, n, 8)
            assert torch.allclose(opt(x), model(x), atol=1e-6)
    assert any("excludes" in r["why"] for r in opt.report.recaptures)
