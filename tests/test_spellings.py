"""Issue #17 spellings: in-place score ops, ``x @ W.T + b`` FFNs, and routers are handled as what they are."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import attnforge
from attnforge.passes import canonicalize


class InPlaceAttention(nn.Module):
    """BERT-style self-attention, scores scaled in place (``scores /= sqrt(d)``) or masked in place."""

    def __init__(self, d=32, h=4, fill=False):
        super().__init__()
        self.h, self.fill = h, fill
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x, mask):
        B, T, D = x.shape
        hd = D // self.h
        q, k, v = (p(x).view(B, T, self.h, hd).transpose(1, 2) for p in (self.q, self.k, self.v))
        scores = torch.matmul(q, k.transpose(-1, -2))
        scores /= math.sqrt(hd)
        if self.fill:
            scores.masked_fill_(mask < 0, -1e9)
        else:
            scores.add_(mask)
        return torch.matmul(F.softmax(scores, dim=-1), v).transpose(1, 2).reshape(B, T, D)


class TransposedFFN(nn.Module):
    """An FFN written ``x @ W.T + b`` (Falcon), not F.linear."""

    def __init__(self, d=32, f=64):
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.randn(f, d) * 0.1), nn.Parameter(torch.randn(f) * 0.1)
        self.w2, self.b2 = nn.Parameter(torch.randn(d, f) * 0.1), nn.Parameter(torch.randn(d) * 0.1)

    def forward(self, x):
        return F.gelu(x @ self.w1.T + self.b1) @ self.w2.t() + self.b2


class Router(nn.Module):
    """A Mixtral-style router: softmax probabilities go to topk (and are also returned)."""

    def __init__(self, d=32, e=4):
        super().__init__()
        self.gate = nn.Linear(d, e, bias=False)

    def forward(self, x):
        probs = F.softmax(self.gate(x), dim=-1, dtype=torch.float)
        w, idx = torch.topk(probs, 2, dim=-1)
        return w / w.sum(-1, keepdim=True), idx, probs


def _inputs():
    torch.manual_seed(0)
    x, mask = torch.randn(2, 8, 32), torch.zeros(2, 1, 1, 8)
    mask[0, ..., -3:] = -1e9
    return x, mask


def test_in_place_scores_are_fused_exactly():
    x, mask = _inputs()
    for fill in (False, True):
        model = InPlaceAttention(fill=fill).eval()
        ref = model(x, mask)
        opt = attnforge.optimize(model, "exact", (x, mask))
        assert opt.report.counts().get("fuse_attention") == 1, opt.report.misses
        assert not opt.report.misses
        torch.testing.assert_close(opt(x, mask), ref, rtol=1e-5, atol=1e-5)


def test_in_place_rewrite_keeps_later_reads_and_aliases():
    class M(nn.Module):
        def forward(self, x):
            y = x * 2
            y.div_(4.0)  # later reads of y see the division
            z = x + 1
            view = z.view(-1)
            z.mul_(3.0)  # read through a view afterwards: must stay in place
            kept = F.dropout(x, 0.5, training=False)  # returns x itself: x would be mutated
            kept.sub_(1.0)
            return y + 1, view.sum(), x * 1

    x = torch.randn(3, 4)
    ref = M()(x.clone())
    gm = torch.fx.symbolic_trace(M())
    counts = canonicalize(gm)
    targets = [str(n.target) for n in gm.graph.nodes]
    assert counts["out_of_place"] == 1 and "div_" not in targets and {"mul_", "sub_"} <= set(targets)
    for got, want in zip(gm(x.clone()), ref):
        torch.testing.assert_close(got, want)


def test_transposed_weight_ffn_is_fused():
    x, _ = _inputs()
    model = TransposedFFN().eval()
    ref = model(x)
    opt = attnforge.optimize(model, "exact", (x,))
    assert opt.report.counts().get("fuse_ffn") == 1, opt.report.misses
    out = opt(x)
    assert ((out - ref).norm() / ref.norm()).item() <= 1e-5


def test_router_softmax_is_not_an_attention_miss():
    x, _ = _inputs()
    model = Router().eval()
    ref = model(x)
    opt = attnforge.optimize(model, "exact", (x,))
    assert not [m for m in opt.report.misses if m.kind == "attention"]
    for got, want in zip(opt(x), ref):
        torch.testing.assert_close(got, want)
