"""Issue #17 spellings: in-place score ops, ``x @ W.T + b`` FFNs, and routers are handled as what they are."""
from __future__ import annotations

import math

import pytest
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


class FoldedHeads(nn.Module):
    """Bloom's spelling: q, k, v folded to [B·H, N, D], scores ``baddbmm(alibi, q, kᵀ)``, viewed to [B, H, N, M] for
    the mask and softmax and back for the matmul with v; optionally an extra term from q (DeBERTa's c2p) and the
    scale as a 0-dim tensor constant (DeBERTa's ``torch.sqrt(torch.tensor(d) * f)``)."""

    def __init__(self, d=32, h=4, n=16, extra=False, tensor_scale=False):
        super().__init__()
        self.h, self.extra, self.tensor_scale = h, extra, tensor_scale
        self.q, self.k, self.v = nn.Linear(d, d), nn.Linear(d, d), nn.Linear(d, d)
        self.pos = nn.Parameter(torch.randn(n, d // h))
        slopes = torch.tensor([2.0 ** (-8 * (i + 1) / h) for i in range(h)])
        self.register_buffer("slopes", slopes)

    def forward(self, x, mask):
        b, n, d = x.shape
        hd = d // self.h
        q, k, v = (p(x).view(b, n, self.h, hd).transpose(1, 2).reshape(b * self.h, n, hd)
                   for p in (self.q, self.k, self.v))
        alibi = (self.slopes[:, None] * torch.arange(n)[None]).repeat(b, 1)[:, None, :]  # [B·H, 1, M]
        if self.tensor_scale:
            scores = torch.bmm(q, k.transpose(-1, -2) / torch.sqrt(torch.tensor(hd, dtype=torch.float) * 1.0))
            scores = scores + alibi
        else:
            scores = alibi.baddbmm(q, k.transpose(-1, -2), beta=1.0, alpha=hd ** -0.5)
        if self.extra:
            scores = scores + torch.bmm(q, self.pos[:n].T[None].expand(b * self.h, -1, -1)) * 0.2
        probs = F.softmax(scores.view(b, self.h, n, n) + mask, dim=-1)
        out = torch.bmm(probs.view(b * self.h, n, n), v).view(b, self.h, n, hd)
        return out.transpose(1, 2).reshape(b, n, d)


def _padding_mask(b, n):
    m = torch.zeros(b, 1, 1, n)
    m[-1, ..., :3] = -1e9
    return m


@pytest.mark.parametrize("extra,tensor_scale", [(False, False), (True, False), (False, True), (True, True)])
def test_folded_heads_fuse_with_alibi_and_extra_terms_as_additive_masks(extra, tensor_scale):
    torch.manual_seed(0)
    model = FoldedHeads(extra=extra, tensor_scale=tensor_scale).eval()
    x = torch.randn(1, 16, 32)
    opt = attnforge.optimize(model, "fuse-attention", (x, _padding_mask(1, 16)))
    site = opt.report.sites[0]
    assert site.status == "applied" and site.pattern == "eager-folded", opt.report.to_text()
    fused = [n for n in opt.program.gm.graph.nodes if "attnforge.attention" in str(n.target)]
    assert len(fused) == 1 and fused[0].args[0].meta["val"].dim() == 4  # heads unfolded: [B, H, N, D]
    assert any("unflatten" in str(n.target) for n in opt.program.gm.graph.nodes)  # ALiBi kept, as [B, H, 1, M]
    for b, n in ((1, 16), (3, 11)):
        x = torch.randn(b, n, 32)
        torch.testing.assert_close(opt(x, _padding_mask(b, n)), model(x, _padding_mask(b, n)), rtol=1e-5,
                                   atol=1e-6)


def test_a_learned_0_dim_scale_is_not_folded_into_a_constant():
    """Only constants fold: a 0-dim Parameter dividing the scores stays a tensor (training would change it)."""
    class Learned(FoldedHeads):
        def __init__(self):
            super().__init__()
            self.t = nn.Parameter(torch.tensor(8.0))

        def forward(self, x, mask):
            b, n, d = x.shape
            q, k, v = (p(x).view(b, n, 4, 8).transpose(1, 2) for p in (self.q, self.k, self.v))
            return (F.softmax(q @ k.transpose(-1, -2) / self.t + mask, -1) @ v).transpose(1, 2).reshape(b, n, d)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = attnforge.optimize(Learned().eval(), "fuse-attention", (torch.randn(1, 16, 32), _padding_mask(1, 16)))
    assert not [s for s in opt.report.sites if s.status == "applied"]
    assert opt.report.misses and "scores are divided by a tensor" in opt.report.misses[0].reason


@pytest.mark.parametrize("family", ["bloom", "deberta_v2"])
def test_bloom_and_deberta_relative_attention_fuse_exactly(family):
    import transformers as tf

    torch.manual_seed(0)
    if family == "bloom":
        model = tf.BloomForCausalLM(tf.BloomConfig(vocab_size=100, hidden_size=64, n_layer=2, n_head=4))
    else:
        model = tf.DebertaV2Model(tf.DebertaV2Config(
            vocab_size=100, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
            max_position_embeddings=64, relative_attention=True, pos_att_type=["p2c", "c2p"], position_buckets=16,
            max_relative_positions=32))
    model.eval()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Bloom cannot generate (no position_ids): a warning, not the point here
        opt = attnforge.optimize(model, "exact", (torch.randint(3, 100, (1, 9)),))
    assert [s.status for s in opt.report.sites] == ["applied"] * 4 and not opt.report.misses, opt.report.to_text()
    for b, n in ((1, 9), (2, 14)):
        ids = torch.randint(3, 100, (b, n))
        mask = torch.ones_like(ids)
        mask[-1, :3] = 0
        got, want = opt(ids, attention_mask=mask)[0], model(ids, attention_mask=mask)[0]
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
