"""Soft-capped attention scores (Gemma 2: s -> c·tanh(s / c) before the mask) fuse into ``attnforge::attention``'s
``softcap``: the PyTorch kernel, the Triton kernels (interpreter) and the cached decode equal a dense softcapped
softmax written here; the matcher folds the scale around the tanh and names what it cannot fold; Gemma 2 fuses
exactly and generates Hugging Face's tokens; a variant without a softcap skips the site with the reason."""
from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

import attnforge
from attnforge.runtime.dispatch import use_backend


def softcapped_reference(q, k, v, mask_keep, scale, cap, causal):
    """softmax(c·tanh(scale·q kᵀ / c), over the kept keys) v, K/V repeated per GQA group, in float64."""
    q, k, v = (x.double() for x in (q, k, v))
    g = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(g, 1), v.repeat_interleave(g, 1)
    s = cap * torch.tanh((q @ k.transpose(-1, -2)) * scale / cap)
    keep = torch.ones(s.shape[-2:], dtype=torch.bool)
    if causal:
        keep = keep.tril()
    if mask_keep is not None:
        keep = keep & mask_keep
    return torch.softmax(s.masked_fill(~keep, -math.inf), -1).nan_to_num(0.0) @ v


def _qkv(n=13, m=None, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = m or n
    return (3 * torch.randn(2, 4, n, 16, generator=g, dtype=torch.float64).to(dtype),
            3 * torch.randn(2, 2, m, 16, generator=g, dtype=torch.float64).to(dtype),
            torch.randn(2, 2, m, 16, generator=g, dtype=torch.float64).to(dtype))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("masked", [True, False])
def test_the_pytorch_kernel_is_the_softcapped_softmax(causal, masked, monkeypatch):
    from attnforge.runtime.attention import cpu

    monkeypatch.setattr(cpu, "SOFTCAP_BLOCK", 5)  # several query blocks
    q, k, v = _qkv(dtype=torch.float64)
    pad = torch.ones(2, 1, 1, 13, dtype=torch.bool)
    pad[1, ..., :3] = False
    got = torch.ops.attnforge.attention(q, k, v, pad if masked else None, 0.25, causal, 0.0, 2.0)
    want = softcapped_reference(q, k, v, pad if masked else None, 0.25, 2.0, causal)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    plain = torch.ops.attnforge.attention(q, k, v, pad if masked else None, 0.25, causal, 0.0)
    assert (plain - got).abs().max() > 1e-2  # the cap matters on these inputs


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_triton_kernels_equal_the_reference(dtype):
    pytest.importorskip("triton")
    q, k, v = _qkv(dtype=dtype)
    tol = 1e-4 if dtype == torch.float32 else 3e-3
    with use_backend("triton"):
        prefill = torch.ops.attnforge.attention(q, k, v, None, 0.25, True, 0.0, 2.0)
        decode = torch.ops.attnforge.attention(q[:, :, -1:], k, v, None, 0.25, False, 0.0, 2.0)
    torch.testing.assert_close(prefill.double(), softcapped_reference(q, k, v, None, 0.25, 2.0, True), rtol=tol,
                               atol=tol)
    torch.testing.assert_close(decode.double(), softcapped_reference(q[:, :, -1:], k, v, None, 0.25, 2.0, False),
                               rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_full_cache_decodes_softcapped(backend):
    """Prefill 9 tokens into the ``full`` cache, decode 4 one by one: each output is the reference's row."""
    from attnforge.runtime.cache import POLICIES, VARIANT as CACHED, Site

    if backend == "triton":
        pytest.importorskip("triton")
    q, k, v = _qkv(dtype=torch.float32)
    policy, params = POLICIES["full"], {"softcap": 2.0}
    site = Site(4, 2, 16, 16, 0.25, q.dtype, q.device, params)
    state = policy.allocate(site, 2, 13)
    valid = torch.ones(2, 13, dtype=torch.bool)
    outs = [CACHED.op(q[:, :, :9], k[:, :, :9], v[:, :, :9], state, valid[:, :9], 0, 0.25, "full",
                      *policy.pack(params))]
    with use_backend(backend):
        outs += [CACHED.op(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, valid[:, t:t + 1], t, 0.25,
                           "full", *policy.pack(params)) for t in range(9, 13)]
    got = torch.cat(outs, 2).double()
    torch.testing.assert_close(got, softcapped_reference(q, k, v, None, 0.25, 2.0, True), rtol=1e-4, atol=1e-4)
    stepped, past = [], policy.initial(site, 2)
    for s, e in [(0, 9)] + [(t, t + 1) for t in range(9, 13)]:  # the exported step
        out, past = policy.step(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], past, valid[:, :e], site)
        stepped.append(out)
    torch.testing.assert_close(torch.cat(stepped, 2).double(), got, rtol=1e-4, atol=1e-4)


class SoftcapAttention(nn.Module):
    """Gemma 2's eager attention spelled out, with the scale and cap written as the user's choice."""

    def __init__(self, spelling: str):
        super().__init__()
        self.spelling = spelling
        self.q, self.k, self.v = (nn.Linear(32, 32) for _ in range(3))

    def forward(self, x, mask):
        b, n, _ = x.shape
        q, k, v = (p(x).view(b, n, 2, 16).transpose(1, 2) for p in (self.q, self.k, self.v))
        s = q @ k.transpose(-1, -2)
        if self.spelling == "gemma2":
            s = s * 0.25
            s = torch.tanh(s / 3.0) * 3.0 + mask
        elif self.spelling == "in_place":
            s /= 4.0
            s = s / 3.0
            s = s.tanh()
            s *= 3.0
            s = s + mask
        elif self.spelling == "mask_inside":
            s = torch.tanh((s * 0.25 + mask) / 3.0) * 3.0
        return (torch.softmax(s, -1) @ v).transpose(1, 2).reshape(b, n, 32)


def _mask(n=7):
    m = torch.zeros(1, 1, n, n)
    return m.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -1e9)


@pytest.mark.parametrize("spelling", ["gemma2", "in_place"])
def test_the_matcher_folds_the_scale_around_the_tanh(spelling):
    torch.manual_seed(0)
    model = SoftcapAttention(spelling).eval()
    x = 3 * torch.randn(1, 7, 32)
    opt = attnforge.optimize(model, "fuse-attention", (x, _mask()))
    site = opt.report.sites[0]
    assert site.status == "applied", site.reason
    assert [n for n in opt.program.gm.graph.nodes if "attnforge.attention" in str(n.target)]
    torch.testing.assert_close(opt(x, _mask()), model(x, _mask()), rtol=1e-5, atol=1e-6)
    x2 = 3 * torch.randn(2, 11, 32)
    torch.testing.assert_close(opt(x2, _mask(11)), model(x2, _mask(11)), rtol=1e-5, atol=1e-6)


def test_a_mask_inside_the_tanh_is_a_miss_that_says_so():
    model = SoftcapAttention("mask_inside").eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = attnforge.optimize(model, "fuse-attention", (torch.randn(1, 7, 32), _mask()))
    assert not [s for s in opt.report.sites if s.status == "applied"]
    assert any("soft-capped scores" in m.reason for m in opt.report.misses), opt.report.misses


@pytest.fixture(scope="module")
def gemma2():
    import transformers as tf

    torch.manual_seed(0)
    return tf.Gemma2ForCausalLM(tf.Gemma2Config(vocab_size=100, hidden_size=64, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                head_dim=16, max_position_embeddings=256)).eval()


def test_gemma2_fuses_exactly_and_a_variant_without_softcap_skips_with_the_reason(gemma2):
    ids = torch.randint(3, 100, (1, 12))
    opt = attnforge.optimize(gemma2, "exact", (ids,))
    assert {(s.kind, s.status) for s in opt.report.sites} == {("attention", "applied"), ("ffn", "applied")}
    assert not opt.report.misses
    for shape in ((1, 12), (2, 21)):
        x = torch.randint(3, 100, shape)
        torch.testing.assert_close(opt(x).logits, gemma2(x).logits, rtol=1e-5, atol=1e-5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        sw = attnforge.optimize(gemma2, {"steps": [{"rewrite": "sliding_window", "params": {"window": 4}}]}, (ids,))
    reasons = {s.reason for s in sw.report.sites if s.kind == "attention"}
    assert all(s.status == "skipped" for s in sw.report.sites if s.kind == "attention")
    assert reasons and all("soft-capped scores" in r and "softcap" in r for r in reasons), reasons
