"""The real CLI, run as a subprocess."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest


def run(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "attnforge.cli", *args], capture_output=True, text=True,
                          timeout=timeout)


@pytest.mark.parametrize("demo", ["tiny-llama", "tiny-bert", "tiny-vit"])
def test_rewrite_demo_prints_report(demo, tmp_path):
    out = tmp_path / "r.json"
    p = run("rewrite", f"demo:{demo}", "--recipe", "exact", "--json", str(out))
    assert p.returncode == 0, p.stdout + p.stderr
    assert "fuse_attention" in p.stdout and "[✓]" in p.stdout and "[x]" not in p.stdout
    rep = json.loads(out.read_text())
    assert rep["counts"] == {"fuse_attention": 2, "fuse_ffn": 2}


def test_recipe_file(tmp_path):
    f = tmp_path / "mine.yaml"
    f.write_text("name: attn-only\nsteps:\n  - rewrite: fuse_attention\n    targets: ['layers.1.*']\n")
    p = run("rewrite", "demo:tiny-llama", "--recipe", str(f))
    assert p.returncode == 0, p.stderr
    assert "skipped" in p.stdout and "attn-only" in p.stdout


@pytest.mark.parametrize("args,needle", [
    (("rewrite", "demo:tiny-gpt9"), "unknown demo"),
    (("rewrite", "nowhere/model.py:build"), "unknown model spec"),
    (("rewrite", "demo:tiny-bert", "--recipe", "fast-please"), "unknown recipe"),
    (("rewrite", "demo:tiny-bert", "--recipe", "missing.yaml"), "does not exist"),
])
def test_bad_input_exit_code_2(args, needle):
    p = run(*args)
    assert p.returncode == 2 and needle in p.stderr, p.stderr


def test_bad_recipe_field(tmp_path):
    f = tmp_path / "bad.json"
    f.write_text(json.dumps({"steps": [{"rewrite": "fuse_ffn", "params": {"window": 4}}]}))
    p = run("rewrite", "demo:tiny-bert", "--recipe", str(f))
    assert p.returncode == 2 and "steps[0].params.window" in p.stderr


def test_recipes_list_and_schema():
    p = run("recipes")
    assert p.returncode == 0 and "exact" in p.stdout and "fuse_attention -> fuse_ffn" in p.stdout
    p = run("recipes", "--schema")
    schema = json.loads(p.stdout)
    assert "steps" in schema["properties"]


def test_console_script_installed():
    import shutil

    exe = shutil.which("attnforge")
    if exe is None:
        pytest.skip("console script not on PATH (package not installed with pip)")
    p = subprocess.run([exe, "recipes"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and "exact" in p.stdout
