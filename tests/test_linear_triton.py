"""Triton linear attention kernel (TRITON_INTERPRET=1 on CPU) against the quadratic reference
tril(φQ φKᵀ) V / (rowsum + eps)."""
from __future__ import annotations

import os

import pytest
import torch

from attnforge.runtime import linear
from conftest import rel_err
from test_linear import EPS, inputs, linear_reference, map_weights

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attnforge.runtime.linear.triton import linear_attention_triton, supports  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(*xs):
    return [x.to(DEV) if x is not None else None for x in xs]


@pytest.mark.parametrize("name", ["elu", "relu", "cosine"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads,padded", [((2, 2), False), ((4, 2), True)])
def test_fused_feature_maps(name, causal, heads, padded):
    q, k, v, keep = inputs(h=heads[0], hkv=heads[1], n=45, padded=padded)
    keep = keep if padded else None
    got = linear_attention_triton(*_dev(q, k, v, keep), name, causal, EPS, block=16)
    assert rel_err(got.cpu(), linear_reference(q, k, v, keep, 0.25, name, causal)) <= 1e-4


@pytest.mark.parametrize("name", ["performer", "hedgehog"])
@pytest.mark.parametrize("causal", [True, False])
def test_precomputed_features(name, causal):
    """Maps the kernel does not fuse run on features computed by the caller (the CUDA dispatch does this)."""
    q, k, v, keep = inputs(n=40)
    wq, wk = map_weights(name, 4, 2, 16)
    fq, fk = linear.phi(q, name, 0.25, wq), linear.phi(k, name, 0.25, wk)
    got = linear_attention_triton(*_dev(fq, fk, v, keep), "none", causal, EPS, block=16)
    assert rel_err(got.cpu(), linear_reference(q, k, v, keep, 0.25, name, causal, wq, wk)) <= 1e-4


def test_dims_that_are_not_powers_of_two():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 30, 12), torch.randn(1, 2, 30, 12), torch.randn(1, 2, 30, 20)
    for name in ("elu", "cosine"):
        got = linear_attention_triton(*_dev(q, k, v), None, name, True, EPS, block=16)
        assert rel_err(got.cpu(), linear_reference(q, k, v, None, 0.25, name, True)) <= 1e-4


def test_fp16():
    q, k, v, _ = inputs(n=32, padded=False)
    got = linear_attention_triton(*_dev(q.half(), k.half(), v.half()), None, "elu", True, EPS, block=16)
    want = linear_reference(q.half().float(), k.half().float(), v.half().float(), None, 0.25, "elu", True)
    torch.testing.assert_close(got.float().cpu(), want, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("name", ["elu", "cosine", "taylor", "performer", "hedgehog"])
@pytest.mark.parametrize("window", [0, 3])
def test_triton_backend_equals_the_cpu_kernel(name, window, monkeypatch):
    """The op on the Triton backend: the kernel (fused or on passed-in features) or, for taylor and the hybrid,
    PyTorch."""
    import attnforge.runtime.linear.triton as kernel
    from attnforge.runtime.dispatch import use_backend

    launches = []
    real = kernel.linear_attention_triton
    monkeypatch.setattr(kernel, "linear_attention_triton", lambda *a, **kw: launches.append(1) or real(*a, **kw))
    q, k, v, keep = inputs(n=33)
    wq, wk = map_weights(name, 4, 2, 16)
    mix = torch.linspace(-1, 1, 4) if window else None
    want = linear.linear_attention_cpu(q, k, v, keep, 0.25, name, True, window, EPS, wq, wk, mix)
    with use_backend("triton"):
        got = torch.ops.attnforge.linear_attention(*_dev(q, k, v, keep), 0.25, name, True, window, EPS,
                                                   *_dev(wq, wk, mix))
    assert rel_err(got.cpu(), want) <= 1e-4
    assert bool(launches) == (window == 0 and name != "taylor")


def test_what_the_kernel_covers():
    assert supports("elu", 64) and supports("cosine", 65) and supports("hedgehog", 128)
    assert not supports("taylor", 2145) and not supports("performer", 256)
