"""``gqa`` through partial rotary embeddings and q/k norms (issue #17): checked against Hugging Face's own GQA model of
the family built from the pooled weights, or, where the family has no GQA form, against the original model with
each K/V head replaced by its group's mean (the same function)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import transformers as tf
from torch import nn

import attnforge
from conftest import rel_err

H, KV, D = 4, 2, 16  # query heads, K/V heads after gqa, head dim (hidden 64)
G = H // KV


def gqa(kv_heads, pooling="mean"):
    return {"steps": [{"rewrite": "gqa", "params": {"kv_heads": kv_heads, "pooling": pooling}}]}


def config(family: str, kv_heads: int = H):
    """A tiny config of ``family`` (2 layers, hidden 64, 4 heads of 16), else the family's defaults; ``kv_heads``
    where the family has the field."""
    common = dict(vocab_size=100, hidden_size=H * D, intermediate_size=96, num_hidden_layers=2, num_attention_heads=H)
    if family == "qwen3":  # RMSNorm over head_dim, weight [D], on q and k after the head split
        return tf.Qwen3Config(**common, num_key_value_heads=kv_heads, head_dim=D)
    if family == "olmo2":  # RMSNorm over the whole projection output, weight [heads·D], before the head split
        return tf.Olmo2Config(**common, num_key_value_heads=kv_heads)
    if family == "cohere":  # LayerNorm over head_dim with per-head weights [heads, D]; interleaved rotary
        return tf.CohereConfig(**common, num_key_value_heads=kv_heads, use_qk_norm=True)
    if family == "phi":  # partial rotary (partial_rotary_factor 0.5)
        return tf.PhiConfig(**common, num_key_value_heads=kv_heads)
    if family == "gpt_neox":  # partial rotary (rotary_pct 0.25), q/k/v fused and interleaved per head
        return tf.GPTNeoXConfig(**common)
    if family == "gptj":  # interleaved partial rotary (rotary_dim 8), no GQA form
        return tf.GPTJConfig(vocab_size=100, n_embd=H * D, n_layer=2, n_head=H, rotary_dim=8, n_positions=64,
                             bos_token_id=0, eos_token_id=0)
    raise KeyError(family)


MODELS = {"qwen3": tf.Qwen3ForCausalLM, "olmo2": tf.Olmo2ForCausalLM, "cohere": tf.CohereForCausalLM,
          "phi": tf.PhiForCausalLM, "gpt_neox": tf.GPTNeoXForCausalLM, "gptj": tf.GPTJForCausalLM}
HF_GQA = ("qwen3", "olmo2", "cohere", "phi")  # families whose config has num_key_value_heads


def build(family: str):
    """The model, random weights, norm weights too (they start as ones, which pooling would not see), and ids."""
    torch.manual_seed(0)
    model = MODELS[family](config(family)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or "ln" in name.split(".")[-2]:
                p.add_(torch.randn_like(p) * 0.5)
    return model, torch.randint(0, 100, (1, 10))


def group_mean(t: torch.Tensor, dim: int = 0, d: int = D) -> torch.Tensor:
    """GQA's pooling (Ainslie et al.): W^g = mean_{h∈g} W^h, heads of ``t`` along ``dim`` (H·d rows or H heads)."""
    if t.shape[dim] == H:
        return t.unflatten(dim, (KV, G)).mean(dim + 1)
    return t.unflatten(dim, (KV, G, d)).mean(dim + 1).flatten(dim, dim + 1)


def repeat_groups(t: torch.Tensor) -> torch.Tensor:
    """[H·D, ...] rows with each head replaced by its group's mean (the group mean repeated per head)."""
    return group_mean(t).unflatten(0, (KV, D)).repeat_interleave(G, 0).flatten(0, 1)


POOLED = ("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias", "k_norm.weight")


def reference(family: str, model):
    """The model opt must equal: HF's own model with KV K/V heads loaded with the pooled weights, or (no GQA form)
    the original with every K/V head replaced by its group's mean."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    if family in HF_GQA:
        for name, t in model.state_dict().items():
            if name.endswith(POOLED):  # k_norm: OLMo2's [H·D] and Cohere's [H, D] weight; Qwen3's [D] is shared
                state[name] = group_mean(t) if t.shape[0] in (H, H * D) else t
        ref = MODELS[family](config(family, KV)).eval()
        ref.load_state_dict(state)
        return ref
    ref = copy.deepcopy(model)
    for name, t in model.state_dict().items():
        if family == "gptj" and name.endswith(("k_proj.weight", "v_proj.weight")):
            state[name] = repeat_groups(t)
        if family == "gpt_neox" and "query_key_value" in name:  # rows [H, (q, k, v), D]
            x = t.unflatten(0, (H, 3, D)).clone()
            for j in (1, 2):
                x[:, j] = repeat_groups(x[:, j].flatten(0, 1)).unflatten(0, (H, D))
            state[name] = x.flatten(0, 2)
    ref.load_state_dict(state)
    return ref


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


FAMILIES = ["qwen3", "olmo2", "cohere", "phi", "gpt_neox", "gptj"]


def optimize(model, ids, kv_heads, dynamic=False):
    opt = attnforge.optimize(model, gqa(kv_heads), (ids,), check_decode=False, dynamic=dynamic)
    assert [s.status for s in opt.report.sites] == ["applied"] * 2, opt.report.to_text()
    return opt


@pytest.mark.parametrize("family", FAMILIES)
def test_pooled_model_equals_the_grouped_model(family):
    model, ids = build(family)
    opt, ref = optimize(model, ids, KV), reference(family, model)
    assert rel_err(logits(opt, ids), logits(ref, ids)) <= 1e-4
    calls = [n for n in opt.graph_module.graph.nodes if str(n.target) == "attnforge.attention.default"]
    assert len(calls) == 2 and all(n.args[i].meta["val"].shape[1] == KV for n in calls for i in (1, 2))
    if family in HF_GQA:  # the parameter names and shapes of HF's grouped model, and its values
        params = dict(opt.named_parameters())
        assert params.keys() == dict(ref.named_parameters()).keys()
        for name, p in ref.named_parameters():
            torch.testing.assert_close(params[name], p, rtol=1e-6, atol=1e-7)
    info = opt.report.sites[0].info
    assert info["steps"]["v"] == [] and info["checked"]["v"] == "pooled"
    if family in ("qwen3", "olmo2", "cohere"):  # K: its norm, the norm's weight, rotary embeddings
        assert info["steps"]["k"][-2:] == ["affine", "rope"] and "norm" in info["steps"]["k"]
        assert info["checked"]["k"] == "normalised after pooling"
    else:  # partial rotary: linear per head, checked against the pooled original keys
        assert info["steps"]["k"] == ["partial"] and info["checked"]["k"] == "pooled"
    pooled = {"olmo2": ["model.layers.0.self_attn.k_norm.weight"],
              "cohere": ["model.layers.0.self_attn.k_norm.weight"]}.get(family, [])
    assert info["pooled_norm_weights"] == pooled
    bias = int(family in ("phi", "gpt_neox"))  # K and V lose H - KV heads of D rows (+ bias), k_norm its share
    norm = {"olmo2": (H - KV) * D, "cohere": (H - KV) * D}.get(family, 0)
    assert info["params_removed"] == 2 * (H - KV) * D * (H * D + bias) + norm


def test_other_batch_and_length():  # a norm before the head split, replayed on the pooled heads at any size
    model, ids = build("olmo2")
    opt, ref = optimize(model, ids, KV, dynamic=True), reference("olmo2", model)
    x = torch.randint(0, 100, (3, 7))
    assert rel_err(logits(opt, x), logits(ref, x)) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_kv_heads_equal_to_heads_is_exact(family):
    model, ids = build(family)
    opt = optimize(model, ids, H)
    assert rel_err(logits(opt, ids), logits(model, ids)) <= 1e-5


def test_cluster_with_norms_finds_shuffled_duplicated_heads():
    """K/V heads 0 = 2 and 1 = 3 (with their k_norm weights): cluster groups them, Q is permuted with its [H·D]
    q_norm weight, and the model is unchanged."""
    model, ids = build("olmo2")
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if name.endswith(("k_proj.weight", "v_proj.weight", "k_norm.weight")):
                heads = t.view(H, D, *t.shape[1:])
                heads.copy_(heads[[0, 1, 0, 1]].clone())
    opt = attnforge.optimize(model, gqa(KV, "cluster"), (ids,), check_decode=False, dynamic=False)
    assert [s.info["groups"] for s in opt.report.sites] == [[[0, 2], [1, 3]]] * 2, opt.report.to_text()
    assert opt.report.sites[0].info["checked"] == {"k": "pooled", "v": "pooled", "q": "pooled"}
    assert rel_err(logits(opt, ids), logits(model, ids)) <= 1e-5


class Normed(nn.Module):
    """Attention whose keys go through one-op norms: LayerNorm over the whole projection output (weight and bias
    [kv·D]), a head split that spells the head count, then RMSNorm over each head (weight [D]); ``kv`` K/V heads,
    repeated for the 4 query heads."""

    def __init__(self, kv=4, d=8):
        super().__init__()
        self.kv, self.d = kv, d
        self.q, self.k, self.v = nn.Linear(32, 32), nn.Linear(32, kv * d), nn.Linear(32, kv * d)
        self.k_flat, self.k_head = nn.LayerNorm(kv * d), nn.RMSNorm(d)

    def forward(self, x):
        b, n, _ = x.shape
        q = self.q(x).view(b, n, 4, self.d).transpose(1, 2)
        k = self.k_head(self.k_flat(self.k(x)).view(b, n, self.kv, self.d)).transpose(1, 2)
        v = self.v(x).view(b, n, self.kv, self.d).transpose(1, 2)
        if self.kv < 4:
            k, v = (t.repeat_interleave(4 // self.kv, 1) for t in (k, v))
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def test_one_op_layer_norm_and_rms_norm():
    torch.manual_seed(0)
    model, x = Normed().eval(), torch.randn(2, 6, 32)
    with torch.no_grad():
        for p in model.k_flat.parameters():
            p.normal_()  # not the identity
        model.k_head.weight.normal_()
    opt = attnforge.optimize(model, gqa(KV), (x,))
    (site,) = opt.report.sites
    assert site.status == "applied" and site.info["steps"]["k"] == ["norm", "norm"], opt.report.to_text()
    assert site.info["pooled_norm_weights"] == ["k_flat.bias", "k_flat.weight"]
    ref = Normed(kv=KV).eval()
    state = {k: group_mean(t, 0, 8) if k.startswith(("k.", "v.", "k_flat.")) else t
             for k, t in model.state_dict().items()}
    ref.load_state_dict(state)
    with torch.no_grad():
        assert rel_err(opt(x), ref(x)) <= 1e-4
