"""Generated Triton attention kernels (codegen/attention.py), run by TRITON_INTERPRET=1 on CPU, against a dense
softmax written out plainly: every mask kind × GQA group × head dim × dtype, ragged lengths, model masks, softcap,
split-KV decode."""
from __future__ import annotations

import os

import pytest
import torch

from attnforge.runtime.block_sparse import block_tables
from test_sparse import _keep_from_table, visible_plain

triton = pytest.importorskip("triton")
if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

from attnforge.codegen import attention as gen  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
SMALL = dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1)  # several full and boundary tiles at N ≈ 50


def dense(q, k, v, keep, scale, mask=None, softcap=0.0):
    """softmax(scale·q kᵀ [→ cap·tanh(·/cap)] + mask, hidden where ``keep`` is False) v, in float64; rows that see
    no key give 0."""
    g = q.shape[1] // k.shape[1]
    q, k, v = q.double().cpu(), k.repeat_interleave(g, 1).double().cpu(), v.repeat_interleave(g, 1).double().cpu()
    s = (q @ k.transpose(-1, -2)) * scale
    if softcap:
        s = softcap * torch.tanh(s / softcap)
    if mask is not None:
        mask = mask.cpu()
        s = s.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else s + mask.double()
    s = s.masked_fill(~keep.cpu(), float("-inf"))
    return torch.softmax(s, -1).nan_to_num(0.0) @ v


def inputs(b, h, hk, n, d, dtype, m=None, seed=0):
    torch.manual_seed(seed)
    m = n if m is None else m
    return (torch.randn(b, h, n, d, dtype=dtype, device=DEV), torch.randn(b, hk, m, d, dtype=dtype, device=DEV),
            torch.randn(b, hk, m, d, dtype=dtype, device=DEV))


def check(got, want, dtype):
    tol = dict(rtol=1e-4, atol=2e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=1e-2)
    assert got.dtype == dtype
    torch.testing.assert_close(got.double().cpu(), want, **tol)


KINDS = {  # name: (kernel kwargs, visibility of key j from query i)
    "none": (dict(causal=False), lambda n: torch.ones(n, n, dtype=torch.bool)),
    "causal": (dict(causal=True), lambda n: torch.ones(n, n, dtype=torch.bool).tril()),
    "window_causal_sinks": (dict(causal=True, window=9, sinks=3), lambda n: visible_plain(n, 9, 3, True)),
    "window_bidir_sinks": (dict(causal=False, window=7, sinks=2), lambda n: visible_plain(n, 7, 2, False)),
    # windows wider than two tiles: the band has tiles inside it, which run without the element-wise test
    "wide_window_causal": (dict(causal=True, window=40), lambda n: visible_plain(n, 40, 0, True)),
    "wide_window_bidir_sinks": (dict(causal=False, window=35, sinks=1), lambda n: visible_plain(n, 35, 1, False)),
    "block_sparse_causal": ("table", True),
    "block_sparse_bidir": ("table", False),
}


def run_kind(kind, q, k, v, mask=None, config=SMALL, **kw):
    """(kernel output, keep matrix) for one mask kind."""
    n = q.shape[2]
    how, rule = KINDS[kind]
    if how == "table":
        counts, idx = block_tables(q.cpu().float(), k.cpu().float(), 16, 1, 1, 1, 5, 0, 0.3, rule)
        keep = _keep_from_table(counts[0, 0], idx[0, 0], n, 16, rule)
        return gen.block_sparse_triton(q, k, v, mask, 0.3, counts.to(DEV), idx.to(DEV), 16, rule, config=config), keep
    return gen.attention_triton(q, k, v, mask, 0.3, config=config, **how, **kw), rule(n)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("head_dim", [32, 64, 80])
@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("kind", list(KINDS))
def test_forward_matches_dense_softmax(kind, groups, head_dim, dtype):
    n = 45  # not a multiple of the 16-row tiles
    q, k, v = inputs(2 if groups == 1 else 1, 2 * groups, 2, n, head_dim, dtype)
    got, keep = run_kind(kind, q, k, v)
    check(got, dense(q, k, v, keep, 0.3), dtype)


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("mask_kind", ["padding", "per_head_additive", "boolean"])
def test_model_mask_is_combined(kind, mask_kind):
    n = 37
    q, k, v = inputs(2, 4, 2, n, 32, torch.float32)
    if mask_kind == "padding":
        mask = torch.zeros(2, 1, 1, n, device=DEV)
        mask[1, ..., 30:] = float("-inf")
    else:
        mask = torch.randn(2, 4, n, n, device=DEV) if mask_kind == "per_head_additive" else \
            torch.rand(1, 1, n, n, device=DEV) > 0.3
    got, keep = run_kind(kind, q, k, v, mask)
    check(got, dense(q, k, v, keep, 0.3, mask), torch.float32)


@pytest.mark.parametrize("kind", ["none", "causal", "window_causal_sinks", "window_bidir_sinks"])
def test_softcap(kind):
    q, k, v = inputs(1, 4, 2, 40, 32, torch.float32)
    q = q * 4  # logits large enough for the cap to bite
    got, keep = run_kind(kind, q, k, v, softcap=5.0)
    check(got, dense(q, k, v, keep, 0.3, softcap=5.0), torch.float32)
    assert (got - run_kind(kind, q, k, v)[0]).abs().max() > 1e-2  # the cap changed the result


def test_default_config_and_lengths_below_one_tile():
    for n in (1, 7, 100):  # the default 64×64 tiles: one partial tile, and a ragged two-tile sequence
        q, k, v = inputs(1, 2, 1, n, 16, torch.float32)
        for kind in ("causal", "window_causal_sinks"):
            got, keep = run_kind(kind, q, k, v, config=None)
            check(got, dense(q, k, v, keep, 0.3), torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_band_with_inner_tiles_in_a_long_sequence(causal):
    """n = 100, window 20: every 16-row block has tiles wholly inside the band on both sides of the diagonal."""
    q, k, v = inputs(1, 2, 1, 100, 16, torch.float32)
    got = gen.attention_triton(q, k, v, None, 0.3, causal, window=20, sinks=2, config=SMALL)
    check(got, dense(q, k, v, visible_plain(100, 20, 2, causal), 0.3), torch.float32)


@pytest.mark.parametrize("tiles", [(32, 16), (16, 32), (64, 16)], ids=lambda t: f"{t[0]}x{t[1]}")
@pytest.mark.parametrize("kind", [k for k in KINDS if KINDS[k][0] != "table"])
def test_query_and_key_tiles_of_different_sizes(kind, tiles):
    q, k, v = inputs(1, 4, 2, 77, 32, torch.float32)
    got, keep = run_kind(kind, q, k, v, config=dict(BLOCK_M=tiles[0], BLOCK_N=tiles[1], num_warps=4, num_stages=1))
    check(got, dense(q, k, v, keep, 0.3), torch.float32)


@pytest.mark.parametrize("causal", [True, False])
def test_sinks_beyond_the_band(causal):
    """Sinks far past the window: bidirectional sinks are seen by every query, including the first blocks whose
    band ends before the last sink (a kernel that only looked left of the band would miss them)."""
    q, k, v = inputs(1, 2, 1, 150, 16, torch.float32)
    for window, sinks in ((5, 100), (3, 149)):
        got = gen.attention_triton(q, k, v, None, 0.3, causal, window=window, sinks=sinks, config=SMALL)
        check(got, dense(q, k, v, visible_plain(150, window, sinks, causal), 0.3), torch.float32)


def test_cross_attention_lengths():
    """N ≠ M: no mask reads all M keys; causal is top-left aligned (key j ≤ query i), as SDPA's is_causal."""
    q, k, v = inputs(1, 2, 2, 20, 32, torch.float32, m=53)
    check(gen.attention_triton(q, k, v, None, 0.3, False, config=SMALL),
          dense(q, k, v, torch.ones(20, 53, dtype=torch.bool), 0.3), torch.float32)
    keep = torch.arange(53)[None, :] <= torch.arange(20)[:, None]
    check(gen.attention_triton(q, k, v, None, 0.3, True, config=SMALL), dense(q, k, v, keep, 0.3), torch.float32)


def test_rows_without_visible_keys_are_zero():
    q, k, v = inputs(1, 2, 2, 24, 16, torch.float32)
    mask = torch.zeros(1, 1, 24, 24, dtype=torch.bool, device=DEV)
    mask[..., :12, :] = True  # rows 12.. see nothing
    got = gen.attention_triton(q, k, v, mask, 0.3, True, config=SMALL)
    assert torch.isfinite(got).all() and got[:, :, 12:].abs().max() == 0
    check(got, dense(q, k, v, torch.ones(24, 24, dtype=torch.bool).tril(), 0.3, mask), torch.float32)


def _count_tiles(monkeypatch, spec):
    """Count the KV tiles a kernel visits (the interpreter calls ``_tile`` through the module's globals)."""
    module = gen.compile_spec(spec)
    calls = []
    original = module._tile

    def counting(*args, **kw):
        calls.append(1)
        return original(*args, **kw)

    monkeypatch.setattr(module, "_tile", counting)
    return calls


def test_sparse_masks_skip_hidden_tiles(monkeypatch):
    """A window of 16 over 256 keys visits ~2 tiles per 16-row query block (+1 sink tile), not 16."""
    q, k, v = inputs(1, 1, 1, 256, 16, torch.float32)
    spec = gen.spec_for(q, k, 0.3, None, mask="window", causal=True, window=16, sinks=4)
    calls = _count_tiles(monkeypatch, spec)
    gen.attention_triton(q, k, v, None, 0.3, True, window=16, sinks=4, config=SMALL)
    blocks = 256 // 16
    assert len(calls) <= 3 * blocks  # dense causal would be blocks·(blocks + 1)/2 = 136
    causal = _count_tiles(monkeypatch, gen.spec_for(q, k, 0.3, None, mask="causal"))
    gen.attention_triton(q, k, v, None, 0.3, True, config=SMALL)
    assert len(causal) == blocks * (blocks + 1) // 2


@pytest.mark.parametrize("groups", [1, 2, 4])
@pytest.mark.parametrize("window,sinks", [(0, 0), (50, 4), (20, 0)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
def test_split_kv_decode(groups, window, sinks, dtype):
    """One query at position M − 1 over M keys, split into 32-key slices (several splits and a sink split)."""
    m = 203
    q, k, v = inputs(2, 2 * groups, 2, 1, 32, dtype, m=m)
    keep = torch.ones(1, m, dtype=torch.bool) if not window else visible_plain(m, window, sinks, True)[-1:]
    got = gen.decode_triton(q, k, v, None, 0.3, window=window, sinks=sinks, config=dict(BLOCK_N=16, SPLIT=32))
    check(got, dense(q, k, v, keep, 0.3), dtype)


def test_decode_with_mask_softcap_and_default_config():
    q, k, v = inputs(2, 4, 2, 1, 80, torch.float32, m=150)
    mask = torch.zeros(2, 1, 1, 150, device=DEV)
    mask[0, ..., 100:] = float("-inf")
    got = gen.decode_triton(q, k, v, mask, 0.3, softcap=3.0)
    check(got, dense(q, k, v, torch.ones(1, 150, dtype=torch.bool), 0.3, mask, softcap=3.0), torch.float32)


def test_sources_are_specialised_cached_and_valid_python():
    a = gen.AttentionSpec(mask="window", causal=True, window=512, sinks=4, head_dim=80, groups=2)
    b = gen.AttentionSpec(mask="window", causal=True, window=256, sinks=4, head_dim=80, groups=2)
    src = gen.source(a)
    compile(src, "<generated>", "exec")
    assert "def attention_fwd" in src and "kvh = h // 2" in src and "< 80" in src and "< 512" in src
    assert "tl.sigmoid" not in src  # no softcap code without a softcap
    assert gen.source(b) != src and "< 256" in gen.source(b)
    assert gen.compile_spec(a) is gen.compile_spec(a)  # one module per spec and process
    assert gen.compile_spec(a).SOURCE_HASH != gen.compile_spec(b).SOURCE_HASH
    assert gen.AttentionSpec.parse("mask=window,window=512,sinks=4,head_dim=80,groups=2,causal=1") == a


@pytest.mark.parametrize("text,why", [("mask=diagonal", "mask must be one of"), ("mask=window", "needs window"),
                                      ("mask=block_sparse,block=24", "power of two"), ("heads=3", "bad kernel spec"),
                                      ("decode=1,mask=block_sparse,block=16", "decode kernels")])
def test_bad_specs_say_why(text, why):
    with pytest.raises(ValueError, match=why):
        gen.AttentionSpec.parse(text)
