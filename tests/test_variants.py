"""The variant registry's contract, for every registered variant (runtime/registry.py): the PyTorch kernel and the
Triton kernel (interpreter) equal the plain reference beside them, the fake gives the real output shapes, gradients
through the op equal gradients through the reference, the cost is a formula of the shapes, and every op a rewrite
inserts has its ONNX translation and synthetic inputs. A variant added to runtime/ is checked here automatically."""
from __future__ import annotations

import math
import os

import pytest
import sympy
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from attnforge.runtime import VARIANTS, Shaped, op_names, variant
from attnforge.runtime.dispatch import use_backend
from attnforge.runtime.linear import hedgehog_init, orthogonal_features

ATTENTION_SHAPE = (2, 4, 37, 16)  # ragged: 37 is no multiple of any tile


def _cases(name: str) -> list[tuple]:
    """Arguments of small calls of each variant (float64 where the reference is compared, as the kernels allow)."""
    torch.manual_seed(0)
    v = VARIANTS[name]
    if name == "ffn":
        return [v.synthetic((13, 16), {"hidden": 24, "activation": act, "gated": gated, "layout": layout},
                            torch.float64, "cpu")
                for act, gated, layout in (("gelu", False, "out_in"), ("silu", True, "out_in"),
                                           ("gelu_tanh", False, "in_out"))]
    if name == "block_sparse_attention":
        shape = (2, 4, 64, 16)
        return [v.synthetic(shape, {"kv_heads": 2, "block": b, "causal": c, "random": 1, "topk": t}, torch.float64,
                            "cpu") for b, c, t in ((16, True, 0), (16, False, 0), (16, True, 1), (8, True, 0))]
    if name == "linear_attention":
        d = torch.float64
        q, k, vv = (torch.randn(2, h, 37, 16, dtype=d) for h in (4, 2, 2))
        keep = torch.ones(2, 1, 37, dtype=torch.bool)  # [B, 1, N]: the key-padding row the pass reads
        keep[1, :, 30:] = False
        hh = hedgehog_init(4, 16).double(), hedgehog_init(2, 16).double()
        perf = orthogonal_features(16, 32, 0).double()
        return [(q, k, vv, None, 0.25, "elu", True, 0, 1e-6, None, None, None),
                (q, k, vv, keep, 0.25, "cosine", False, 0, 1e-6, None, None, None),
                (q, k, vv, None, 0.25, "hedgehog", True, 0, 1e-6, *hh, None),
                (q, k, vv, None, 0.25, "performer", True, 0, 1e-6, perf, perf, None),
                (q, k, vv, keep, 0.25, "elu", True, 5, 1e-6, None, None, torch.randn(4, dtype=d)),
                (q, k, vv, None, 0.25, "taylor", False, 4, 1e-6, None, None, torch.zeros(4, dtype=d))]
    if name == "cached_attention":  # a decode step of a full and of a ring cache, after a prefill of 30 tokens
        from attnforge.runtime.cache import POLICIES, Site

        out = []
        for policy, params in (("full", {}), ("ring", {"window": 8, "sinks": 2})):
            p = POLICIES[policy]
            q, k, vv = (torch.randn(2, h, 31, 16, dtype=torch.float64) for h in (4, 2, 2))
            state = p.allocate(Site(4, 2, 16, 16, 0.25, torch.float64, "cpu", params), 2, 31)
            valid = torch.ones(2, 31, dtype=torch.bool)
            v.op(q[:, :, :30], k[:, :, :30], vv[:, :, :30], state, valid[:, :30], 0, 0.25, policy, *p.pack(params))
            out.append((q[:, :, 30:], k[:, :, 30:], vv[:, :, 30:], state, valid[:, 30:], 30, 0.25, policy,
                        *p.pack(params)))
        return out
    if name == "memory_layer":
        d = torch.float64
        return [(torch.randn(3, 5, 16, dtype=d), torch.randn(2 * 2 ** 8, 12, dtype=d), torch.randn(12, dtype=d), 8),
                (torch.randn(7, 12, dtype=d), torch.randn(3 * 2 ** 4, 5, dtype=d), None, 4)]
    if name == "engram_embed":
        from attnforge.runtime.engram import engram_multipliers, engram_primes

        primes = engram_primes(11, 4)
        return [(torch.randint(0, 50, (2, 9)), torch.randn(sum(primes), 3, dtype=torch.float64),
                 engram_multipliers(50, 3, 0, 1), [2, 3], 2, primes, 0)]
    if v.synthetic is not None:  # attention-like ops, with and without GQA and a padding mask
        out = []
        for causal, kv in ((True, 2), (False, 4)):
            args = list(v.synthetic(ATTENTION_SHAPE, {"kv_heads": kv, "causal": causal}, torch.float64, "cpu"))
            if not causal:
                mask = torch.zeros(2, 1, 1, 37, dtype=torch.float64)
                mask[1, ..., 29:] = -math.inf
                args[3] = mask
            out.append(tuple(args))
        return out
    pytest.fail(f"test_variants.py has no example calls of {name}: add them to _cases")


NAMES = sorted(VARIANTS)


@pytest.mark.parametrize("name", NAMES)
def test_the_pytorch_kernel_equals_the_reference(name):
    v = VARIANTS[name]
    if name == "cached_attention":  # its reference is each layout's variant, over the whole sequence
        from attnforge.runtime.cache import POLICIES
        from tests.test_cache import CASES

        assert set(POLICIES) <= {case.split("_")[0] for case in CASES}, "a cache policy tests/test_cache.py misses"
    for args in _cases(name):
        got, want = v.cpu(*args), v.reference(*args)
        for g, w in zip(*(x if isinstance(x, tuple) else (x,) for x in (got, want))):
            torch.testing.assert_close(g, w.to(g.dtype), rtol=1e-5, atol=1e-6, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_the_op_dispatches_and_its_fake_gives_the_real_shapes(name):
    v = VARIANTS[name]
    for args in _cases(name):
        real = v.op(*args)
        with FakeTensorMode(allow_non_fake_inputs=True) as mode:
            fake_args = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            fake = v.op(*fake_args)
        for r, f in zip(*(x if isinstance(x, tuple) else (x,) for x in (real, fake))):
            assert r.shape == f.shape and r.dtype == f.dtype, name


@pytest.mark.parametrize("name", NAMES)
def test_gradients_through_the_op_equal_gradients_through_the_reference(name):
    v = VARIANTS[name]
    if not v.differentiable:  # an inference-only op (it writes a cache): not in any training graph
        assert v.inserted_by and v.mutates, f"{name} is not differentiable, yet a rewrite could put it in training"
        return
    for args in _cases(name):
        floats = [i for i, (a, arg) in enumerate(zip(args, v.arg_names)) if isinstance(a, torch.Tensor)
                  and a.is_floating_point() and "mask" not in arg]  # masks are data, not trained
        if name == "engram_embed":
            floats = [1]  # only the table is trainable
        grads = []
        for fn in (v.op, v.reference):
            leaves = [a.detach().double().requires_grad_() if i in floats else a for i, a in enumerate(args)]
            out = fn(*leaves)
            out = out[0] if isinstance(out, tuple) else out
            torch.manual_seed(1)
            (out * torch.randn_like(out)).sum().backward()
            grads.append([leaves[i].grad for i in floats])
        for g, w in zip(*grads):
            torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-7, msg=lambda m: f"{name}: {m}")


@pytest.mark.parametrize("name", NAMES)
def test_the_triton_kernel_equals_the_reference_in_the_interpreter(name):
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    v = VARIANTS[name]
    if v.triton is None:
        assert v.waiting or v.inserted_by, f"{name} has no Triton kernel and waits for nothing"
        return
    ran = 0
    for args in _cases(name):
        args = tuple(a.float() if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        if not v.supports(*args):
            continue
        with use_backend("triton"):
            got = v.triton(*args)
        torch.testing.assert_close(got, v.reference(*args), rtol=2e-4, atol=2e-5, msg=lambda m: f"{name}: {m}")
        ran += 1
    assert ran, f"no example call of {name} is covered by its Triton kernel"


@pytest.mark.parametrize("name", NAMES)
def test_cost_is_a_formula_of_the_shapes(name):
    v = VARIANTS[name]
    assert v.cost is not None, name
    n = sympy.Symbol("N", positive=True, integer=True)
    args = _cases(name)[0]

    def symbolic(a):
        if isinstance(a, list):
            return [symbolic(x) for x in a]
        if not isinstance(a, torch.Tensor):
            return a
        shape = tuple(n if d == 37 else sympy.Integer(d) for d in a.shape)
        return Shaped(shape, a.dtype)

    cost = v.cost(*map(symbolic, args))
    assert sympy.sympify(cost.bytes).free_symbols <= {n} and sympy.sympify(cost.bytes) != 0
    flops = sympy.sympify(cost.flops)
    assert flops.free_symbols <= {n}
    if name == "engram_embed":
        assert flops == 0  # integer hashing and a gather
    else:
        assert flops.subs(n, 4096) > 0 if flops.free_symbols else flops > 0  # (window formulas hold for N ≥ w + s)


@pytest.mark.parametrize("name", NAMES)
def test_every_inserted_op_exports_and_tunes_or_says_what_it_waits_for(name):
    v = VARIANTS[name]
    if v.waiting:
        assert not v.rewrite and "#" in v.waiting, f"{name}: waiting ops name the issue that wires them"
        return
    if v.inserted_by:  # a pass inserts it (not a recipe step): it says which
        assert not v.rewrite and "passes/" in v.inserted_by, name
        return
    assert v.rewrite, f"{name}: no rewrite inserts it and it waits for nothing"
    assert v.onnx is not None, f"{name} has no ONNX translation"
    assert variant(v.rewrite) is v and v.name in op_names()


def test_supports_is_the_one_predicate_dispatch_and_the_tuner_ask(monkeypatch):
    """3-D attention ([B·H, N, D]) runs on Triton: the tuner must find its kernel too (they once disagreed)."""
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    v = VARIANTS["attention"]
    q = torch.randn(6, 20, 16)
    args = (q, q, q, None, 0.25, True, 0.0)
    assert v.supports(*args) and len(v.tunables_for(args, "cpu", "triton")) == 1
    monkeypatch.setattr(v, "supports", lambda *a: False)
    assert v.tunables_for(args, "cpu", "triton") == []  # what runs then is SDPA: nothing to tune
    calls = []
    monkeypatch.setattr(v, "cpu", lambda *a: calls.append(a) or q.clone())
    with use_backend("triton"):
        v.op(*args)
    assert len(calls) == 1  # not supported: the PyTorch kernel ran


def test_unknown_ops_are_named_with_a_suggestion():
    with pytest.raises(KeyError, match="did you mean 'sliding_window'"):
        variant("sliding_windw")
