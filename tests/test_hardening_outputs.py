"""Issue #18, outputs, NaN and selections: output paths are checked before any work (and what the user made is not
overwritten), NaN/inf where both sides have them are equal, a recipe step that selects nothing says so."""
from __future__ import annotations

import importlib
import json
import math

import onnx
import pytest
import torch

from attnforge.recipe import VerifyConfig
from attnforge.tools import cli
from attnforge.verify import compare_outputs, error_stats

SPEC = '''
import torch
import torch.nn.functional as F
from torch import nn


class Attn(nn.Module):
    def __init__(self, d=16, h=2):
        super().__init__()
        self.h, self.qkv = h, nn.Linear(d, 3 * d)

    def forward(self, x):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, D)


def build():
    torch.manual_seed(0)
    return Attn().eval(), (torch.randn(2, 8, 16),)


def nan_lm():
    """A causal LM whose logits are NaN in column 7 everywhere, whatever the rewrite (its LM head's row 7)."""
    from attnforge.demos import build_demo

    model, args, kwargs = build_demo("tiny-llama-lm", input_shape=(1, 8))
    with torch.no_grad():
        model.lm_head.weight[7] = float("nan")
    return model, args, kwargs
'''


@pytest.fixture
def spec(tmp_path):
    f = tmp_path / "model.py"
    f.write_text(SPEC)
    return f


@pytest.fixture
def no_work(monkeypatch):
    """Loading or optimizing the model fails the test: the output checks come first."""
    def started(*a, **k):
        raise AssertionError("the run started before the output paths were checked")

    monkeypatch.setattr(cli, "load_spec", started)
    monkeypatch.setattr(importlib.import_module("attnforge.optimize"), "optimize", started)


def refused(capsys, *argv) -> str:
    assert cli.main(list(argv)) == 2
    return capsys.readouterr().err


# --------------------------------------------------------------------------- output paths, before any work


@pytest.mark.parametrize("argv,option", [
    (["rewrite", "{spec}", "-o", "{tmp}/nodir/x.onnx"], "-o"),
    (["rewrite", "{spec}", "--json", "{tmp}/nodir/x.json"], "--json"),
    (["diff", "{spec}", "--html", "{tmp}/nodir/x.html"], "--html"),
])
def test_an_output_in_a_missing_folder_exits_2_before_the_run(argv, option, spec, tmp_path, no_work, capsys):
    err = refused(capsys, *(a.format(spec=f"{spec}:build", tmp=tmp_path) for a in argv))
    assert f"{option} {tmp_path}/nodir/x." in err and "does not exist" in err and "Traceback" not in err
    assert not (tmp_path / "nodir").exists()


def test_an_output_that_is_a_folder_exits_2_before_the_run(spec, tmp_path, no_work, capsys):
    (tmp_path / "out").mkdir()
    err = refused(capsys, "rewrite", f"{spec}:build", "-o", str(tmp_path / "out"))
    assert f"-o {tmp_path / 'out'}: is a folder" in err


def test_json_onto_the_specs_own_source_file_is_refused_and_leaves_it(spec, no_work, capsys):
    before = spec.read_bytes()
    err = refused(capsys, "rewrite", f"{spec}:build", "--json", str(spec))
    assert f"--json {spec}: is an input" in err
    assert spec.read_bytes() == before


def test_an_existing_file_is_overwritten_only_with_force(spec, tmp_path, monkeypatch, capsys):
    mine = tmp_path / "notes.json"
    mine.write_text('{"my": "notes"}')
    with monkeypatch.context() as m:
        m.setattr(cli, "load_spec", lambda *a, **k: pytest.fail("the run started"))
        err = refused(capsys, "rewrite", f"{spec}:build", "--json", str(mine))
    assert "exists and was not written by attnforge; pass --force" in err
    assert mine.read_text() == '{"my": "notes"}'
    assert cli.main(["rewrite", f"{spec}:build", "--json", str(mine), "--force"]) == 0
    assert json.loads(mine.read_text())["counts"] == {"fuse_attention": 1}


def test_the_files_of_an_earlier_run_are_marked_and_overwritten_without_force(spec, tmp_path, capsys):
    onnx_file, report, html = tmp_path / "m.onnx", tmp_path / "r.json", tmp_path / "r.html"
    argv = ["rewrite", f"{spec}:build", "-o", str(onnx_file), "--json", str(report), "--report", str(html)]
    assert cli.main(argv) == 0
    producer = {p.key: p.value for p in onnx.load(str(onnx_file)).metadata_props}.get("producer")
    assert producer == "attnforge" and json.loads(report.read_text())["producer"] == "attnforge"
    assert "<meta name='generator' content='attnforge'>" in html.read_text()
    for f in (onnx_file, report, html):  # a later run replaces them
        f.write_bytes(f.read_bytes().replace(b"fuse_attention", b"fuse_attentioN"))
    assert cli.main(argv) == 0, capsys.readouterr().err
    assert b"fuse_attentioN" not in report.read_bytes() + html.read_bytes()
    diff = tmp_path / "d.json"
    assert cli.main(["diff", f"{spec}:build", "--json", str(diff)]) == 0
    assert json.loads(diff.read_text())["producer"] == "attnforge"
    assert cli.main(["diff", f"{spec}:build", "--json", str(diff)]) == 0


# --------------------------------------------------------------------------- NaN and inf in verification


def _kind(x: float) -> str:
    return "nan" if math.isnan(x) else "finite" if math.isfinite(x) else ("+inf" if x > 0 else "-inf")


def _plain_stats(got: list[float], ref: list[float]) -> dict:
    """The rule, element by element: non-finite values must match in kind; the rest are compared."""
    if any(_kind(g) != _kind(r) for g, r in zip(got, ref)):
        return {"max_abs": math.inf, "passes_any_budget": False}
    pairs = [(g, r) for g, r in zip(got, ref) if math.isfinite(r)]
    max_abs = max((abs(g - r) for g, r in pairs), default=0.0)
    scale = max((abs(r) for _, r in pairs), default=0.0)
    return {"max_abs": max_abs, "rel": max_abs / scale if scale else 0.0, "passes_any_budget": True}


def test_error_stats_against_a_plain_reference():
    """Random tensors with NaN/±inf at the same places, and (odd seeds) one place where only one side has one."""
    for seed in range(8):
        g = torch.Generator().manual_seed(seed)
        ref = torch.randn(40, generator=g, dtype=torch.float64)
        special = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)
        where = torch.randperm(40, generator=g)[:6]
        ref[where] = special[torch.randint(0, 3, (6,), generator=g)]
        got = ref + 1e-3 * torch.randn(40, generator=g, dtype=torch.float64)
        if seed % 2:  # a finite value where ref has NaN/inf, or NaN where ref is finite
            i = where[seed % 6] if seed % 4 == 1 else torch.isfinite(ref).nonzero()[0, 0]
            got[i] = math.nan if math.isfinite(ref[i]) else 0.5
        want, st = _plain_stats(got.tolist(), ref.tolist()), error_stats(got, ref)
        assert st["max_abs"] == pytest.approx(want["max_abs"]), seed
        if want["passes_any_budget"]:
            assert st["rel"] == pytest.approx(want["rel"]) and st["cosine"] > 0.999 and "note" not in st
        for budget, approximate in ((VerifyConfig(), True), (VerifyConfig(min_cosine=None), True), (1.0, False)):
            assert compare_outputs(ref, got, budget, approximate)[0]["passed"] == want["passes_any_budget"], seed


def test_nan_on_one_side_fails_under_the_cosine_budget_and_says_so():
    ref = torch.randn(2, 8, 16)
    got = ref.clone()
    got[0, 3, 5] = float("nan")  # everything else equal: the cosine of the finite values is 1
    row = compare_outputs(ref, got, VerifyConfig(min_cosine=0.9), approximate=True)[0]
    assert not row["passed"]
    assert row["note"] == "NaN where the original has a finite value (1 of 256 values)"
    inf = ref.clone()
    inf[1, 0, 0] = -math.inf
    got[0, 3, 5], got[1, 0, 0] = ref[0, 3, 5], math.inf
    assert compare_outputs(inf, got, 1e-4)[0]["note"].startswith("+inf where the original has -inf")


def test_rewrite_of_a_model_with_nan_in_its_output_passes(spec, capsys):
    """NaN at the same positions before and after (the decode check's logits included) is equal, not [x]."""
    assert cli.main(["rewrite", f"{spec}:nan_lm"]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "[x]" not in out and "[✓] decode with the cache" in out


# --------------------------------------------------------------------------- selections that select nothing


def test_targets_that_select_nothing_warn_and_fail_under_strict(spec, tmp_path, capsys):
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("name: typo\nsteps:\n  - rewrite: fuse_attention\n    targets: ['layers.9.*']\n")
    report = tmp_path / "r.json"
    assert cli.main(["rewrite", f"{spec}:build", "--recipe", str(recipe), "--json", str(report)]) == 0
    captured = capsys.readouterr()
    warning = "steps[0].targets: targets 'layers.9.*' select none of the 1 fuse_attention site"
    assert f"attnforge: warning: {warning}" in captured.err and warning in captured.out
    assert [w.startswith(warning) for w in json.loads(report.read_text())["warnings"]] == [True]
    strict = tmp_path / "strict.json"
    err = refused(capsys, "rewrite", f"{spec}:build", "--recipe", str(recipe), "--json", str(strict), "--strict")
    assert f"attnforge: error: {warning}" in err and not strict.exists()


def test_skip_that_leaves_no_site_warns_in_the_diff(spec, tmp_path, capsys):
    diff = tmp_path / "d.json"
    assert cli.main(["diff", f"{spec}:build", "--recipe", "long-context", "--json", str(diff)]) == 0
    warning = "steps[2].skip_first: skip_first=1, skip_last=1 select none of the 1 sliding_window site"
    assert warning in capsys.readouterr().err
    assert [w.startswith(warning) for w in json.loads(diff.read_text())["warnings"]] == [True]
