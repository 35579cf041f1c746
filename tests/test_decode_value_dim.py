"""The generated split-KV decode kernel (codegen/attention.py ``decode_triton``) when v's head dim differs from
q's and k's (keys with pruned channels, ThinK: q [B, H, 1, Dk], k [B, Hkv, M, Dk], v [B, Hkv, M, Dv]), run by
TRITON_INTERPRET=1 on CPU, against a dense softmax in float64 written out plainly: GQA, per-head and broadcast
boolean masks, window/sinks/softcap, a key length that is not a multiple of the block; its spec keeps the value
dim apart in the kernel name, source and autotune key; ``attend_keys`` (runtime/cache.py) runs it for one query on
the Triton backend."""
from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attnforge.codegen import attention as gen  # noqa: E402
from attnforge.runtime.cache import attend_keys  # noqa: E402
from attnforge.runtime.dispatch import use_backend  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
B, H, HKV, M, DV = 2, 4, 2, 77, 32  # 4 query heads over 2 KV heads; M: 4 full tiles of 16 and a ragged one
SMALL = dict(BLOCK_N=16, SPLIT=32, num_warps=4)  # several splits (and the sink split) at M = 77
SCALE = 0.3


def dense(q, k, v, keep, scale, mask=None, softcap=0.0, window=0, sinks=0):
    """softmax(scale·q kᵀ [→ cap·tanh(·/cap)] + additive mask) v of the one query at position M − 1, keys hidden
    where ``keep`` (broadcastable to [B, H, 1, M]) is False or outside the window, in float64; rows that see no
    key give 0."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.double().cpu(), k.repeat_interleave(g, 1).double().cpu(), v.repeat_interleave(g, 1).double().cpu()
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        s = s + mask.double().cpu()
    n = k.shape[2]
    j = torch.arange(n)
    seen = torch.ones(n, dtype=torch.bool) if not window else (n - 1 - j < window) | (j < sinks)
    s = s.masked_fill(~(keep.cpu() & seen), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def inputs(dk, dv, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, H, 1, dk, generator=g)
    k = torch.randn(B, HKV, M, dk, generator=g)
    v = torch.randn(B, HKV, M, dv, generator=g)
    return (x.to(dtype=dtype, device=DEV) for x in (q, k, v))


def keep_mask(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    shape = (B, H, 1, M) if kind == "per_head" else (B, 1, 1, M)
    keep = torch.rand(shape, generator=g) > 0.4
    if kind == "per_head":
        keep[1, 2] = False  # a head that sees no key: 0
        keep[0, 1, :, 40:] = False  # a head that sees only the first splits
    else:
        keep[1, ..., :50] = False  # a row that sees only the last splits
    return keep.to(DEV)


def check(got, want, dtype):
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    assert got.dtype == dtype and got.shape == want.shape
    torch.testing.assert_close(got.double().cpu(), want, **tol)


@pytest.mark.parametrize("mask", ["per_head", "broadcast"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("dk,dv", [(12, DV), (24, DV), (16, 16)])
def test_decode_with_its_own_value_dim(dk, dv, dtype, mask):
    """Boolean masks [B, H, 1, M] (per head) and [B, 1, 1, M] (the same for every head) with GQA; Dk < Dv, Dk not a
    power of two; Dk == Dv as before."""
    q, k, v = inputs(dk, dv, dtype)
    keep = keep_mask(mask)
    got = gen.decode_triton(q, k, v, keep, SCALE, config=SMALL)
    assert got.shape == (B, H, 1, dv)
    check(got, dense(q, k, v, keep, SCALE), dtype)


def test_decode_value_dim_with_window_sinks_softcap_additive_mask_and_default_config():
    q, k, v = inputs(12, DV, torch.float32, seed=2)
    mask = torch.zeros(B, H, 1, M, device=DEV)
    mask[0, 3, ..., 70:] = float("-inf")
    mask[1, :, ..., 60:] = -1.5
    got = gen.decode_triton(q, k, v, mask, SCALE, window=30, sinks=5, softcap=3.0, config=SMALL)
    want = dense(q, k, v, torch.ones(1, M, dtype=torch.bool), SCALE, mask, softcap=3.0, window=30, sinks=5)
    check(got, want, torch.float32)
    check(gen.decode_triton(q, k, v, mask, SCALE, softcap=3.0),  # the default config, looked up under its own key
          dense(q, k, v, torch.ones(1, M, dtype=torch.bool), SCALE, mask, softcap=3.0), torch.float32)


def test_the_spec_keeps_the_value_dim_apart():
    """A kernel for Dv != Dk is its own spec: name, source, source hash and autotune key; Dv == Dk is the spec (and
    the source, hash and key) it always was."""
    q, k, v = inputs(12, DV, torch.float32)
    spec = gen.spec_for(q, k, SCALE, None, decode=True, value_dim=v.shape[-1])
    same = gen.spec_for(q, k, SCALE, None, decode=True)
    assert spec.value_dim == DV and spec.v_dim == DV and same.v_dim == 12 and spec != same
    assert spec.name == "decode_none_g2_d12v32_float32" and same.name == "decode_none_g2_d12_float32"
    assert gen.source(spec) != gen.source(same) and "value_dim" not in gen.source(same)
    assert gen.compile_spec(spec).SOURCE_HASH != gen.compile_spec(same).SOURCE_HASH
    assert str(gen._key(spec, 1, M, DEV)) != str(gen._key(same, 1, M, DEV))
    equal = gen.spec_for(q, k, SCALE, None, decode=True, value_dim=12)
    assert equal == same and gen.source(equal) == gen.source(same)  # one spelling of "v's head dim is q's"
    assert gen.AttentionSpec.parse("decode=1,head_dim=12,value_dim=32,groups=2") == gen.AttentionSpec(
        decode=True, head_dim=12, value_dim=32, groups=2)
    with pytest.raises(ValueError, match="needs decode=1"):
        gen.AttentionSpec(head_dim=12, value_dim=32)  # the prefill kernel takes v's head dim equal to q's
    with pytest.raises(ValueError, match="value_dim must be"):
        gen.AttentionSpec(decode=True, value_dim=-1)


@pytest.mark.parametrize("per_head", [False, True], ids=["shared", "per_head"])
def test_attend_keys_on_triton_runs_the_kernel_for_its_own_value_dim(monkeypatch, per_head):
    """One query on the Triton backend: ``attend_keys`` (runtime/cache.py) launches the split-KV kernel with
    Dk != Dv, and equals the dense softmax (a row that sees no key gives 0)."""
    q, k, v = inputs(24, DV, torch.float32, seed=3)
    keep = keep_mask("per_head" if per_head else "broadcast", seed=4)  # per head: head 2 of row 1 sees no key
    if not per_head:
        keep[0] = False  # row 0 sees no key
    visible = keep if per_head else keep[:, 0]  # [B, H, T, M] or [B, T, M]
    calls = []
    real = gen.decode_triton
    monkeypatch.setattr(gen, "decode_triton", lambda *a, **kw: calls.append(a[2].shape) or real(*a, **kw))
    with use_backend("triton"):
        got = attend_keys(q, k, v, visible, SCALE)
    assert calls == [v.shape]
    check(got, dense(q, k, v, keep, SCALE), torch.float32)
