"""``gqa``: K/V projections pooled into fewer heads, checked against independently built references."""
from __future__ import annotations

import pytest
import torch
import transformers as tf
from torch import nn

import attnforge
from attnforge import RecipeError
from attnforge.recipe import load_recipe
from conftest import assert_unchanged, build_hf, other_inputs, rel_err, snapshot

H, D = 8, 8  # heads and head dim of the models built here (hidden 64)


def gqa(kv_heads, pooling="mean"):
    return {"steps": [{"rewrite": "gqa", "params": {"kv_heads": kv_heads, "pooling": pooling}}]}


def build(family: str):
    """(model, args, kwargs) with H heads of dim D in every attention."""
    torch.manual_seed(0)
    ids = torch.randint(0, 100, (2, 10))
    if family in ("llama", "qwen2"):
        cfg = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config}[family](
            vocab_size=100, hidden_size=H * D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=H,
            num_key_value_heads=H, use_cache=False, attn_implementation="eager")
        return {"llama": tf.LlamaModel, "qwen2": tf.Qwen2Model}[family](cfg).eval(), (ids,), {}
    if family == "bert":
        cfg = tf.BertConfig(vocab_size=100, hidden_size=H * D, intermediate_size=96, num_hidden_layers=2,
                            num_attention_heads=H, attn_implementation="sdpa")
        mask = torch.ones(2, 10, dtype=torch.long)
        mask[1, 6:] = 0
        return tf.BertModel(cfg).eval(), (ids,), {"attention_mask": mask}
    if family == "gpt2":
        cfg = tf.GPT2Config(vocab_size=100, n_embd=H * D, n_layer=2, n_head=H, use_cache=False,
                            attn_implementation="eager")
        return tf.GPT2Model(cfg).eval(), (ids,), {}
    if family == "mha":  # nn.MultiheadAttention, packed in_proj
        layer = nn.TransformerEncoderLayer(H * D, H, 96, batch_first=True)
        return nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval(), (torch.randn(2, 10, H * D),), {}
    raise KeyError(family)


def kv_blocks(model, family):
    """(tensor, dim, start) of every K and V head block: heads are D-wide slices of ``dim`` from ``start``."""
    out = []
    for m in model.modules():
        if family in ("llama", "qwen2") and isinstance(m, (tf.models.llama.modeling_llama.LlamaAttention,
                                                             tf.models.qwen2.modeling_qwen2.Qwen2Attention)):
            out += [(p, 0, 0) for lin in (m.k_proj, m.v_proj) for p in (lin.weight, lin.bias) if p is not None]
        elif family == "bert" and hasattr(m, "key") and hasattr(m, "value"):
            out += [(p, 0, 0) for lin in (m.key, m.value) for p in (lin.weight, lin.bias)]
        elif family == "gpt2" and hasattr(m, "c_attn"):  # Conv1D: W [in, 3E], K and V are columns E:2E, 2E:3E
            out += [(m.c_attn.weight, 1, H * D), (m.c_attn.weight, 1, 2 * H * D),
                    (m.c_attn.bias, 0, H * D), (m.c_attn.bias, 0, 2 * H * D)]
        elif family == "mha" and isinstance(m, nn.MultiheadAttention):
            out += [(m.in_proj_weight, 0, H * D), (m.in_proj_weight, 0, 2 * H * D),
                    (m.in_proj_bias, 0, H * D), (m.in_proj_bias, 0, 2 * H * D)]
    return out


@torch.no_grad()
def copy_heads(model, family, src):
    """Make K/V head h a copy of K/V head src[h] in every layer (on the test's own model)."""
    for t, dim, start in kv_blocks(model, family):
        block = t.narrow(dim, start, H * D).unflatten(dim, (H, D))
        block.copy_(block.index_select(dim, torch.tensor(src)))


def n_params(model):
    return sum(p.numel() for p in model.parameters())


def outputs(model, args, kwargs):
    with torch.no_grad():
        out = model(*args, **kwargs)
    return out if isinstance(out, torch.Tensor) else out[0]


FAMILIES = ["llama", "qwen2", "bert", "gpt2", "mha"]


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_heads_equal_to_heads_is_exact(family):
    model, args, kwargs = build(family)
    before = snapshot(model)
    opt = attnforge.optimize(model, gqa(H), args, kwargs)
    assert opt.report.counts() == {"gqa": 2}, opt.report.to_text()
    assert rel_err(outputs(opt, args, kwargs), outputs(model, args, kwargs)) <= 1e-5
    assert n_params(opt) == n_params(model)
    assert_unchanged(model, before)


@pytest.mark.parametrize("pooling", ["mean", "norm", "cluster"])
@pytest.mark.parametrize("family", FAMILIES)
def test_heads_duplicated_within_groups_convert_exactly(family, pooling):
    model, args, kwargs = build(family)
    copy_heads(model, family, [h // 4 * 4 for h in range(H)])  # groups {0..3}, {4..7}
    opt = attnforge.optimize(model, gqa(2, pooling), args, kwargs)
    assert opt.report.counts() == {"gqa": 2}, opt.report.to_text()
    assert rel_err(outputs(opt, args, kwargs), outputs(model, args, kwargs)) <= 1e-5
    d_in = H * D
    bias = 0 if family == "llama" else 1  # every K/V projection here but Llama's has a bias
    assert n_params(model) - n_params(opt) == 2 * 2 * (H - 2) * D * (d_in + bias)  # 2 layers, K and V
    for s in opt.report.sites:
        assert s.info["groups"] == [[0, 1, 2, 3], [4, 5, 6, 7]]
        assert s.info["params_removed"] == 2 * (H - 2) * D * (d_in + bias)


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_cluster_finds_shuffled_duplicated_heads(family):
    model, args, kwargs = build(family)
    group = torch.randperm(H, generator=torch.Generator().manual_seed(3)) // 2  # 4 groups of 2, scattered
    first = {int(g): h for h, g in reversed(list(enumerate(group)))}
    copy_heads(model, family, [first[int(g)] for g in group])
    ref = outputs(model, args, kwargs)
    mean = attnforge.optimize(model, gqa(4, "mean"), args, kwargs)
    assert rel_err(outputs(mean, args, kwargs), ref) > 1e-3  # adjacent groups mix different heads
    opt = attnforge.optimize(model, gqa(4, "cluster"), args, kwargs)
    assert rel_err(outputs(opt, args, kwargs), ref) <= 1e-5
    want = sorted(sorted(h for h in range(H) if group[h] == g) for g in range(4))
    assert all(sorted(s.info["groups"]) == want for s in opt.report.sites)
    assert n_params(opt) == n_params(mean)


def pooled_hf_llama(model, kv):
    """HF's own LlamaModel with kv key/value heads, K/V weights mean-pooled by hand from ``model``."""
    cfg = model.config.to_dict() | {"num_key_value_heads": kv}
    ref = tf.LlamaModel(tf.LlamaConfig(**cfg)).eval()
    state = dict(model.state_dict())
    for name, w in model.state_dict().items():
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = w.view(kv, H // kv, D, -1).mean(1).reshape(kv * D, -1)
    ref.load_state_dict(state)
    return ref


def test_mean_pooling_equals_hf_llama_with_fewer_kv_heads():
    model, args, kwargs = build("llama")
    ref = pooled_hf_llama(model, 2)
    opt = attnforge.optimize(model, gqa(2), args, kwargs)
    assert opt.report.counts() == {"gqa": 2}
    assert n_params(opt) == n_params(ref)
    params = dict(opt.named_parameters())
    for name, p in ref.named_parameters():
        torch.testing.assert_close(params[name], p, rtol=1e-6, atol=1e-7)
    for a, kw in [(args, kwargs), other_inputs("llama", args, kwargs)]:
        assert rel_err(outputs(opt, a, kw), outputs(ref, a, kw)) <= 1e-4
    # the site runs the GQA op on 2 K/V heads, nothing repeats them
    calls = [n for n in opt.graph_module.graph.nodes if str(n.target) == "attnforge.attention.default"]
    assert len(calls) == 2 and all(n.args[i].meta["val"].shape[1] == 2 for n in calls for i in (1, 2))


def test_backward_through_rewritten_model_matches_hf_gqa():
    model, args, kwargs = build("llama")
    ref = pooled_hf_llama(model, 2).train()
    opt = attnforge.optimize(model, gqa(2), args, kwargs).train()
    assert opt.training and opt.module.training
    for m in (opt, ref):
        m(*args, **kwargs).last_hidden_state.pow(2).mean().backward()
    got = dict(opt.named_parameters())
    for name in ("layers.0.self_attn.k_proj.weight", "layers.1.self_attn.v_proj.weight",
                 "layers.0.self_attn.q_proj.weight"):
        want = dict(ref.named_parameters())[name].grad
        assert got[name].grad.shape == want.shape
        assert rel_err(got[name].grad, want) <= 1e-4
    opt.eval()  # and back


def test_attention_op_gradients():
    torch.manual_seed(0)
    q = torch.randn(1, 4, 3, 4, dtype=torch.double, requires_grad=True)
    k, v = (torch.randn(1, 2, 3, 4, dtype=torch.double, requires_grad=True) for _ in range(2))
    mask = torch.randn(1, 1, 3, 3, dtype=torch.double, requires_grad=True)
    att = torch.ops.attnforge.attention
    assert torch.autograd.gradcheck(lambda *t: att(*t, 0.3, False, 0.0), (q, k, v, mask))
    assert torch.autograd.gradcheck(lambda *t: att(*t, None, 0.3, True, 0.0), (q, k, v))
    torch.library.opcheck(att, (q.float(), k.float(), v.float(), None, 0.3, True, 0.0),
                          test_utils=("test_autograd_registration", "test_faketensor"))


def test_kv_heads_must_divide_heads():
    model, args, kwargs = build("llama")
    with pytest.raises(RecipeError) as e:
        attnforge.optimize(model, gqa(3), args, kwargs)
    assert e.value.field == "steps[0].params.kv_heads" and "does not divide the 8" in str(e.value)
    for params, field in [({"kv_heads": 0}, "kv_heads"), ({"kv_heads": 2, "pooling": "max"}, "pooling"),
                          ({}, "kv_heads")]:
        with pytest.raises(RecipeError) as e:  # before anything runs
            load_recipe({"steps": [{"rewrite": "gqa", "params": params}]})
        assert e.value.field == f"steps[0].params.{field}"


def test_composes_after_fuse_attention_and_with_itself():
    model, args, kwargs = build("llama")
    once = attnforge.optimize(model, gqa(2), args, kwargs)
    fused = attnforge.optimize(model, {"steps": [{"rewrite": "fuse_attention"}] + gqa(2)["steps"]}, args, kwargs)
    twice = attnforge.optimize(model, {"steps": gqa(4)["steps"] + gqa(2)["steps"]}, args, kwargs)
    assert fused.report.counts() == {"fuse_attention": 2, "gqa": 2}
    assert twice.report.counts() == {"gqa": 4}
    for other in (fused, twice):  # the mean of pair means is the mean of the group
        assert rel_err(outputs(other, args, kwargs), outputs(once, args, kwargs)) <= 1e-5
        assert n_params(other) == n_params(once)


def test_already_grouped_model_pools_to_mqa():
    model, args, kwargs = build_hf("llama", "eager")  # 4 query heads, 2 K/V heads
    copy_heads_gqa = [(m.k_proj.weight, m.v_proj.weight) for m in model.modules() if hasattr(m, "k_proj")]
    with torch.no_grad():
        for ws in copy_heads_gqa:
            for w in ws:
                w[16:] = w[:16]  # both K/V heads equal: MQA is exact
    opt = attnforge.optimize(model, gqa(1), args, kwargs)
    assert opt.report.counts() == {"gqa": 2}
    assert rel_err(outputs(opt, args, kwargs), outputs(model, args, kwargs)) <= 1e-5
    info = opt.report.sites[0].info
    assert info["kv_cache_bytes_per_token"] == [2 * 2 * 16 * 4, 2 * 1 * 16 * 4]


class LeakyK(nn.Module):
    """Attention that also returns its keys (as a KV cache would): K's projection cannot shrink."""

    def __init__(self):
        super().__init__()
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, 32), nn.Linear(32, 32)

    def forward(self, x):
        b, n, _ = x.shape
        q, k, v = (lin(x).view(b, n, 4, 8).transpose(1, 2) for lin in (self.q, self.k, self.v))
        return torch.nn.functional.scaled_dot_product_attention(q, k, v), k


def test_site_that_cannot_shrink_is_skipped_with_reason():
    model, x = LeakyK().eval(), torch.randn(2, 6, 32)
    opt = attnforge.optimize(model, gqa(2), (x,))
    (site,) = opt.report.sites
    assert site.status == "skipped" and "K's projection k is also used outside" in site.reason
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
    assert n_params(opt) == n_params(model)


def test_report_per_site():
    model, args, kwargs = build("bert")
    opt = attnforge.optimize(model, gqa(2, "norm"), args, kwargs)
    n_tokens = args[0].shape[1]
    for s in opt.report.sites:
        assert s.status == "applied" and s.error["rel"] > 0  # measured, approximate
        i = s.info
        assert (i["heads"], i["kv_heads"], i["kv_heads_after"], i["pooling"]) == (H, H, 2, "norm")
        assert i["params_removed"] * 2 == n_params(model) - n_params(opt)
        assert i["kv_cache_bytes_per_token"] == [2 * H * D * 4, 2 * 2 * D * 4]
        proj = lambda kv: 2 * H * D * (H + 2 * kv) * D  # noqa: E731
        assert i["flops_per_token"] == [proj(H) + 4 * H * n_tokens * D, proj(2) + 4 * H * n_tokens * D]
        assert len(i["head_weights"]) == H and abs(sum(i["head_weights"]) - H) < 1e-4
    assert "gqa" in opt.report.to_text()
