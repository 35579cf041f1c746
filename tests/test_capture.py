"""Capture: export first, symbolic_trace fallback, CaptureError / passthrough when both fail."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import attnforge
from attnforge import CaptureError, capture
from conftest import build_hf, rel_err


@torch.fx.wrap
def numpy_gain(x):
    """Host-side numpy code: torch.export cannot trace it, symbolic_trace keeps it as a leaf call."""
    return x * float(np.abs(x.detach().numpy()).mean() > 0) * 1.5


class NumpyBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.qkv = nn.Linear(16, 48)
        self.o = nn.Linear(16, 16)
        self.up, self.down = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        x = numpy_gain(x)
        q, k, v = self.qkv(x).view(2, 5, 3, 2, 8).permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, dim=-1)
        h = x + self.o((a @ v).transpose(1, 2).reshape(2, 5, 16))
        return h + self.down(torch.relu(self.up(h)))


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x):
        if x.sum() > 0:  # Python control flow on a tensor value: neither tracer can follow it
            return self.lin(x)
        return -x


def test_export_graph_contract():
    model, args, kwargs = build_hf("llama", "sdpa")
    cap = capture(model, args, kwargs)
    assert cap.method == "export" and cap.dynamic
    gm = cap.gm
    params = {n.target for n in gm.graph.nodes if n.op == "get_attr"}
    assert "layers.0.self_attn.q_proj.weight" in params
    calls = [n for n in gm.graph.nodes if n.op == "call_function"]
    assert all("val" in n.meta for n in calls if str(n.target).startswith("aten."))
    fqns = {list(n.meta["nn_module_stack"].values())[-1][0] for n in calls if n.meta.get("nn_module_stack")}
    assert "layers.1.self_attn.q_proj" in fqns
    # parameters are copies: capture never aliases the user's tensors
    assert gm.get_parameter("layers.0.self_attn.q_proj.weight").data_ptr() != \
        model.layers[0].self_attn.q_proj.weight.data_ptr()


def test_symbolic_trace_fallback_rewrites_too():
    model = NumpyBlock().eval()
    x = torch.randn(2, 5, 16)
    opt = attnforge.optimize(model, "exact", (x,))
    rep = opt.report
    assert rep.capture_method == "symbolic_trace"
    assert "torch.export" in rep.notes[0]
    assert rep.counts() == {"fuse_attention": 1, "fuse_ffn": 1}
    with torch.no_grad():
        assert rel_err(opt(x), model(x)) <= 1e-5


def test_untraceable_strict_raises_capture_error():
    with pytest.raises(CaptureError) as e:
        attnforge.optimize(DataDependent(), "exact", (torch.randn(2, 4),), strict=True)
    text = str(e.value)
    assert "torch.export" in text and "symbolic_trace" in text and "control flow" in text


def test_untraceable_non_strict_is_a_working_passthrough():
    model = DataDependent()
    x = torch.randn(2, 4).abs()
    opt = attnforge.optimize(model, "exact", (x,))
    assert opt.report.capture_error and opt.graph_module is None
    assert opt.report.counts() == {}
    assert "capture failed" in opt.report.to_text()
    with torch.no_grad():
        torch.testing.assert_close(opt(x), model(x))
        torch.testing.assert_close(opt(-x), model(-x))


def test_not_a_module():
    with pytest.raises(CaptureError, match="nn.Module"):
        capture(lambda x: x, (torch.randn(1),))
