"""Backend dispatch (runtime/dispatch.py): ``backend="triton"`` runs every op's Triton kernel (on CPU tensors through
TRITON_INTERPRET=1) and agrees with ``backend="torch"``; ``optimize(..., backend="triton")`` on small HF models."""
from __future__ import annotations

import os

import pytest
import torch

import attnforge
from attnforge.runtime import dispatch
from attnforge.runtime.dispatch import current_backend, use_backend
from conftest import build_hf, rel_err

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attnforge.codegen import attention as gen_attention  # noqa: E402
from attnforge.runtime.ffn import triton as gen_ffn  # noqa: E402

ops = torch.ops.attnforge


@pytest.fixture
def launches(monkeypatch):
    """Counts of Triton launches per kernel entry point."""
    seen = {}
    for module, name in [(gen_attention, "attention_triton"), (gen_attention, "decode_triton"),
                         (gen_attention, "block_sparse_triton"), (gen_ffn, "ffn_triton")]:
        real = getattr(module, name)

        def spy(*a, _real=real, _name=name, **kw):
            seen[_name] = seen.get(_name, 0) + 1
            return _real(*a, **kw)

        monkeypatch.setattr(module, name, spy)
    return seen


def _both(fn):
    with use_backend("torch"):
        want = fn()
    with use_backend("triton"):
        got = fn()
    return got, want


def test_each_op_runs_its_triton_kernel_and_agrees(launches):
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 33, 16), torch.randn(2, 2, 33, 16), torch.randn(2, 2, 33, 16)
    mask = torch.zeros(2, 1, 1, 33)
    mask[1, ..., 25:] = float("-inf")
    w_up, w_down, b_down, w_gate = torch.randn(24, 16), torch.randn(16, 24), torch.randn(16), torch.randn(24, 16)
    cases = {
        "attention": lambda: ops.attention(q, k, v, mask, 0.25, False, 0.0),
        "causal": lambda: ops.attention(q, k, v, None, 0.25, True, 0.0),
        "decode": lambda: ops.attention(q[:, :, :1], k, v, mask, 0.25, False, 0.0),
        "bmm_spelling": lambda: ops.attention(q[0], q[0], v[0].repeat(2, 1, 1), None, 0.25, True, 0.0),
        "window": lambda: ops.sliding_window_attention(q, k, v, mask, 0.25, 8, 2, True),
        "block_sparse": lambda: ops.block_sparse_attention(q, k, v, None, 0.25, 16, 1, 1, 0, 0, 0, True),
        "ffn": lambda: ops.ffn(q, w_up, None, w_down, b_down, w_gate, None, "silu", "out_in"),
    }
    for name, fn in cases.items():
        got, want = _both(fn)
        assert rel_err(got, want) <= 1e-5, name
    assert launches == {"attention_triton": 4, "decode_triton": 1, "block_sparse_triton": 1, "ffn_triton": 1}


def test_torch_backend_and_cpu_auto_launch_nothing(launches):
    q = torch.randn(1, 2, 20, 16)
    for backend in ("torch", "auto"):
        with use_backend(backend):
            ops.attention(q, q, q, None, 0.25, True, 0.0)
            ops.sliding_window_attention(q, q, q, None, 0.25, 4, 1, True)
    assert launches == {}


def test_cases_triton_does_not_cover_fall_back_to_torch(launches):
    q = torch.randn(1, 2, 20, 16)
    with use_backend("triton"):
        torch.manual_seed(0)
        ops.attention(q, q, q, None, 0.25, True, 0.1)  # dropout
        ops.attention(q, q, torch.randn(1, 2, 20, 8), None, 0.25, True, 0.0)  # head dims differ
        ops.ffn(q, torch.randn(24, 16), None, torch.randn(16, 24), None, None, None, "relu", "out_in")  # supported
        five_d = torch.randn(1, 2, 2, 20, 16)  # [..., H, N, D] with two leading dims
        torch.testing.assert_close(ops.attention(five_d, five_d, five_d, None, 0.25, True, 0.0),
                                   torch.nn.functional.scaled_dot_product_attention(five_d, five_d, five_d,
                                                                                    is_causal=True, scale=0.25))
        ops.sliding_window_attention(q, q, q, None, 0.25, 0, 2, True)  # window 0: the PyTorch rule (sinks only)
    assert launches == {"ffn_triton": 1}


def test_backend_is_a_scoped_choice_with_clear_errors(monkeypatch):
    assert current_backend() == "auto"
    with use_backend("triton"):
        assert current_backend() == "triton"
        with use_backend("torch"):
            assert current_backend() == "torch"
        assert current_backend() == "triton"
    assert current_backend() == "auto"
    with pytest.raises(ValueError, match="backend must be one of"):
        attnforge.optimize(torch.nn.Linear(2, 2), "exact", (torch.randn(1, 2),), backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        dispatch.check_backend("triton")


@pytest.mark.parametrize("family,recipe", [
    ("llama", "exact"),
    ("llama", {"name": "window", "steps": [{"rewrite": "fuse_attention"}, {"rewrite": "fuse_ffn"},
                                           {"rewrite": "sliding_window", "params": {"window": 5, "sinks": 1}}]}),
    ("bert", "exact"),
])
def test_optimize_on_triton_equals_torch(family, recipe, launches):
    """The acceptance check: a small HF Llama (GQA, RoPE, SwiGLU) rewritten and run on the Triton kernels equals
    the same rewrite on the PyTorch kernels within 1e-4; BERT adds a padding mask and GELU."""
    model, args, kwargs = build_hf(family, "sdpa")
    on_torch = attnforge.optimize(model, recipe, args, kwargs, backend="torch")
    launches.clear()
    on_triton = attnforge.optimize(model, recipe, args, kwargs, backend="triton")
    assert on_triton.backend == "triton" and on_triton.report.backend == "triton"
    assert on_triton.report.counts() == on_torch.report.counts()
    assert not any(s.status == "rolled_back" for s in on_triton.report.sites)
    launches.clear()
    with torch.no_grad():
        got = on_triton(*args, **kwargs).last_hidden_state
        want = on_torch(*args, **kwargs).last_hidden_state
    assert rel_err(got, want) <= 1e-4
    assert launches.get("attention_triton", 0) + launches.get("decode_triton", 0) >= 2 and launches["ffn_triton"] >= 2
