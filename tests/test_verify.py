"""Verification: per-site rollback of exact rewrites over tolerance, error statistics, reports."""
from __future__ import annotations

import json
import math

import torch

import attnforge
from attnforge.verify import compare_outputs, error_stats
from conftest import LAYERS, build_hf


def test_exact_site_over_tolerance_is_rolled_back():
    model, args, kwargs = build_hf("gpt2", "eager")
    # an impossible tolerance: every site whose fused op differs in the last bit is rolled back
    recipe = {"name": "too-tight", "steps": [{"rewrite": "fuse_attention"}], "verify": {"rtol": 1e-30}}
    opt = attnforge.optimize(model, recipe, args, kwargs)
    rolled = [s for s in opt.report.sites if s.status == "rolled_back"]
    assert len(rolled) == LAYERS
    assert all("rtol" in s.reason and s.error["rel"] > 0 for s in rolled)
    assert opt.report.counts() == {}
    assert not [n for n in opt.graph_module.graph.nodes if "attnforge" in str(n.target)]
    with torch.no_grad():  # the rolled-back graph is the original one
        assert torch.equal(opt(*args, **kwargs)[0], model(*args, **kwargs)[0])


def test_failing_replacement_is_rolled_back(monkeypatch):
    from attnforge.runtime import VARIANTS

    def broken(*a, **k):
        raise RuntimeError("kernel exploded")

    monkeypatch.setattr(VARIANTS["attention"], "cpu", broken)
    model, args, kwargs = build_hf("bert", "sdpa")
    opt = attnforge.optimize(model, "fuse-attention", args, kwargs, verify=False)
    assert {s.status for s in opt.report.sites} == {"rolled_back"}
    assert "kernel exploded" in opt.report.sites[0].reason


def test_error_stats():
    ref = torch.tensor([1.0, -2.0, 4.0])
    st = error_stats(ref + torch.tensor([0.0, 0.0, 0.004]), ref)
    assert math.isclose(st["max_abs"], 0.004, rel_tol=1e-4) and math.isclose(st["rel"], 0.001, rel_tol=1e-4)
    assert st["cosine"] > 0.9999
    inf = torch.tensor([float("-inf"), 1.0])
    assert error_stats(inf.clone(), inf)["max_abs"] == 0.0
    assert error_stats(torch.tensor([0.0, 1.0]), inf)["max_abs"] == math.inf
    assert error_stats(torch.zeros(2), torch.zeros(3))["max_abs"] == math.inf


def test_compare_outputs_names_and_structure():
    ref = {"a": torch.ones(2), "b": (torch.zeros(1), torch.arange(3))}
    rows = compare_outputs(ref, {"a": torch.ones(2) * 1.5, "b": (torch.zeros(1), torch.arange(3))}, atol=0.1)
    by = {r["name"]: r for r in rows}
    assert not by["a"]["passed"] and by["b.0"]["passed"] and by["b.1"]["passed"]
    assert not compare_outputs(ref, {"a": torch.ones(2)}, atol=1)[0]["passed"]


def test_report_views():
    model, args, kwargs = build_hf("vit", "eager")
    rep = attnforge.optimize(model, "exact", args, kwargs).report
    d = json.loads(rep.to_json())
    assert d["counts"] == rep.counts() == {"fuse_attention": LAYERS, "fuse_ffn": LAYERS}
    assert {s["status"] for s in d["sites"]} == {"applied"}
    assert d["outputs"][0]["name"] == "last_hidden_state"
    text = rep.to_text()
    assert "fuse_attention" in text and "[✓]" in text
    assert set(rep.timings) >= {"capture", "match", "rewrite", "verify"}
