"""Matchers: site records, FFN activation identification, and near misses with reasons."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import attnforge
from attnforge.capture import capture
from attnforge.passes import canonicalize
from attnforge.patterns import match_attention, match_ffn
from attnforge.runtime.ffn import ACTIVATIONS
from conftest import build_hf


def _sites(model, *args):
    gm = capture(model, args).gm
    canonicalize(gm)
    return gm, match_attention(gm.graph), match_ffn(gm.graph, ACTIVATIONS)


def test_site_record_fields_llama():
    model, args, _ = build_hf("llama", "eager")
    gm, (att, miss), _ = _sites(model, *args)
    assert len(att) == 2 and not miss
    s = att[0]
    assert s.fqn == "layers.0.self_attn" and s.pattern == "eager"
    assert (s.num_heads, s.num_kv_heads, s.head_dim) == (4, 2, 16)
    assert math.isclose(s.scale, 16 ** -0.5)
    assert s.proj == {"q_proj": "layers.0.self_attn.q_proj", "k_proj": "layers.0.self_attn.k_proj",
                      "v_proj": "layers.0.self_attn.v_proj"}
    assert s.rope is not None and s.mask_parts


def test_gpt2_conv1d_and_handwritten_gelu():
    model, args, _ = build_hf("gpt2", "sdpa")
    _, (att, _), (ffn, fmiss) = _sites(model, *args)
    assert not fmiss and len(ffn) == 2
    assert ffn[0].activation == "gelu_tanh" and ffn[0].up.layout == "in_out"
    assert att[0].proj["q_proj"] == "h.0.attn.c_attn"


class MLP(nn.Module):
    def __init__(self, act):
        super().__init__()
        self.up, self.down, self.act = nn.Linear(8, 16), nn.Linear(16, 8), act

    def forward(self, x):
        return self.down(self.act(self.up(x)))


def test_activation_identified_by_value_not_spelling():
    x = torch.randn(3, 8)
    cases = {
        "silu": lambda t: t * torch.sigmoid(t),
        "quick_gelu": lambda t: t * torch.sigmoid(1.702 * t),
        "gelu": lambda t: 0.5 * t * (1 + torch.erf(t / math.sqrt(2))),
        "relu": F.relu,
    }
    for name, fn in cases.items():
        model = MLP(fn)
        _, _, (ffn, miss) = _sites(model, x)
        assert [f.activation for f in ffn] == [name] and not miss


def test_unknown_activation_is_a_miss_and_model_still_exact():
    model = MLP(lambda t: torch.sin(t) * t)  # sin is not elementwise-allowed: no FFN site at all
    x = torch.randn(3, 8)
    _, _, (ffn, _) = _sites(model, x)
    assert not ffn
    model = MLP(lambda t: t * torch.sigmoid(0.5 * t))  # elementwise, but not a known activation
    _, _, (ffn, miss) = _sites(model, x)
    assert not ffn and miss and "activation" in miss[0].reason
    opt = attnforge.optimize(model, "exact", (x,))
    assert opt.report.counts() == {} and opt.report.misses and opt.report.passed


class NeedWeights(nn.Module):
    def __init__(self):
        super().__init__()
        self.mha = nn.MultiheadAttention(16, 2, batch_first=True)

    def forward(self, x):
        return self.mha(x, x, x)  # returns the averaged attention weights too


def test_need_weights_is_reported_not_fused():
    x = torch.randn(2, 5, 16)
    opt = attnforge.optimize(NeedWeights().eval(), "exact", (x,))
    assert opt.report.counts().get("fuse_attention", 0) == 0
    assert any("outside the core" in m.reason for m in opt.report.misses)
    assert "near misses" in opt.report.to_text()


def test_torch_transformer_encoder():
    layer = nn.TransformerEncoderLayer(16, 2, 32, batch_first=True)
    model = nn.TransformerEncoder(layer, 3, enable_nested_tensor=False).eval()
    x = torch.randn(2, 5, 16)
    opt = attnforge.optimize(model, "exact", (x,))
    assert opt.report.counts() == {"fuse_attention": 3, "fuse_ffn": 3}
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=1e-5, atol=1e-5)
