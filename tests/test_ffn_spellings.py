"""Issue #17: gated FFNs whose gate and up halves are one projection cut along its features (ModernBERT's
``input, gate = self.Wi(x).chunk(2, dim=-1)``, Phi-3's ``gate_up_proj``) are fused exactly, in every spelling of
the cut and with the activation on either half; a cut whose other pieces escape the block is a named miss."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnforge

D, F_ = 16, 24


def _halves(h: torch.Tensor, how: str):
    if how == "chunk":
        return h.chunk(2, dim=-1)
    if how == "torch.chunk":
        return torch.chunk(h, 2, -1)
    if how == "split":
        return h.split(F_, dim=-1)
    if how == "split_sizes":
        return torch.split(h, [F_, F_], dim=2)
    if how == "tensor_split":
        return torch.tensor_split(h, 2, dim=-1)
    if how == "tensor_split_indices":
        return torch.tensor_split(h, [F_], dim=-1)
    if how == "slice":
        return h[..., :F_], h[..., F_:]
    if how == "slice_negative":
        return h[..., :-F_], h[..., -F_:]
    if how == "narrow":
        return h.narrow(-1, 0, F_), h.narrow(-1, F_, F_)
    if how == "narrow_negative":
        return h.narrow(-1, 0, F_), h.narrow(-1, -F_, F_)
    if how == "unbind":
        return h.unflatten(-1, (2, F_)).unbind(-2)
    if how == "unbind_inferred":
        return h.unflatten(-1, (2, -1)).unbind(-2)
    if how == "select":
        g = h.unflatten(-1, (2, F_))
        return g[..., 0, :], g[..., 1, :]
    raise KeyError(how)


SPELLINGS = ["chunk", "torch.chunk", "split", "split_sizes", "tensor_split", "tensor_split_indices", "slice",
             "slice_negative", "narrow", "narrow_negative", "unbind", "unbind_inferred", "select"]


class CutGLU(nn.Module):
    """down(act(a) * b) with a, b = the two halves of one projection ``wi``; ``act_on`` picks the activated half."""

    def __init__(self, how: str, act_on: int = 0, act=F.gelu, bias: bool = True):
        super().__init__()
        self.how, self.act_on, self.act = how, act_on, act
        self.wi = nn.Linear(D, 2 * F_, bias=bias)
        self.wo = nn.Linear(F_, D, bias=bias)

    def forward(self, x):
        halves = _halves(self.wi(x), self.how)
        a, b = halves[self.act_on], halves[1 - self.act_on]
        return self.wo(self.act(a) * b)


class Chain(nn.Module):
    """One CutGLU block per spelling, applied in turn (one capture covers them all)."""

    def __init__(self, act_on: int):
        super().__init__()
        self.blocks = nn.ModuleDict({how.replace(".", "_"): CutGLU(how, act_on, act=F.silu if act_on else F.gelu)
                                     for how in SPELLINGS})

    def forward(self, x):
        for block in self.blocks.values():
            x = x + block(x)
        return x


def _x(batch=2, n=7, seed=0):
    return torch.randn(batch, n, D, generator=torch.Generator().manual_seed(seed))


def _fused(model, x):
    opt = attnforge.optimize(model, "exact", (x,))
    return opt, [s for s in opt.report.sites if s.rewrite == "fuse_ffn" and s.status == "applied"]


@pytest.mark.parametrize("act_on", [0, 1])
def test_cut_projection_is_fused_exactly_in_every_spelling(act_on):
    torch.manual_seed(0)
    model = Chain(act_on).eval()
    x = _x()
    opt, sites = _fused(model, x)
    assert not opt.report.misses, opt.report.to_text()
    by_block = {s.fqn: s.info for s in sites}
    lo, hi = f"[0:{F_}]", f"[{F_}:{2 * F_}]"
    gate, up = (hi, lo) if act_on else (lo, hi)
    for how in SPELLINGS:
        fqn = f"blocks.{how.replace('.', '_')}"
        assert fqn in by_block, f"{how}: not fused\n{opt.report.to_text()}"
        info = by_block[fqn]
        assert (info["gate"], info["up"], info["activation"]) == (f"{fqn}.wi{gate}", f"{fqn}.wi{up}",
                                                                  "silu" if act_on else "gelu"), how
    targets = [str(n.target) for n in opt.graph_module.graph.nodes if n.op == "call_function"]
    assert targets.count("attnforge.ffn.default") == len(SPELLINGS) and "aten.linear.default" not in targets
    for inp in (x, _x(3, 4, seed=1)):
        with torch.no_grad():
            torch.testing.assert_close(opt(inp), model(inp), rtol=0, atol=1e-6)


def test_cut_projection_without_bias_and_state_dict_names_kept():
    torch.manual_seed(0)
    model = CutGLU("chunk", bias=False).eval()
    x = _x()
    opt, sites = _fused(model, x)
    assert len(sites) == 1, opt.report.to_text()
    assert set(opt.state_dict()) == set(model.state_dict())  # the halves are views of wi.weight, not copies
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=0, atol=1e-6)


def test_cut_conv1d_projection_is_fused():
    """GPT-2 Conv1D layout ([in, out] weight): the halves are column ranges."""
    from transformers.pytorch_utils import Conv1D

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc, self.c_proj = Conv1D(2 * F_, D), Conv1D(D, F_)

        def forward(self, x):
            a, b = self.c_fc(x).chunk(2, dim=-1)
            return self.c_proj(a * F.gelu(b, approximate="tanh"))

    torch.manual_seed(0)
    model = M().eval()
    x = _x()
    opt, sites = _fused(model, x)
    assert len(sites) == 1 and sites[0].info["layout"] == "in_out", opt.report.to_text()
    assert sites[0].info["gate"] == f"c_fc[{F_}:{2 * F_}]"
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x), rtol=0, atol=1e-6)


def test_a_piece_read_outside_the_block_is_a_named_miss():
    class ThreePieces(nn.Module):
        def __init__(self):
            super().__init__()
            self.wi, self.wo = nn.Linear(D, 3 * F_), nn.Linear(F_, D)

        def forward(self, x):
            a, b, c = self.wi(x).chunk(3, dim=-1)
            return self.wo(F.silu(a) * b) + c.sum(-1, keepdim=True)

    torch.manual_seed(0)
    model, x = ThreePieces().eval(), _x()
    opt, sites = _fused(model, x)
    assert not sites
    (miss,) = [m for m in opt.report.misses if m.kind == "ffn"]
    assert "wi is cut into gate/up pieces" in miss.reason and "also read outside the block" in miss.reason
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


def test_a_cut_along_another_dim_is_not_a_gate():
    """Halves along the sequence dim are not feature pieces: nothing is fused, nothing is mis-fused."""

    class SeqHalves(nn.Module):
        def __init__(self):
            super().__init__()
            self.wi, self.wo = nn.Linear(D, F_), nn.Linear(F_, D)

        def forward(self, x):
            a, b = self.wi(x).chunk(2, dim=1)
            return self.wo(F.silu(a) * b)

    torch.manual_seed(0)
    model, x = SeqHalves().eval(), _x(2, 8)
    opt, sites = _fused(model, x)
    assert not sites
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))


@pytest.mark.parametrize("impl", ["eager", "sdpa"])
def test_modernbert_mlp_is_fused_exactly(impl):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.ModernBertConfig(vocab_size=100, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                              num_attention_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, cls_token_id=1,
                              sep_token_id=2, attn_implementation=impl)
    model = tf.ModernBertModel(cfg).eval()
    ids = torch.randint(3, 100, (1, 10))
    mask = torch.ones(1, 10, dtype=torch.long)
    opt = attnforge.optimize(model, "exact", (ids,), {"attention_mask": mask})
    ffn = [s for s in opt.report.sites if s.rewrite == "fuse_ffn" and s.status == "applied"]
    assert len(ffn) == 2 and not opt.report.misses, opt.report.to_text()
    assert {(s.info["gate"], s.info["up"]) for s in ffn} == {(f"layers.{i}.mlp.Wi[0:48]", f"layers.{i}.mlp.Wi[48:96]")
                                                              for i in range(2)}
    ids2 = torch.randint(3, 100, (2, 7))
    mask2 = torch.ones(2, 7, dtype=torch.long)
    mask2[1, 4:] = 0
    for i, m in ((ids, mask), (ids2, mask2)):
        with torch.no_grad():
            got = opt(i, attention_mask=m).last_hidden_state
            want = model(i, attention_mask=m).last_hidden_state
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
