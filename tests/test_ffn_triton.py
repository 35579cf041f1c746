"""Triton FFN kernel (TRITON_INTERPRET=1 on CPU) against the PyTorch reference ``ffn_cpu``."""
from __future__ import annotations

import os

import pytest
import torch

from attnforge.runtime.ffn import ACTIVATIONS
from attnforge.runtime.ffn.cpu import ffn_cpu
from conftest import rel_err

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attnforge.runtime.ffn.triton import DEFAULT_CONFIG, SEARCH_SPACE, ffn_triton, supports  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
ROWS, D_IN, HIDDEN, D_OUT = 37, 48, 80, 40  # none a multiple of the default blocks' output tiles


def _weights(gated, bias, layout, d_in=D_IN, hidden=HIDDEN, d_out=D_OUT, seed=0):
    """(w_up, b_up, w_down, b_down, w_gate, b_gate), unit-scale pre-activations, in ``layout``."""
    g = torch.Generator().manual_seed(seed)

    def lin(n_in, n_out):
        w = torch.randn(n_out, n_in, generator=g) / n_in ** 0.5
        b = torch.randn(n_out, generator=g) * 0.5 if bias else None
        return (w if layout == "out_in" else w.t().contiguous()), b

    w_up, b_up = lin(d_in, hidden)
    w_gate, b_gate = lin(d_in, hidden) if gated else (None, None)
    w_down, b_down = lin(hidden, d_out)
    return w_up, b_up, w_down, b_down, w_gate, b_gate


def _dev(ts, dtype=torch.float32):
    return [t.to(DEV, dtype) if t is not None else None for t in ts]


def _check(x, ws, activation, layout, config=None):
    got = ffn_triton(x, *ws, activation, layout, config=config)
    want = ffn_cpu(*[t.cpu() if t is not None else None for t in (x, *ws)], activation, layout)
    assert got.shape == want.shape and got.dtype == x.dtype
    torch.testing.assert_close(got.cpu(), want, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("gated", [True, False])
def test_every_activation_fp32(activation, gated):
    torch.manual_seed(0)
    x = torch.randn(ROWS, D_IN, device=DEV)
    _check(x, _dev(_weights(gated, True, "out_in")), activation, "out_in")


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("gated", [True, False])
def test_layouts_biases_and_3d_input(layout, bias, gated):
    torch.manual_seed(1)
    x = torch.randn(2, 5, D_IN, device=DEV)
    _check(x, _dev(_weights(gated, bias, layout)), "gelu" if gated else "silu", layout)


@pytest.mark.parametrize("layout", ["out_in", "in_out"])
def test_strided_weight_views(layout):
    """Weights read through their strides: transposed and sliced views, no copies needed."""
    torch.manual_seed(2)
    ws = _weights(True, True, "in_out" if layout == "out_in" else "out_in")
    ws = [t.t() if t is not None and t.dim() == 2 else t for t in ws]  # right layout, transposed storage
    wide = torch.randn(ws[0].shape[0], 2 * ws[0].shape[1])
    wide[:, ::2] = ws[0]
    ws[0] = wide[:, ::2]  # every other column of a wider buffer: stride 2 along the last dim
    assert not ws[0].is_contiguous() and not ws[2].is_contiguous()
    x = torch.randn(ROWS, D_IN, device=DEV)
    _check(x, _dev(ws), "silu", layout)


@pytest.mark.parametrize("activation", list(ACTIVATIONS))
def test_activation_over_a_wide_range(activation):
    """Identity weights turn the FFN into act(x): checks the tails (overflow, softplus's threshold 20)."""
    x = torch.linspace(-30, 30, ROWS * 16, device=DEV).view(ROWS, 16)
    eye = torch.eye(16, device=DEV)
    got = ffn_triton(x, eye, None, eye, None, None, None, activation, "out_in")
    torch.testing.assert_close(got, ACTIVATIONS[activation](x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation,gated,layout", [
    ("silu", True, "out_in"), ("gelu_tanh", False, "in_out"), ("relu", False, "out_in"), ("gelu", True, "in_out"),
])
def test_fp16(activation, gated, layout):
    torch.manual_seed(3)
    x = torch.randn(2, 5, D_IN).half()
    ws = [t.half() if t is not None else None for t in _weights(gated, True, layout)]
    got = ffn_triton(x.to(DEV), *_dev(ws, torch.float16), activation, layout)
    want = ffn_cpu(x.float(), *[t.float() if t is not None else None for t in ws], activation, layout)
    assert got.dtype == torch.float16 and got.shape == want.shape
    assert rel_err(got.cpu().float(), want) < 2e-2


@pytest.mark.parametrize("config", [
    {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_K": 16, "num_warps": 2, "num_stages": 1},  # many tiles, K loop of 3
    SEARCH_SPACE[0],
    {"BLOCK_N": 32},  # a partial override of DEFAULT_CONFIG
])
def test_non_default_config(config):
    assert config != DEFAULT_CONFIG
    torch.manual_seed(4)
    x = torch.randn(ROWS, D_IN, device=DEV)
    _check(x, _dev(_weights(True, True, "in_out")), "quick_gelu", "in_out", config=config)


def test_search_space_configs_are_well_formed():
    for cfg in [DEFAULT_CONFIG, *SEARCH_SPACE]:
        assert cfg.keys() == DEFAULT_CONFIG.keys()
        assert all(cfg[b] >= 16 for b in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))


def test_supports():
    assert all(supports(name) for name in ACTIVATIONS)
    assert not supports("swish_of_doom") and not supports("identity")
    x = torch.randn(4, D_IN, device=DEV)
    ws = _dev(_weights(False, False, "out_in"))
    with pytest.raises(ValueError, match="activation"):
        ffn_triton(x, *ws, "swish_of_doom", "out_in")
    with pytest.raises(ValueError, match="layout"):
        ffn_triton(x, *ws, "relu", "in_in")
