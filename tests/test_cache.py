"""Each cache layout's decode against an independent reference: prefill a prompt into the policy's state through
``attnforge::cached_attention``, decode the rest one token at a time, and compare every real query's output with
the variant's own dense reference (runtime/<variant>/reference) over the whole sequence — on the PyTorch kernels
and, for one query at a time, on the generated split-KV Triton decode kernel (interpreter). GQA (4 query heads
over 2 KV heads) and a left-padded row throughout; memory stays what the policy says."""
from __future__ import annotations

import os

import pytest
import torch

from attnforge.runtime import VARIANTS
from attnforge.runtime.attention import cache as full_cache
from attnforge.runtime.cache import POLICIES, VARIANT as CACHED, Site
from attnforge.runtime.dispatch import use_backend
from attnforge.runtime.linear import hedgehog_init

B, H, HKV, N, D = 2, 4, 2, 23, 16
SCALE = D ** -0.5
PAD = 3  # row 1 is left-padded by 3 tokens


def _inputs(dtype=torch.float64):
    torch.manual_seed(0)
    q = torch.randn(B, H, N, D, dtype=dtype)
    k, v = (torch.randn(B, HKV, N, D, dtype=dtype) for _ in range(2))
    valid = torch.ones(B, N, dtype=torch.bool)
    valid[1, :PAD] = False
    return q, k, v, valid


def _hedgehog():
    torch.manual_seed(1)
    return hedgehog_init(H, D).double(), hedgehog_init(HKV, D).double()


# (variant, its op's parameters after (q, k, v, mask, scale), the policy's params)
CASES = {
    "full": ("attention", lambda: (True, 0.0), lambda: {}),
    "ring": ("sliding_window_attention", lambda: (5, 2, True), lambda: {"window": 5, "sinks": 2}),
    "ring_no_sinks": ("sliding_window_attention", lambda: (4, 0, True), lambda: {"window": 4, "sinks": 0}),
    "recurrent_elu": ("linear_attention", lambda: ("elu", True, 0, 1e-6, None, None, None),
                      lambda: {"feature_map": "elu", "window": 0, "eps": 1e-6, "wq": None, "wk": None, "mix": None}),
    "recurrent_hedgehog_hybrid": (
        "linear_attention", lambda: ("hedgehog", True, 4, 1e-6, *_hedgehog(), torch.linspace(-1, 1, H).double()),
        lambda: {"feature_map": "hedgehog", "window": 4, "eps": 1e-6, "wq": _hedgehog()[0], "wk": _hedgehog()[1],
                 "mix": torch.linspace(-1, 1, H).double()}),
    "blocks_static": ("block_sparse_attention", lambda: (4, 1, 1, 1, 0, 0, True),
                      lambda: {"block": 4, "local": 1, "global_": 1, "random": 1, "seed": 0, "topk": 0}),
    "chunk": ("chunked_attention", lambda: (6, True), lambda: {"chunk": 6}),
    # prompt-time selection with a budget that covers the prompt / no channel pruned: exact (the approximate
    # rules are checked against their definitions in tests/test_kv_compression.py)
    "snapkv": ("snapkv_attention", lambda: (True, 64, 0.0, 4, 5),
               lambda: {"budget": 64, "ratio": 0.0, "window": 4, "kernel": 5}),
    "snapkv_ratio": ("snapkv_attention", lambda: (True, 0, 1.0, 4, 3),
                     lambda: {"budget": 0, "ratio": 1.0, "window": 4, "kernel": 3}),
    "channels": ("think_attention", lambda: (True, 0.0, 4), lambda: {"ratio": 0.0, "window": 4}),
    # DuoAttention: KV head 0 a retrieval head (full cache), head 1 a streaming head (sinks + window)
    "streaming": ("streaming_heads_attention", lambda: ([True, False], 5, 2, True),
                  lambda: {"retrieval": (True, False), "window": 5, "sinks": 2}),
}


def _reference_mask(variant: str, valid):
    if variant == "linear_attention":
        return valid[:, None, :]  # its key row
    return valid[:, None, None, :].expand(B, 1, N, N)  # key padding; the op adds causality


def _decode(case: str, q, k, v, valid, prompt: int, backend: str = "torch"):
    """Outputs [B, H, N, D] of a prefill of ``prompt`` tokens and N − prompt decode steps, and the state sizes."""
    name, _, params = CASES[case]
    params = params()
    policy = POLICIES[case.split("_")[0]]
    site = Site(H, HKV, D, D, SCALE, q.dtype, q.device, params)
    state = policy.allocate(site, B, prompt)
    ints, floats, strs, weights = policy.pack(params)

    def run(s, e):
        nonlocal state
        if policy.grow:
            state = policy.grow(state, e)
        return CACHED.op(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], state, valid[:, s:e], s, SCALE, policy.name,
                         ints, floats, strs, weights)

    outs, sizes = [run(0, prompt)], set()
    with use_backend(backend):
        for t in range(prompt, N):
            outs.append(run(t, t + 1))
            sizes.add(tuple(tuple(s.shape) for s in state))
    return torch.cat(outs, 2), sizes, policy, site


def _want(case: str, q, k, v, valid):
    name, op_params, _ = CASES[case]
    return VARIANTS[name].reference(q, k, v, _reference_mask(name, valid), SCALE, *op_params())


@pytest.mark.parametrize("prompt", [1, 9, N - 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_then_decode_equals_the_variants_dense_reference(case, prompt):
    q, k, v, valid = _inputs()
    got, sizes, policy, site = _decode(case, q, k, v, valid, prompt)
    want = _want(case, q, k, v, valid)
    real = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-10)
    if policy.name in ("ring", "recurrent", "chunk"):  # constant memory: the state never grows while decoding
        assert len(sizes) <= 1
        assert policy.bytes(site, B, 10) == policy.bytes(site, B, 10 ** 6)


def test_the_full_cache_grows_in_chunks_and_keeps_every_key(monkeypatch):
    monkeypatch.setattr(full_cache, "GROW", 4)
    q, k, v, valid = _inputs()
    got, sizes, _, _ = _decode("full", q, k, v, valid, prompt=5)
    assert {s[0][2] for s in sizes} == {8, 12, 16, 20, 24}  # grown 4 positions at a time, never re-allocated per token
    want = _want("full", q, k, v, valid)
    real = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-10)


def test_cache_bytes_are_the_bytes_the_state_holds():
    q, k, v, valid = _inputs(torch.float32)
    for case in ("full", "ring", "recurrent_elu", "chunk"):
        _, _, params = CASES[case]
        policy = POLICIES[case.split("_")[0]]
        site = Site(H, HKV, D, D, SCALE, torch.float32, "cpu", params())
        state = policy.allocate(site, B, 256 if case == "full" else N)
        held = sum(s.numel() * s.element_size() for s in state)
        assert int(policy.bytes(site, B, state[0].shape[2] if case == "full" else N)) == held, case


def test_block_topk_decode_keeps_the_topk_blocks_of_the_current_query():
    """Top-k decode: the query attends exactly to block 0, its own block and the k earlier blocks whose mean key
    scores best against it (a dense reference built from that rule)."""
    q, k, v, valid = _inputs()
    valid[:] = True
    params = {"block": 4, "local": 1, "global_": 1, "random": 0, "seed": 0, "topk": 1}
    policy = POLICIES["blocks"]
    site = Site(H, HKV, D, D, SCALE, q.dtype, q.device, params)
    state = policy.allocate(site, B, N)
    ints, floats, strs, weights = policy.pack(params)
    CACHED.op(q[:, :, :N - 1], k[:, :, :N - 1], v[:, :, :N - 1], state, valid[:, :N - 1], 0, SCALE, "blocks",
              ints, floats, strs, weights)
    got = CACHED.op(q[:, :, -1:], k[:, :, -1:], v[:, :, -1:], state, valid[:, -1:], N - 1, SCALE, "blocks", ints,
                    floats, strs, weights)
    pos, qb = N - 1, (N - 1) // 4
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    means = kk[:, :, :qb * 4].unflatten(2, (qb, 4)).mean(3)  # [B, H, qb, D]
    best = (q[:, :, -1:] @ means.transpose(-1, -2))[:, :, 0].argmax(-1)  # [B, H]
    blocks = torch.arange(N) // 4
    keep = (blocks == 0) | (blocks == qb) | (blocks[None, None] == best[..., None])
    s = (q[:, :, -1:] @ kk.transpose(-1, -2) * SCALE).masked_fill(~keep[:, :, None] | (torch.arange(N) > pos),
                                                                   float("-inf"))
    torch.testing.assert_close(got, s.softmax(-1) @ vv)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", ["full", "ring", "blocks_static", "chunk", "snapkv", "channels"])
def test_decode_on_the_triton_split_kv_kernel_equals_the_reference(case, dtype):
    """Every softmax layout decodes one query on the generated split-KV kernel (codegen/attention.py, interpreter)
    with its visible slots as the kernel's mask."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    from attnforge.codegen import attention as codegen

    q, k, v, valid = _inputs(dtype)
    calls = []
    real_decode = codegen.decode_triton
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(codegen, "decode_triton", lambda *a, **kw: calls.append(1) or real_decode(*a, **kw))
        got, _, _, _ = _decode(case, q, k, v, valid, prompt=N - 3, backend="triton")
    assert len(calls) == 3  # one kernel launch per decode step
    want = _want(case, *(x.double() if x.is_floating_point() else x for x in (q, k, v)), valid)
    real = valid[:, None, :, None].expand_as(got)
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(got[real].double(), want[real], rtol=tol, atol=tol)


@pytest.mark.parametrize("prompt", [1, 9, N - 1])
@pytest.mark.parametrize("case", ["full", "ring", "ring_no_sinks", "recurrent_elu", "snapkv", "channels"])
def test_the_exported_functional_step_equals_the_reference(case, prompt):
    """The step an ONNX decode graph is made of (``CachePolicy.step``: past state in, present out, the mask over
    past and current tokens as optimum passes it) from the initial state: the variant's dense reference."""
    q, k, v, valid = _inputs()
    name, _, params = CASES[case]
    policy = POLICIES[case.split("_")[0]]
    site = Site(H, HKV, D, D, SCALE, q.dtype, q.device, params())
    state = policy.initial(site, B)
    outs = []
    for s, e in [(0, prompt)] + [(t, t + 1) for t in range(prompt, N)]:
        out, state = policy.step(q[:, :, s:e], k[:, :, s:e], v[:, :, s:e], state, valid[:, :e], site)
        outs.append(out)
    got = torch.cat(outs, 2)
    want = _want(case, q, k, v, valid)
    real = valid[:, None, :, None].expand_as(got)
    torch.testing.assert_close(got[real], want[real], rtol=1e-9, atol=1e-10)
    for now, first in zip(state, policy.initial(site, B)):  # only a dim that starts empty grows (the past)
        assert all(a == b or b == 0 for a, b in zip(now.shape, first.shape)), policy.name


def test_per_head_visibility_on_the_triton_decode_kernel_equals_the_pytorch_path():
    """Top-k block-sparse decode: each query head has its own kept blocks (a [B, H, 1, M] mask) — one launch of
    the split-KV kernel equals the PyTorch path (itself checked against the dense rule above)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    q, k, v, valid = _inputs(torch.float32)
    params = {"block": 4, "local": 1, "global_": 1, "random": 0, "seed": 0, "topk": 1}
    policy = POLICIES["blocks"]
    site = Site(H, HKV, D, D, SCALE, q.dtype, q.device, params)
    outs = {}
    for backend in ("torch", "triton"):
        state = policy.allocate(site, B, N)
        CACHED.op(q[:, :, :20], k[:, :, :20], v[:, :, :20], state, valid[:, :20], 0, SCALE, "blocks",
                  *policy.pack(params))
        with use_backend(backend):
            outs[backend] = torch.cat([CACHED.op(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state,
                                                 valid[:, t:t + 1], t, SCALE, "blocks", *policy.pack(params))
                                       for t in range(20, N)], 2)
    torch.testing.assert_close(outs["triton"], outs["torch"], rtol=1e-5, atol=1e-5)
