"""Linear attention: feature maps, chunked kernels, the softmax-window hybrid, decode, hedgehog calibration."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import attnforge
from attnforge import RecipeError
from attnforge.runtime import linear
from conftest import build_hf, rel_err

op = torch.ops.attnforge.linear_attention
MAPS = ["elu", "relu", "cosine", "taylor", "performer", "hedgehog"]
EPS = 1e-6


@pytest.fixture(autouse=True)
def one_thread():
    """Values, not speed, are tested here: one thread keeps thousands of tiny ops from each waiting on a second
    core that other jobs keep busy (a ~5 ms stall per parallel op on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --------------------------------------------------------------------------- plainly written references


def kernel_plain(q, k, name, scale, w=None, wk=None):
    """φ(q_i)·φ(k_j) for every pair, [..., N, M], written from each map's definition (float64)."""
    q, k = q.double(), k.double()
    if name == "elu":
        return (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)
    if name == "relu":
        return q.clamp(min=0) @ k.clamp(min=0).transpose(-1, -2)
    if name == "cosine":
        return 1 + (q / q.norm(dim=-1, keepdim=True)) @ (k / k.norm(dim=-1, keepdim=True)).transpose(-1, -2)
    if name == "taylor":
        u = (q @ k.transpose(-1, -2)) * scale
        return 1 + u + u * u / 2
    if name == "performer":
        w = w.double()

        def feats(x):
            x = x * math.sqrt(scale)
            return torch.exp(x @ w - (x * x).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[1])

        return feats(q) @ feats(k).transpose(-1, -2)
    if name == "hedgehog":
        yq, yk = q @ w.double(), k @ wk.double()
        fq = torch.cat([torch.softmax(yq, -1), torch.softmax(-yq, -1)], -1)
        fk = torch.cat([torch.softmax(yk, -1), torch.softmax(-yk, -1)], -1)
        return fq @ fk.transpose(-1, -2)
    raise KeyError(name)


def visible_plain(n, causal, keep=None):
    """[.., N, N] keep: j ≤ i when causal, and the key mask."""
    vis = torch.ones(n, n, dtype=torch.bool)
    if causal:
        vis = vis.tril()
    if keep is not None:
        vis = vis & keep[..., None, :]
    return vis


def linear_reference(q, k, v, keep, scale, name, causal, wq=None, wk=None):
    """(A V) / (rowsum A + eps), A = φ(Q)φ(K)ᵀ masked by causality and the key mask: the quadratic form."""
    g = q.shape[1] // k.shape[1]
    wk_rep = wk.repeat_interleave(g, 0) if wk is not None and name == "hedgehog" else wq
    a = kernel_plain(q, k.repeat_interleave(g, 1), name, scale, wq, wk_rep)
    a = a * visible_plain(q.shape[2], causal, keep)
    return ((a @ v.double().repeat_interleave(g, 1)) / (a.sum(-1, keepdim=True) + EPS)).to(q.dtype)


def softmax_reference(q, k, v, keep, scale, causal):
    g = q.shape[1] // k.shape[1]
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    s = s.masked_fill(~visible_plain(q.shape[2], causal, keep), float("-inf"))
    return (torch.softmax(s, -1).nan_to_num(0.0) @ v.double().repeat_interleave(g, 1)).to(q.dtype)


def hybrid_reference(q, k, v, keep, scale, name, causal, window, gamma, wq=None, wk=None):
    """γ e^{s − m} on window pairs + φ(q)·φ(k) (taylor/performer: times e^{−m}) on the other visible pairs."""
    g = q.shape[1] // k.shape[1]
    n = q.shape[2]
    wk_rep = wk.repeat_interleave(g, 0) if wk is not None and name == "hedgehog" else wq
    a = kernel_plain(q, k.repeat_interleave(g, 1), name, scale, wq, wk_rep)
    vis = visible_plain(n, causal, keep)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    band = ((i - j >= 0) & (i - j < window)) if causal else ((i - j).abs() < window)
    s = (q.double() @ k.double().repeat_interleave(g, 1).transpose(-1, -2)) * scale
    s = s.masked_fill(~(vis & band), float("-inf"))
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    rest = a * (vis & ~band)
    if name in ("taylor", "performer"):
        rest = rest * torch.exp(-m)
    weight = gamma.double()[:, None, None] * torch.exp(s - m) + rest
    return ((weight @ v.double().repeat_interleave(g, 1)) / (weight.sum(-1, keepdim=True) + EPS)).to(q.dtype)


def map_weights(name, heads, kv_heads, d, seed=0):
    """(wq, wk) for the op: performer's projection for both, hedgehog's per-head maps (perturbed identity)."""
    gen = torch.Generator().manual_seed(seed)
    if name == "performer":
        w = linear.orthogonal_features(d, 64, seed)
        return w, w
    if name == "hedgehog":
        return tuple(torch.eye(d) + 0.3 * torch.randn(h, d, d, generator=gen) for h in (heads, kv_heads))
    return None, None


def inputs(b=2, h=4, hkv=2, n=37, d=16, seed=0, padded=True):
    torch.manual_seed(seed)
    q, k, v = torch.randn(b, h, n, d), torch.randn(b, hkv, n, d), torch.randn(b, hkv, n, d)
    keep = torch.ones(b, 1, n, dtype=torch.bool)
    if padded:
        keep[-1, :, n - 6:] = False
    return q, k, v, keep


# --------------------------------------------------------------------------- kernels


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("heads", [(4, 4), (4, 2)])
def test_each_feature_map_equals_the_quadratic_reference(name, causal, heads):
    q, k, v, keep = inputs(h=heads[0], hkv=heads[1])
    wq, wk = map_weights(name, *heads, 16)
    want = linear_reference(q, k, v, keep, 0.25, name, causal, wq, wk)
    got = op(q, k, v, keep, 0.25, name, causal, 0, EPS, wq, wk, None)
    assert rel_err(got, want) <= 1e-4
    for chunk in (1, 8, 64):  # the chunk length is a tunable: results must not depend on it
        alt = linear.linear_attention_cpu(q, k, v, keep, 0.25, name, causal, 0, EPS, wq, wk, None, chunk)
        assert rel_err(alt, want) <= 1e-4, chunk


def test_segments_carry_the_state(monkeypatch):
    """Wide features run in segments of chunks; the result is the same as one pass."""
    q, k, v, keep = inputs(n=100)
    monkeypatch.setattr(linear.cpu, "SEGMENT_BYTES", 2 * 4 * 153 * 16)  # ~16 tokens of taylor features per segment
    for causal in (True, False):
        got = linear.linear_attention_cpu(q, k, v, keep, 0.25, "taylor", causal, 0, EPS, None, None, None, 8)
        assert rel_err(got, linear_reference(q, k, v, keep, 0.25, "taylor", causal)) <= 1e-4
    assert linear.cpu._segment_len(2, 4, 153, 100, 8) < 100


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("window", [0, 5])
def test_strictly_causal(name, window):
    q, k, v, _ = inputs(n=50, padded=False)
    wq, wk = map_weights(name, 4, 2, 16)
    mix = torch.zeros(4) if window else None
    base = linear.linear_attention_cpu(q, k, v, None, 0.25, name, True, window, EPS, wq, wk, mix, 16)
    for t in (1, 17, 33):
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        for x in (q2, k2, v2):
            x[:, :, t:] = 10 * torch.randn_like(x[:, :, t:])
        other = linear.linear_attention_cpu(q2, k2, v2, None, 0.25, name, True, window, EPS, wq, wk, mix, 16)
        assert torch.equal(base[:, :, :t], other[:, :, :t]), t


@pytest.mark.parametrize("name", MAPS)
def test_recurrent_decode_equals_the_parallel_form(name):
    """The ``recurrent`` cache policy (runtime/linear/cache.py), one token at a time from an empty state, through
    ``cached_attention``: the parallel form's outputs, in constant memory."""
    from attnforge.runtime.cache import POLICIES, Site

    q, k, v, _ = inputs(n=20, padded=False)
    wq, wk = map_weights(name, 4, 2, 16)
    want = op(q, k, v, None, 0.25, name, True, 0, EPS, wq, wk, None)
    params = {"feature_map": name, "window": 0, "eps": EPS, "wq": wq, "wk": wk, "mix": None}
    policy = POLICIES["recurrent"]
    state = policy.allocate(Site(4, 2, 16, 16, 0.25, q.dtype, q.device, params), 2, 20)
    sizes = {tuple(s.shape for s in state)}
    valid = torch.ones(2, 1, dtype=torch.bool)
    for t in range(20):
        o = torch.ops.attnforge.cached_attention(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, valid,
                                                 max(t, 1) if t else 0, 0.25, "recurrent", *policy.pack(params))
        sizes.add(tuple(s.shape for s in state))
        torch.testing.assert_close(o[:, :, 0], want[:, :, t], rtol=1e-4, atol=1e-5)
    assert len(sizes) == 1  # constant memory per token


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("causal", [True, False])
def test_hybrid_with_window_covering_the_sequence_is_softmax_attention(name, causal):
    q, k, v, keep = inputs()
    wq, wk = map_weights(name, 4, 2, 16)
    want = softmax_reference(q, k, v, keep, 0.25, causal)
    for window in (37, 100):
        got = op(q, k, v, keep, 0.25, name, causal, window, EPS, wq, wk, torch.zeros(4))
        assert rel_err(got, want) <= 1e-4, window


@pytest.mark.parametrize("name", ["elu", "taylor", "performer", "hedgehog"])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("window", [1, 5, 16])
def test_hybrid_equals_its_quadratic_reference(name, causal, window):
    q, k, v, keep = inputs()
    wq, wk = map_weights(name, 4, 2, 16)
    gamma = torch.tensor([0.5, 1.0, 2.0, 8.0])
    want = hybrid_reference(q, k, v, keep, 0.25, name, causal, window, gamma, wq, wk)
    for chunk in (4, 64):
        got = linear.linear_attention_cpu(q, k, v, keep, 0.25, name, causal, window, EPS, wq, wk, gamma.log(), chunk)
        assert rel_err(got, want) <= 1e-4, chunk


def test_window_weight_matches_the_window_mass():
    """γ per head = Σ_win φ(q)·φ(k) / Σ_win e^{s − m}: then the window keeps the linear map's share."""
    q, k, _, keep = inputs(padded=False)
    mix = linear.window_weight(q, k, None, 0.25, "elu", True, 5)
    a = kernel_plain(q, k.repeat_interleave(2, 1), "elu", 0.25)
    i, j = torch.arange(37)[:, None], torch.arange(37)[None]
    band = (i - j >= 0) & (i - j < 5)
    s = ((q.double() @ k.double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25).masked_fill(~band, -math.inf)
    e = torch.exp(s - s.amax(-1, keepdim=True))
    want = (a * band).sum((0, 2, 3)) / e.sum((0, 2, 3))
    torch.testing.assert_close(mix.exp().double(), want, rtol=1e-4, atol=0)
    assert torch.equal(linear.window_weight(q, k, None, 0.25, "taylor", True, 5), torch.zeros(4))


def test_performer_converges_to_softmax_attention():
    """FAVOR+ is an unbiased estimate of exp(scale·q·k): the kernel's error falls like 1/√m and the attention
    output's with it (more slowly: the output is a ratio of noisy sums). Fixed seeds, 8 draws per size."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 64, 16) * 0.7 for _ in range(3))
    want = softmax_reference(q, k, v, None, 0.25, False)
    errors = {}
    for m in (16, 256, 4096):
        outs = [op(q, k, v, None, 0.25, "performer", False, 0, EPS, w, w, None)
                for w in (linear.orthogonal_features(16, m, seed) for seed in range(8))]
        errors[m] = sum(float((o - want).norm() / want.norm()) for o in outs) / len(outs)
    assert errors[256] < errors[16] / 1.8 and errors[4096] < errors[256] / 1.8, errors
    assert errors[4096] < 0.25, errors
    exact = torch.exp((q[0, 0, :8].double() @ k[0, 0, :8].double().T) * 0.25)
    kernel_err = {m: float((kernel_plain(q[0, 0, :8], k[0, 0, :8], "performer", 0.25,
                                         linear.orthogonal_features(16, m, 1)) / exact - 1).abs().mean())
                  for m in (256, 1 << 16)}
    assert kernel_err[1 << 16] < kernel_err[256] / 8 and kernel_err[1 << 16] < 0.05, kernel_err  # √256 = 16


def test_orthogonal_features_are_orthogonal_within_blocks():
    w = linear.orthogonal_features(8, 20, 3).double()
    block = w[:, :8]
    gram = block.T @ block
    assert torch.allclose(gram - torch.diag(torch.diag(gram)), torch.zeros(8, 8, dtype=torch.float64), atol=1e-5)
    assert torch.equal(w, linear.orthogonal_features(8, 20, 3).double())  # seeded


def test_hedgehog_gradients_equal_autograd_of_the_reference():
    q, k, v, keep = (x.double() if x.is_floating_point() else x for x in inputs(n=21))  # float64: exact grads
    wq, wk = (w.double().requires_grad_() for w in map_weights("hedgehog", 4, 2, 16))
    mix = torch.tensor([0.1, -0.3, 0.2, 0.0], dtype=torch.float64, requires_grad=True)
    for window, weights in ((0, (wq, wk)), (4, (wq, wk, mix))):
        got = op(q, k, v, keep, 0.25, "hedgehog", True, window, EPS, wq, wk, mix if window else None)
        grads = torch.autograd.grad(got.square().sum(), weights)
        ref = (linear_reference(q, k, v, keep, 0.25, "hedgehog", True, wq, wk) if not window else
               hybrid_reference(q, k, v, keep, 0.25, "hedgehog", True, window, mix.exp(), wq, wk))
        want = torch.autograd.grad(ref.square().sum(), weights)
        for g, w_ in zip(grads, want):
            torch.testing.assert_close(g, w_.to(g.dtype), rtol=1e-5, atol=1e-9)


# --------------------------------------------------------------------------- the rewrite on models


def _recipe(**params):
    return {"steps": [{"rewrite": "linear", "params": params}]}


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_rewrite_applies_and_respects_padding(family):
    model, args, kwargs = build_hf(family, "eager")
    if family == "llama":  # left padding, as in batched generation
        kwargs = {"attention_mask": torch.ones(2, 12, dtype=torch.long)}
        kwargs["attention_mask"][1, :3] = 0
    opt = attnforge.optimize(model, _recipe(feature_map="elu"), args, kwargs)
    assert opt.report.counts() == {"linear": 2}, [(s.status, s.reason) for s in opt.report.sites]
    assert all(s.info["causal"] == (family != "bert") for s in opt.report.sites)
    if "attention_mask" not in kwargs:
        return
    pad = kwargs["attention_mask"] == 0
    ids = args[0].clone()
    ids[pad] = (ids[pad] + 7) % 100  # change only the padded tokens
    with torch.no_grad():
        a, b = opt(args[0], **kwargs)[0], opt(ids, **kwargs)[0]
    torch.testing.assert_close(a[~pad], b[~pad], rtol=1e-5, atol=1e-6)


class _CustomMask(nn.Module):
    """Attention with a mask that hides different keys from different queries (not key padding)."""

    def forward(self, q, k, v):
        keep = torch.ones(q.shape[-2], q.shape[-2], dtype=torch.bool).triu(2).logical_not()
        keep[5, 0] = False
        return F.scaled_dot_product_attention(q, k, v, attn_mask=keep)


def test_per_query_masks_are_skipped_with_the_reason():
    q = torch.randn(1, 2, 8, 4)
    opt = attnforge.optimize(_CustomMask(), _recipe(feature_map="relu"), (q, q, q), dynamic=False)
    s = opt.report.sites[0]
    assert s.status == "skipped" and "not a key-padding mask" in s.reason


@pytest.mark.parametrize("window", [0, 4])
def test_window_covering_the_sequence_is_exact_on_a_model(window):
    model, args, kwargs = build_hf("llama", "eager")
    opt = attnforge.optimize(model, _recipe(feature_map="elu", window=max(window, 12) if window else 0), args, kwargs)
    with torch.no_grad():
        err = rel_err(opt(*args, **kwargs)[0], model(*args, **kwargs)[0])
    assert (err <= 1e-4) == bool(window), err


def test_report_states_flops_and_error():
    model, args, kwargs = build_hf("llama", "eager")
    rep = attnforge.optimize(model, _recipe(feature_map="performer", features=32), args, kwargs).report
    s = rep.sites[0]
    assert s.info["feature_map"] == "performer" and "N**2" in s.info["flops_before"]
    assert "N**2" not in s.info["flops_after"]
    assert s.error["rel"] > 0


@pytest.mark.parametrize("step,field", [
    ({"params": {}}, "steps[0].params.feature_map"),
    ({"params": {"feature_map": "gelu"}}, "steps[0].params.feature_map"),
    ({"params": {"feature_map": "elu", "window": -1}}, "steps[0].params.window"),
    ({"params": {"feature_map": "performer", "features": 0}}, "steps[0].params.features"),
    ({"params": {"feature_map": "elu", "features": 64}}, "steps[0].params.features"),
    ({"params": {"feature_map": "elu", "eps": 0}}, "steps[0].params.eps"),
    ({"params": {"feature_map": "elu", "windw": 4}}, "steps[0].params.windw"),
])
def test_bad_params(step, field):
    with pytest.raises(RecipeError) as e:
        attnforge.load_recipe({"steps": [{"rewrite": "linear", **step}]})
    assert e.value.field == field, str(e.value)


# --------------------------------------------------------------------------- hedgehog calibration


def test_hedgehog_maps_are_parameters_and_calibration_improves_the_layers():
    model, args, kwargs = build_hf("llama", "eager")
    opt = attnforge.optimize(model, _recipe(feature_map="hedgehog", window=2), args, kwargs)
    names = [n for n, p in opt.graph_module.named_parameters() if "hedgehog" in n and p.requires_grad]
    assert len(names) == 6  # W_q, W_k and the window weights of two layers
    before = {n: p.detach().clone() for n, p in opt.graph_module.named_parameters()}
    torch.manual_seed(1)
    batches = [(torch.randint(0, 100, (4, 12)),) for _ in range(3)]
    result = attnforge.calibrate(opt, batches, steps=60, lr=1e-2, progress=False)
    assert set(result) == {"layers.0.self_attn", "layers.1.self_attn"}
    for r in result.values():
        assert r["mse_after"] < 0.8 * r["mse_before"], r
    for n, p in opt.graph_module.named_parameters():  # only the feature maps moved
        assert torch.equal(p, before[n]) != ("hedgehog" in n), n
    sites = [s for s in opt.report.sites if s.rewrite == "linear"]
    assert all(s.error == s.info["calibration"]["error_after"] for s in sites)
    assert sum("calibrated" in note for note in opt.report.notes) == 2
    text = opt.report.to_text(width=200)
    assert "calibrated layers.0.self_attn" in text and "->" in text


def test_calibrate_refuses_models_without_hedgehog_maps():
    model, args, kwargs = build_hf("llama", "eager")
    opt = attnforge.optimize(model, _recipe(feature_map="elu"), args, kwargs)
    with pytest.raises(ValueError, match="no hedgehog"):
        attnforge.calibrate(opt, [args], steps=1, progress=False)


# --------------------------------------------------------------------------- ONNX


@pytest.mark.parametrize("name", MAPS)
@pytest.mark.parametrize("family,window", [("llama", 0), ("llama", 3), ("bert", 0), ("bert", 3)])
def test_onnx_export_matches_onnxruntime(name, family, window, tmp_path):
    pytest.importorskip("onnxruntime")
    from attnforge.runtime.onnx import export_onnx, run_onnx

    model, args, kwargs = build_hf(family, "eager")
    opt = attnforge.optimize(model, _recipe(feature_map=name, window=window), args, kwargs)
    assert opt.report.counts() == {"linear": 2}
    path = export_onnx(opt.graph_module, args, kwargs, tmp_path / "m.onnx")
    with torch.no_grad():
        want = opt(*args, **kwargs)
    got = run_onnx(path, args, kwargs, want)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
