"""The worked example of docs/extending.md: ``chunked_attention`` (runtime/chunked_attention.py,
passes/chunked_attention.py), checked end to end against a masked softmax written out here."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnforge
from conftest import build_hf, rel_err


class Tiny(nn.Module):
    """x -> q, k, v projections -> causal SDPA over 2 heads -> output projection."""

    def __init__(self, d=32, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv, self.o = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = (t.view(b, n, self.heads, -1).transpose(1, 2) for t in self.qkv(x).chunk(3, -1))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o(y.transpose(1, 2).reshape(b, n, d))


def chunked_by_hand(model: Tiny, x, chunk: int):
    """The model with key j visible from query i iff i // chunk == j // chunk and j <= i, element by element."""
    b, n, d = x.shape
    q, k, v = (t.view(b, n, model.heads, -1).transpose(1, 2) for t in model.qkv(x).chunk(3, -1))
    keep = torch.tensor([[i // chunk == j // chunk and j <= i for j in range(n)] for i in range(n)])
    s = (q @ k.transpose(-1, -2)) / (q.shape[-1] ** 0.5)
    y = torch.softmax(s.masked_fill(~keep, float("-inf")), -1) @ v
    return model.o(y.transpose(1, 2).reshape(b, n, d))


def recipe(chunk):
    return {"name": "chunked", "steps": [{"rewrite": "chunked_attention", "params": {"chunk": chunk}}]}


@pytest.mark.parametrize("chunk", [1, 5, 8])
def test_rewrite_equals_the_chunked_model_written_by_hand(chunk):
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(2, 21, 32)
    opt = attnforge.optimize(model, recipe(chunk), (x,))
    assert opt.report.counts() == {"chunked_attention": 1}
    with torch.no_grad():
        want = chunked_by_hand(model, x, chunk)
        assert rel_err(opt(x), want) <= 1e-5
        other = torch.randn(1, 13, 32)  # another batch and length
        assert rel_err(opt(other), chunked_by_hand(model, other, chunk)) <= 1e-5


def test_a_chunk_longer_than_the_sequence_is_the_original_model():
    model, args, kwargs = build_hf("llama", "sdpa")
    opt = attnforge.optimize(model, recipe(64), args, kwargs)
    assert opt.report.counts() == {"chunked_attention": 2}
    with torch.no_grad():
        assert rel_err(opt(*args, **kwargs)[0], model(*args, **kwargs)[0]) <= 1e-5
    assert all(s.error["rel"] <= 1e-5 for s in opt.report.sites)


def test_bad_chunk_is_a_recipe_error():
    with pytest.raises(attnforge.RecipeError, match=r"steps\[0\]\.params\.chunk"):
        attnforge.load_recipe(recipe(0))


def test_onnx_export_matches_onnxruntime(tmp_path):
    pytest.importorskip("onnxruntime")
    from attnforge.runtime.onnx import export_onnx, run_onnx

    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(2, 21, 32)
    opt = attnforge.optimize(model, recipe(5), (x,))
    export_onnx(opt.graph_module, (x,), {}, tmp_path / "c.onnx")
    with torch.no_grad():
        want = opt(x)
    assert rel_err(run_onnx(tmp_path / "c.onnx", (x,), {}, want), want) <= 1e-5


def test_triton_backend_equals_the_torch_backend():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    torch.manual_seed(0)
    model, x = Tiny().eval(), torch.randn(1, 40, 32)
    want = attnforge.optimize(model, recipe(12), (x,), backend="torch")
    got = attnforge.optimize(model, recipe(12), (x,), backend="triton")
    with torch.no_grad():
        assert rel_err(got(x), want(x)) <= 1e-5
