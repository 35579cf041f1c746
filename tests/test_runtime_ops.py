"""The attnforge custom ops against plainly written references."""
from __future__ import annotations

import pytest
import torch

import attnforge  # noqa: F401  (registers torch.ops.attnforge)
from attnforge.runtime.ffn import ACTIVATIONS

attention = torch.ops.attnforge.attention
ffn = torch.ops.attnforge.ffn


def dense_reference(q, k, v, mask, scale, causal):
    """softmax(scale q kᵀ + mask) v with K/V heads repeated explicitly; written the textbook way."""
    rep = q.shape[-3] // k.shape[-3]
    k = k.repeat_interleave(rep, dim=-3)
    v = v.repeat_interleave(rep, dim=-3)
    s = (q.double() @ k.double().transpose(-2, -1)) * scale
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    if causal:
        n, m = s.shape[-2:]
        s = s.masked_fill(torch.ones(n, m, dtype=torch.bool).triu(1), float("-inf"))
    return (s.softmax(-1) @ v.double()).float()


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (4, 2), (6, 1)])
@pytest.mark.parametrize("mask_kind", [None, "float", "bool", "per_head"])
@pytest.mark.parametrize("causal", [False, True])
def test_attention_matches_dense_softmax(heads, kv_heads, mask_kind, causal):
    torch.manual_seed(0)
    b, n, d = 2, 7, 8
    q, k, v = torch.randn(b, heads, n, d), torch.randn(b, kv_heads, n, d), torch.randn(b, kv_heads, n, d)
    mask = None
    if mask_kind == "float":
        mask = torch.randn(b, 1, n, n)
    elif mask_kind == "bool":
        mask = torch.rand(b, 1, 1, n) > 0.3
        mask[..., 0] = True  # keep one key per row so no row is empty
    elif mask_kind == "per_head":
        mask = torch.randn(b, heads, n, n)
    got = attention(q, k, v, mask, 0.3, causal, 0.0)
    want = dense_reference(q, k, v, mask, 0.3, causal)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_batched_3d_layout():
    torch.manual_seed(0)
    q, k, v = torch.randn(6, 5, 4), torch.randn(6, 5, 4), torch.randn(6, 5, 4)
    got = attention(q, k, v, None, 0.5, False, 0.0)
    want = dense_reference(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), None, 0.5, False)[0]
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_attention_op_registration():
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    torch.library.opcheck(attention, (q, k, v, None, 0.35, True, 0.0),
                          test_utils=("test_schema", "test_faketensor"))


def _ref_ffn(x, w1, b1, w2, b2, wg, bg, act):
    f = ACTIVATIONS[act]
    h = f(x @ wg.T + bg) * (x @ w1.T + b1) if wg is not None else f(x @ w1.T + b1)
    return h @ w2.T + b2


@pytest.mark.parametrize("act", sorted(ACTIVATIONS))
@pytest.mark.parametrize("gated", [False, True])
def test_ffn_matches_reference(act, gated):
    torch.manual_seed(0)
    x = torch.randn(2, 5, 16)
    w1, b1, w2, b2 = torch.randn(32, 16), torch.randn(32), torch.randn(16, 32), torch.randn(16)
    wg, bg = (torch.randn(32, 16), torch.randn(32)) if gated else (None, None)
    got = ffn(x, w1, b1, w2, b2, wg, bg, act, "out_in")
    torch.testing.assert_close(got, _ref_ffn(x, w1, b1, w2, b2, wg, bg, act), rtol=1e-4, atol=1e-4)
    # the Conv1D layout stores W transposed and gives the same result
    got_t = ffn(x, w1.T.contiguous(), b1, w2.T.contiguous(), b2, wg.T.contiguous() if gated else None, bg, act,
                "in_out")
    torch.testing.assert_close(got_t, got, rtol=1e-4, atol=1e-4)


def test_ffn_op_registration():
    x, w1, w2 = torch.randn(2, 3, 8), torch.randn(16, 8), torch.randn(8, 16)
    torch.library.opcheck(ffn, (x, w1, None, w2, None, None, None, "gelu", "out_in"),
                          test_utils=("test_schema", "test_faketensor"))


def test_attention_mask_and_causal_together():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8)
    for mask in (torch.randn(1, 1, 6, 6), (torch.rand(1, 1, 6, 6) > 0.2) | torch.eye(6, dtype=torch.bool)):
        got = attention(q, k, v, mask, 0.4, True, 0.0)
        torch.testing.assert_close(got, dense_reference(q, k, v, mask, 0.4, True), rtol=1e-5, atol=1e-5)
