"""``attnforge diff``: the JSON against its schema, the numbers in it, and the HTML in headless Chromium."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import jsonschema
import pytest
import sympy

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = json.loads((ROOT / "docs" / "report-schema.json").read_text())
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--enable-logging=stderr", "--v=0"]


def cli(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "attnforge.tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    p = cli("diff", "demo:tiny-llama", "--json", str(d / "d.json"), "--html", str(d / "d.html"))
    assert p.returncode == 0, p.stdout + p.stderr
    return p, json.loads((d / "d.json").read_text()), d / "d.html"


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    d = tmp_path_factory.mktemp("diff")
    p = cli("diff", "demo:tiny-bert", "--json", str(d / "d.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    return p, json.loads((d / "d.json").read_text())


def test_json_validates_against_schema(llama, bert):
    jsonschema.validate(llama[1], SCHEMA)
    jsonschema.validate(bert[1], SCHEMA)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**bert[1], "sites": [{"fqn": "x"}]}, SCHEMA)


def _degree_in_n(formula: str) -> int:
    n = sympy.Symbol("N")  # locals: a bare "N" is sympy's N() function
    return sympy.degree(sympy.expand(sympy.sympify(formula, locals={"N": n, "B": sympy.Symbol("B")})), n)


def test_sites_regions_and_formulas(bert):
    _, d = bert
    assert d["symbols"]["B"] == 2 and d["symbols"]["N"] == 32
    applied = [s for s in d["sites"] if s["status"] == "applied"]
    assert [s["rewrite"] for s in applied].count("fuse_attention") == 2 and len(applied) == 4
    assert all(s["region"] for s in applied)
    assert d["nodes"]["after"] < d["nodes"]["before"] and d["parameters"]["after"] == d["parameters"]["before"]
    attn = next(s for s in applied if s["kind"] == "attention")
    assert attn["fqn"] == "encoder.layer.0.attention.self" and attn["pattern"] == "eager"
    before, after = attn["region"]["before"], attn["region"]["after"]
    assert {"matmul", "softmax"} <= {n["op"] for n in before["nodes"] if not n["boundary"]}
    assert [n["op"] for n in after["nodes"] if not n["boundary"]][-1] == "attnforge.attention"
    # exact fusion keeps FLOPs (2·N·D per score, twice) and stops materialising the N×N scores
    assert before["flops"] == after["flops"] and before["flops"]["formula"] == "256*B*N**2"
    assert _degree_in_n(before["memory_bytes"]["formula"]) == 2 and _degree_in_n(after["memory_bytes"]["formula"]) == 1
    assert after["memory_bytes"]["value"] == 2 * 4 * 32 * 16 * 4  # the [B, H, N, D] float32 output
    assert d["attention_memory"]["after"]["value"] < d["attention_memory"]["before"]["value"]
    assert all(o["passed"] for o in d["outputs"]) and d["passed"]


def test_gqa_region_drops_repeat_kv(llama):
    p, d, _ = llama
    attn = next(s for s in d["sites"] if s["kind"] == "attention" and s["region"])
    before = [n["op"] for n in attn["region"]["before"]["nodes"] if not n["boundary"]]
    assert "expand" in before and before[-1] == "scaled_dot_product_attention"
    kv = [n for n in attn["region"]["after"]["nodes"] if n["boundary"] and n["shape"][1] == "2"]
    assert kv, "the fused op reads the 2 KV heads directly"
    assert d["attention_memory"]["before"]["formula"] == "1536*B*N" and d["attention_memory"]["after"]["formula"] == \
        "512*B*N"
    assert "layers.0.self_attn" in p.stdout and "[✓] last_hidden_state" in p.stdout


def test_html_is_self_contained(llama):
    page = llama[2].read_text()
    assert page.startswith("<!doctype html>") and "<script" not in page and "<link" not in page
    assert not re.search(r"(src|href)\s*=\s*['\"]?(https?:)?//", page)
    regions = sum(1 for s in llama[1]["sites"] if s["region"])
    assert page.count("<svg") == 2 * regions == 8
    assert "attnforge.attention" in page and "512*B*N" in page


def _chromium():
    exe = shutil.which("chromium") or ("/usr/bin/chromium" if os.path.exists("/usr/bin/chromium") else None)
    if exe is None:
        pytest.skip("headless browser check skipped: Debian's chromium is not installed "
                    "(.ci/run installs it with apt-get when apt works)")
    return exe


def _browse(exe, url, tmp_path, *extra):
    return subprocess.run([exe, *CHROMIUM_FLAGS, f"--user-data-dir={tmp_path / 'profile'}", *extra, url],
                          capture_output=True, text=True, timeout=120)


def _console_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ":CONSOLE" in line]


def test_html_renders_in_headless_chromium(llama, tmp_path):
    exe = _chromium()
    broken = tmp_path / "broken.html"  # the check itself must see console errors
    broken.write_text("<!doctype html><script>console.error('boom'); missingFn();</script>")
    assert len(_console_lines(_browse(exe, broken.as_uri(), tmp_path, "--dump-dom").stderr)) == 2

    url = llama[2].as_uri()
    dom = _browse(exe, url, tmp_path, "--dump-dom")
    assert dom.returncode == 0 and not _console_lines(dom.stderr), _console_lines(dom.stderr)
    assert dom.stdout.count("<svg") == 8 and "Rewritten regions" in dom.stdout
    shot = tmp_path / "diff.png"
    p = _browse(exe, url, tmp_path, "--hide-scrollbars", "--window-size=1760,1500", f"--screenshot={shot}")
    assert p.returncode == 0 and not _console_lines(p.stderr)
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000
    if os.environ.get("ATTNFORGE_UPDATE_SCREENSHOT"):  # refresh the picture in docs/cli.md
        shutil.copy(shot, ROOT / "docs" / "img" / "diff.png")


def test_kv_cache_before_and_after_for_a_model_that_generates(tmp_path):
    """A causal LM's diff states its KV cache in the context length N: the model's own full cache before, the
    sliding window's constant ring after (2 layers × 2 KV heads × 16 dims, fp32)."""
    recipe = tmp_path / "w.json"
    recipe.write_text(json.dumps({"steps": [{"rewrite": "sliding_window", "params": {"window": 8, "sinks": 2}}]}))
    p = cli("diff", "demo:tiny-llama-lm", "--recipe", str(recipe), "--json", str(tmp_path / "d.json"))
    assert p.returncode == 0, p.stdout + p.stderr
    d = json.loads((tmp_path / "d.json").read_text())
    jsonschema.validate(d, SCHEMA)
    per_token = 2 * (2 * (16 + 16) * 4 + 1)
    assert d["kv_cache"]["before"]["formula"] == f"{per_token}*N"
    assert d["kv_cache"]["before"]["value"] == per_token * d["symbols"]["N"]
    assert d["kv_cache"]["after"] == {"formula": str(2 * 10 * (2 * 32 * 4 + 9)), "value": 2 * 10 * (2 * 32 * 4 + 9)}
    assert "KV cache for generation" in p.stdout
