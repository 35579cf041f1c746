"""``memoryformer``: the memory layer against a plain reference, its conversion, the rewrite, Triton and ONNX."""
from __future__ import annotations

import math
import os

import pytest
import torch

import attnforge
from attnforge import RecipeError
from attnforge.passes.memoryformer import MemoryFormerParams, centroid_tables, convert
from attnforge.runtime.memoryformer import memory_hash
from conftest import assert_unchanged, build_hf, other_inputs, rel_err, snapshot

memory_layer = torch.ops.attnforge.memory_layer


def triton_device() -> str:
    """Where the Triton kernels run: the GPU, else CPU tensors through the interpreter (conftest sets it)."""
    pytest.importorskip("triton")
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("no GPU and TRITON_INTERPRET is not set")
    return "cpu"


def recipe(**params):
    return {"steps": [{"rewrite": "memoryformer", "params": params}]}


def plain_reference(x, table, bias, tau, g):
    """Loops over tokens and chunks in Python floats: y, and the gradients of ⟨y, g⟩ from the paper's formulas
    (dT[row] += w·g, dw = ⟨g, T[row]⟩, dz_j = dw·w·2·sign(z_j)·(1 − σ(2|z_j|)), db = Σ g)."""
    d, d_out = x.shape[-1], table.shape[1]
    xs, gs, t = x.reshape(-1, d).tolist(), g.reshape(-1, d_out).tolist(), table.tolist()
    y = [[0.0] * d_out for _ in xs]
    dx = [[0.0] * d for _ in xs]
    dt = [[0.0] * d_out for _ in t]
    rows = []
    for n, z in enumerate(xs):
        rows.append([])
        for k in range(d // tau):
            chunk = z[k * tau:(k + 1) * tau]
            idx = sum((1 << (tau - 1 - j)) for j, v in enumerate(chunk) if v >= 0)
            sig = [1 / (1 + math.exp(-2 * abs(v))) for v in chunk]
            w = math.prod(sig)
            row = k * 2 ** tau + idx
            rows[-1].append(row)
            dw = sum(a * b for a, b in zip(gs[n], t[row]))
            for o in range(d_out):
                y[n][o] += w * t[row][o] + (bias[o].item() if bias is not None and k == 0 else 0.0)
                dt[row][o] += w * gs[n][o]
            for j, v in enumerate(chunk):
                sign = (v > 0) - (v < 0)
                dx[n][k * tau + j] = dw * w * 2 * sign * (1 - sig[j])
    db = torch.tensor(gs, dtype=torch.float64).sum(0) if bias is not None else None
    as_t = lambda a, like: torch.tensor(a, dtype=torch.float64).view(like.shape)  # noqa: E731
    return as_t(y, torch.empty(*x.shape[:-1], d_out)), torch.tensor(rows), as_t(dx, x), as_t(dt, table), db


@pytest.mark.parametrize("tau,d", [(1, 3), (3, 12), (4, 16), (8, 16)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_forward_and_gradients_equal_plain_reference(tau, d, with_bias):
    torch.manual_seed(tau)
    x = torch.randn(2, 3, d, dtype=torch.float64, requires_grad=True)
    table = torch.randn(d // tau * 2 ** tau, 5, dtype=torch.float64, requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True) if with_bias else None
    g = torch.randn(2, 3, 5, dtype=torch.float64)
    y = memory_layer(x, table, bias, tau)
    want_y, want_rows, want_dx, want_dt, want_db = plain_reference(x.detach(), table.detach(), bias, tau, g)
    assert torch.equal(memory_hash(x.detach(), tau)[0].reshape(-1, d // tau), want_rows)  # bit for bit
    torch.testing.assert_close(y, want_y, rtol=1e-12, atol=1e-12)
    grads = torch.autograd.grad(y, [x, table] + ([bias] if with_bias else []), g)
    torch.testing.assert_close(grads[0], want_dx, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(grads[1], want_dt, rtol=1e-10, atol=1e-12)
    if with_bias:
        torch.testing.assert_close(grads[2], want_db)


def test_hash_is_msb_first_with_chunk_offsets():
    x = torch.tensor([[0.5, -1.0, 2.0, 0.0, -3.0, -0.1, -2.0, 1.0]])  # chunks 1011 and 0001 (τ = 4)
    rows, w = memory_hash(x, 4)
    assert rows.tolist() == [[0b1011, 16 + 0b0001]]
    sig = torch.sigmoid(2 * x.abs()).view(2, 4)
    torch.testing.assert_close(w[0], sig.prod(-1))


@pytest.mark.parametrize("tau,d,tokens,d_out", [(3, 12, 5, 7), (4, 32, 70, 96), (8, 16, 33, 130)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_kernel_equals_cpu_kernel(tau, d, tokens, d_out, dtype):
    dev = triton_device()
    from attnforge.runtime.memoryformer.triton import memory_layer_triton

    torch.manual_seed(0)
    x = torch.randn(tokens, d).to(dtype)
    table = torch.randn(d // tau * 2 ** tau, d_out).to(dtype)
    bias = torch.randn(d_out).to(dtype)
    got = memory_layer_triton(x.to(dev), table.to(dev), bias.to(dev), tau).cpu()
    want = memory_layer(x.float(), table.float(), bias.float(), tau)
    torch.testing.assert_close(got.float(), want, rtol=1e-5 if dtype == torch.float32 else 2e-3,
                               atol=1e-5 if dtype == torch.float32 else 2e-2)


def test_centroids_are_exact_when_each_bucket_holds_one_point():
    """c = Σ w z / Σ w² = z / w for a single point, so w·T[b] = W_k z: the conversion is exact on such data."""
    torch.manual_seed(0)
    tau, d = 4, 16
    points = torch.randn(3, d)
    points[1] = -points[0]  # different signs: different buckets in every chunk
    points[2] = points[0].abs() + 0.1
    points[2, ::2] *= -1
    z = points.repeat(5, 1)
    assert all(len(set(r.tolist())) == 3 for r in memory_hash(points, tau)[0].T)  # one point per bucket
    w = torch.randn(8, d)
    table = centroid_tables(w, z, tau)
    torch.testing.assert_close(memory_layer(z, table, None, tau), z @ w.T, rtol=1e-5, atol=1e-5)


def _structured(tokens, d, seed=0):
    """Inputs with low-rank structure (as activations have): 4 directions plus a little noise."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(tokens, 4, generator=g) @ torch.randn(4, d, generator=g) + 0.1 * torch.randn(tokens, d,
                                                                                                     generator=g)


def test_conversion_error_decreases_with_calibration():
    torch.manual_seed(0)
    w = torch.randn(48, 32) / 32 ** 0.5
    z = _structured(512, 32)
    _, plain = convert(w, z, MemoryFormerParams(tau=4, calibrate=False))
    _, tuned = convert(w, z, MemoryFormerParams(tau=4, calibrate=True, steps=24))
    assert plain["rel_error_centroids"] == pytest.approx(tuned["rel_error_centroids"])
    assert tuned["rel_error_refined"] < 0.8 * tuned["rel_error_centroids"]
    assert tuned["fit_rel_error"][1] < tuned["fit_rel_error"][0]
    # held-out tokens pick the iterate: never worse than the centroids there
    assert tuned["heldout_tokens"] == 64 and tuned["heldout_rel_error"][1] <= tuned["heldout_rel_error"][0]
    # the sign-vector fallback alone (no calibration tokens) is far worse than bucket centroids
    empty = centroid_tables(w, z[:0], 4)
    assert rel_err(memory_layer(z, empty, None, 4), z @ w.T) > plain["rel_error_centroids"]


def _site_errors(rep):
    return {s.fqn: s.error["rel"] for s in rep.sites if s.status == "applied"}


def test_rewrite_replaces_ffn_projections_and_calibration_lowers_site_errors():
    model, args, kwargs = build_hf("llama", "eager")
    before = snapshot(model)
    plain = attnforge.optimize(model, recipe(tau=4, calibrate=False), args, kwargs)
    tuned = attnforge.optimize(model, recipe(tau=4), args, kwargs)
    assert_unchanged(model, before)
    assert tuned.report.counts() == {"memoryformer": 6}
    roles = {s.fqn.rsplit(".", 1)[1]: (s.status, s.reason) for s in tuned.report.sites}
    assert {r for r, (st, _) in roles.items() if st == "applied"} == {"gate_proj", "up_proj", "down_proj"}
    assert "leave out q" in roles["q_proj"][1]
    e_plain, e_tuned = _site_errors(plain.report), _site_errors(tuned.report)
    assert all(e_tuned[f] < e_plain[f] for f in e_plain)
    for s in tuned.report.sites:
        if s.status == "applied":
            assert s.info["rel_error_refined"] < s.info["rel_error_centroids"]
    targets = [n for n in tuned.graph_module.graph.nodes if n.target is memory_layer.default]
    assert len(targets) == 6
    with torch.no_grad():
        ref, got = model(*args, **kwargs)[0], tuned(*args, **kwargs)[0]
        assert 0 < rel_err(got, ref) < 0.1
        a2, k2 = other_inputs("llama", args, kwargs)  # not specialised to the example shapes
        assert tuned(*a2, **k2)[0].shape == model(*a2, **k2)[0].shape


@pytest.mark.parametrize("family,fused", [("gpt2", True), ("bert", False)])
def test_qkv_projections_when_asked(family, fused):
    model, args, kwargs = build_hf(family, "eager")
    opt = attnforge.optimize(model, recipe(tau=4, projections=["q", "k", "v"], steps=4), args, kwargs)
    applied = [s for s in opt.report.sites if s.status == "applied"]
    assert len(applied) == (2 if fused else 6)  # GPT-2's c_attn computes q, k and v at once: one site
    assert all(set(s.info["roles"]) <= {"q", "k", "v"} for s in applied)
    one = attnforge.optimize(model, recipe(tau=4, projections=["q"], steps=4), args, kwargs)
    assert one.report.counts().get("memoryformer", 0) == (0 if fused else 2)  # a fused qkv needs all three


def test_report_states_costs_and_table_memory():
    model, args, kwargs = build_hf("bert", "eager")
    rep = attnforge.optimize(model, {"steps": [{"rewrite": "memoryformer", "params": {"tau": 8, "steps": 2},
                                                "targets": ["*.0.intermediate.dense"]}]}, args, kwargs).report
    (s,) = [s for s in rep.sites if s.status == "applied"]
    d, d_out, tau, k = 64, 96, 8, 8
    assert s.fqn == "encoder.layer.0.intermediate.dense"
    assert s.info["macs_per_token"] == [d * d_out, k * d_out + k * tau]
    assert s.info["weight_bytes"] == [4 * d * d_out, 4 * k * 2 ** tau * d_out]  # 2^τ/τ = 32 times the weight
    assert s.info["bytes_per_token_decode"][1] < s.info["bytes_per_token_decode"][0]
    assert s.info["bytes_per_token_batch"][1] > s.info["bytes_per_token_batch"][0]  # 24 tokens share W
    assert s.info["calibration_tokens"] == 24 and s.error["rel"] > 0


def test_tau_not_dividing_the_width_skips_the_site():
    model, args, kwargs = build_hf("bert", "eager")
    rep = attnforge.optimize(model, recipe(tau=5), args, kwargs).report
    assert rep.counts() == {}
    assert {s.reason for s in rep.sites if "does not divide" in s.reason} == {
        "tau=5 does not divide the input width 64", "tau=5 does not divide the input width 96"}


@pytest.mark.parametrize("params,field", [
    ({"tau": 0}, "steps[0].params.tau"), ({"tau": 17}, "steps[0].params.tau"),
    ({"projections": ["o"]}, "steps[0].params.projections[0]"), ({"projections": []}, "steps[0].params.projections"),
    ({"steps": -1}, "steps[0].params.steps"), ({"targets": ["x"]}, "steps[0].params.targets"),
])
def test_bad_params(params, field):
    with pytest.raises(RecipeError) as e:
        attnforge.load_recipe(recipe(**params))
    assert e.value.field == field, str(e.value)


def test_tables_are_trainable_parameters():
    model, args, kwargs = build_hf("llama", "eager")
    opt = attnforge.optimize(model, recipe(tau=4, steps=2), args, kwargs)
    tables = {n: p for n, p in opt.named_parameters() if n.endswith("memory_table")}
    assert len(tables) == 6 and all(p.requires_grad for p in tables.values())
    opt(*args, **kwargs)[0].square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in tables.values())


@pytest.mark.parametrize("family", ["llama", "bert", "gpt2"])
def test_onnx_export_matches_onnxruntime(family, tmp_path):
    pytest.importorskip("onnxruntime")
    from attnforge.runtime.onnx import export_onnx, run_onnx

    model, args, kwargs = build_hf(family, "eager")
    opt = attnforge.optimize(model, recipe(tau=4, steps=4), args, kwargs)
    assert opt.report.counts()["memoryformer"] == 4 + 2 * (family == "llama")
    path = export_onnx(opt.graph_module, args, kwargs, tmp_path / "m.onnx")
    with torch.no_grad():
        want = opt(*args, **kwargs)
    got = run_onnx(path, args, kwargs, want)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
