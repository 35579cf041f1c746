"""Canonicalisation: one spelling per op, same numbers."""
from __future__ import annotations

import torch
from torch import nn

from attnforge.capture import capture
from attnforge.passes import canonicalize


class Spellings(nn.Module):
    def forward(self, a, b, m):
        x = torch.bmm(a, b.transpose(1, 2)) / 4.0
        y = torch.baddbmm(m, a, b.permute(0, 2, 1), beta=1.0, alpha=0.5)
        z = 2.0 * torch.matmul(a, b.transpose(-1, -2))
        return x + y + z


def _targets(gm):
    return [str(n.target) for n in gm.graph.nodes if n.op == "call_function"]


def test_rules_apply_and_numbers_hold():
    a, b, m = torch.randn(3, 4, 5), torch.randn(3, 4, 5), torch.randn(3, 4, 4)
    gm = capture(Spellings(), (a, b, m)).gm
    ref = gm(a, b, m)
    counts = canonicalize(gm)
    t = _targets(gm)
    assert "aten.bmm.default" not in t and "aten.baddbmm.default" not in t and "aten.div.Tensor" not in t
    assert "aten.permute.default" not in t
    assert t.count("aten.matmul.default") == 3
    # transposes of the last two dims are all spelled transpose(x, 1, 2) on rank-3 tensors
    assert all(n.args[1:] == (1, 2) for n in gm.graph.nodes if str(n.target) == "aten.transpose.int")
    assert counts
    torch.testing.assert_close(gm(a, b, m), ref, rtol=1e-6, atol=1e-6)


def test_symbolic_trace_graph_becomes_aten():
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x):
            return torch.softmax(self.lin(x).transpose(0, 1) * 2, dim=-1) @ x

    model = M()
    x = torch.randn(4, 4)
    gm = torch.fx.symbolic_trace(model)
    ref = gm(x)
    canonicalize(gm)
    assert all(n.op != "call_module" and n.op != "call_method" for n in gm.graph.nodes)
    assert "aten.linear.default" in _targets(gm) and "aten.softmax.int" in _targets(gm)
    torch.testing.assert_close(gm(x), ref)
