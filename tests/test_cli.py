"""The real CLI: ``main(argv)`` in this process, as the console script calls it, or a subprocess where the
environment must differ at import time (``PYTHONPATH``, ``TRITON_INTERPRET``)."""
from __future__ import annotations

import contextlib
import io
import json
import os
import subprocess
import sys
import traceback
import warnings
from types import SimpleNamespace

import pytest
import torch

from tests.test_onnx import USER_MODEL

IN_PROCESS_ENV = {"ATTNFORGE_CACHE_DIR"}  # read at each call, so patching os.environ is enough


def run(*args, timeout=300, cwd=None, env=None):
    """``returncode``, ``stdout`` and ``stderr`` of ``attnforge ARGS``: a traceback is exit 1 with the traceback on
    stderr, as from the console script; warnings are printed to stderr as Python prints them."""
    changed = {k for k in set(env or {}) | set(os.environ) if (env or os.environ).get(k) != os.environ.get(k)}
    if not changed <= IN_PROCESS_ENV:
        return subprocess.run([sys.executable, "-m", "attnforge.tools.cli", *args], capture_output=True, text=True,
                              timeout=timeout, cwd=cwd, env=env)
    from attnforge.tools.cli import main

    out, err = io.StringIO(), io.StringIO()
    saved_env, saved_cwd = dict(os.environ), os.getcwd()
    try:
        os.environ.update({k: env[k] for k in changed})
        if cwd is not None:
            os.chdir(cwd)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = lambda m, c, f, n, file=None, line=None: sys.stderr.write(
                warnings.formatwarning(m, c, f, n, line))
            try:
                code = main(list(map(str, args)))
            except SystemExit as e:  # argparse
                code = e.code if isinstance(e.code, int) else 0 if e.code is None else 1
            except Exception:  # noqa: BLE001 - what a user would see: a traceback and exit 1
                traceback.print_exc()
                code = 1
    finally:
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
    return SimpleNamespace(returncode=code, stdout=out.getvalue(), stderr=err.getvalue())


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
    (("rewrite", "demo:tiny-gpt9"), "unknown demo 'tiny-gpt9'"),
    (("rewrite", "nowhere/model.py:build"), "model file 'nowhere/model.py' does not exist"),
    (("rewrite", "nowhere/program.pt2"), "model file 'nowhere/program.pt2' does not exist"),
    (("rewrite", "gpt-17"), "unknown model spec 'gpt-17'"),
    (("diff", "no_such_module_xyz:build"), "cannot import module 'no_such_module_xyz'"),
    (("rewrite", "demo:tiny-bert", "--recipe", "fast-please"), "unknown recipe 'fast-please'"),
    (("diff", "demo:tiny-bert", "--recipe", "missing.yaml"), "recipe file 'missing.yaml' does not exist"),
    (("rewrite", "demo:tiny-bert", "--input-shape", "2,a"), "--input-shape '2,a'"),
    (("rewrite", "demo:tiny-bert", "-o", "m.onnx", "--opset", "13"), "--opset 13"),
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


# --------------------------------------------------------------------------- model specs


@pytest.fixture
def user_model(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text(USER_MODEL)
    return f


def _counts(path):
    return json.loads(path.read_text())["counts"]


def test_spec_file_forms(user_model, tmp_path):
    """file.py:fn returning a bare model (+ --input-shape); package.module:fn returning (model, inputs)."""
    rep = tmp_path / "r.json"
    p = run("rewrite", f"{user_model}:bare", "--input-shape", "2,8,32", "--json", str(rep))
    assert p.returncode == 0, p.stderr
    assert _counts(rep) == {"fuse_attention": 1, "fuse_ffn": 1}
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    p = run("rewrite", "mymodel:pair", "--json", str(rep), env=env)
    assert p.returncode == 0, p.stderr
    assert _counts(rep) == {"fuse_attention": 1, "fuse_ffn": 1}
    p = run("rewrite", f"{user_model}:bare")
    assert p.returncode == 2 and "without example inputs: pass --input-shape" in p.stderr, p.stderr
    p = run("rewrite", f"{user_model}:nothing")
    assert p.returncode == 2 and "has no function 'nothing'" in p.stderr, p.stderr


def test_spec_pt2_archive(user_model, tmp_path):
    sys.path.insert(0, str(tmp_path))
    try:
        import mymodel
    finally:
        sys.path.remove(str(tmp_path))
    model, args, kwargs = mymodel.build()
    torch.export.save(torch.export.export(model, args, kwargs), tmp_path / "with.pt2")
    bare = torch.export.export(mymodel.bare().eval(), (torch.randn(2, 8, 32),))
    bare.example_inputs = None
    torch.export.save(bare, tmp_path / "without.pt2")
    rep = tmp_path / "r.json"
    p = run("rewrite", str(tmp_path / "with.pt2"), "--json", str(rep))
    assert p.returncode == 0, p.stderr
    assert _counts(rep) == {"fuse_attention": 1, "fuse_ffn": 1}
    p = run("rewrite", str(tmp_path / "without.pt2"))
    assert p.returncode == 2 and "stores no example inputs: pass --input-shape" in p.stderr, p.stderr
    p = run("rewrite", str(tmp_path / "without.pt2"), "--input-shape", "2,8,32")
    assert p.returncode == 0 and "[✓]" in p.stdout, p.stdout + p.stderr


def test_spec_hf_folder(tmp_path):
    """A local Hugging Face folder, offline, with --task picking the head."""
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, use_cache=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(tmp_path / "tiny")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    rep = tmp_path / "r.json"
    p = run("rewrite", str(tmp_path / "tiny"), "--task", "causal-lm", "--input-shape", "1,12", "--json", str(rep),
            env=env)
    assert p.returncode == 0, p.stderr
    assert _counts(rep) == {"fuse_attention": 1, "fuse_ffn": 1} and "logits" in p.stdout
    p = run("rewrite", str(tmp_path / "tiny"), "--task", "telepathy", env=env)
    assert p.returncode == 2 and "unknown --task 'telepathy'" in p.stderr, p.stderr
    p = run("rewrite", str(tmp_path))
    assert p.returncode == 2 and "has no config.json" in p.stderr, p.stderr


def test_dry_run_plans_without_rewriting(tmp_path):
    out = tmp_path / "never.onnx"
    p = run("rewrite", "demo:tiny-bert", "--dry-run", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("planned") >= 4 and "dry run: 4 planned rewrites; nothing was changed" in p.stdout
    assert "applied nothing" in p.stdout and not out.exists()


def test_progress_names_each_stage_and_report_html(tmp_path):
    page = tmp_path / "r.html"
    p = run("rewrite", "demo:tiny-vit", "-o", str(tmp_path / "v.onnx"), "--report", str(page))
    assert p.returncode == 0, p.stderr
    for stage in ("load demo:tiny-vit", "capture", "step 1/2: fuse_attention", "step 2/2: fuse_ffn", "verify",
                  "export ONNX, opset 23", "run the ONNX file in onnxruntime", "diff against the unrewritten graph"):
        assert stage in p.stderr, p.stderr
    assert page.read_text().count("<svg") == 8 and "layers.1.mlp" in page.read_text()


def _env(cache):
    return {**os.environ, "ATTNFORGE_CACHE_DIR": str(cache)}


def test_autotune_one_op_then_show(tmp_path):
    """CPU tuning of the sliding-window kernel: a table of the winner, then the cache lists it."""
    p = run("autotune", "--op", "sliding_window", "--shapes", "1x2x256x16", "--params", "window=32,sinks=2",
            "--device", "cpu", "--reps", "1", env=_env(tmp_path))
    assert p.returncode == 0, p.stderr
    assert "sliding_window_cpu" in p.stdout and "n=256,d=16,w=32" in p.stdout and "speedup" in p.stdout
    entries = json.loads((tmp_path / "autotune.json").read_text())["entries"]
    (entry,) = entries.values()
    assert entry["config"]["block"] in (16, 32, 64, 128, 256) and entry["complete"]
    shown = run("autotune", "--show", "--cache", str(tmp_path))
    assert shown.returncode == 0 and "1 entries" in shown.stdout and "sliding_window_cpu" in shown.stdout


def test_autotune_a_rewritten_model(tmp_path):
    """--model records the kernels the rewritten model calls at the --input-shape length: both layers run the
    same window kernel at the same shape, so they share one cache entry."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: win\nsteps:\n  - rewrite: fuse_attention\n  - rewrite: sliding_window\n"
                      "    params: {window: 16, sinks: 2}\n")
    p = run("autotune", "--model", "demo:tiny-llama", "--recipe", str(recipe), "--input-shape", "1,96",
            "--device", "cpu", "--reps", "1", "--cache", str(tmp_path / "c"))
    assert p.returncode == 0, p.stderr
    entries = json.loads((tmp_path / "c" / "autotune.json").read_text())["entries"]
    assert [e["shape"] for e in entries.values()] == ["n=128,d=16,w=16"]  # two layers, one key


def test_autotune_a_model_on_the_triton_backend_in_the_interpreter(tmp_path):
    """--backend triton on CPU (TRITON_INTERPRET=1): the model is rewritten on the PyTorch kernels, then the
    generated attention and FFN kernels it calls are recorded and tuned (the plumbing a GPU run takes)."""
    env = {**_env(tmp_path), "TRITON_INTERPRET": "1"}
    p = run("autotune", "--model", "demo:tiny-llama", "--backend", "triton", "--device", "cpu", "--budget", "4",
            "--reps", "1", env=env)
    assert p.returncode == 0, p.stderr
    assert "interpreter" in p.stdout
    kernels = {e["kernel"] for e in json.loads((tmp_path / "autotune.json").read_text())["entries"].values()}
    assert kernels == {"attn_none_g2_d16_float32_masked", "ffn_glu_silu"}  # the demo has a padding mask


def test_autotune_with_nothing_to_tune(tmp_path):
    p = run("autotune", "--op", "attention", "--shapes", "1x2x64x16", "--device", "cpu", "--cache", str(tmp_path))
    assert p.returncode == 0 and "nothing to tune" in p.stdout


@pytest.mark.parametrize("args,needle", [
    (("autotune",), "give --model SPEC"),
    (("autotune", "--op", "softmax", "--shapes", "1x2x64x16"), "--op 'softmax'"),
    (("autotune", "--op", "attention"), "--op needs --shapes"),
    (("autotune", "--op", "attention", "--shapes", "64x16"), "takes q's shape BxHxNxD"),
    (("autotune", "--op", "sliding_window", "--shapes", "1x2x64x16", "--params", "windw=8"), "windw"),
    (("autotune", "--op", "attention", "--shapes", "1x3x64x16", "--params", "kv_heads=2"), "must divide"),
    (("autotune", "--op", "attention", "--shapes", "1x2x64x16", "--budget", "0"), "--budget"),
    (("autotune", "--op", "attention", "--shapes", "1x2x64x16", "--dtype", "float8"), "--dtype"),
    (("codegen", "--dump", "mask=diagonal"), "mask must be one of"),
])
def test_autotune_and_codegen_bad_input_exit_2(args, needle, tmp_path):
    p = run(*args, env=_env(tmp_path))
    assert p.returncode == 2, p.stdout + p.stderr
    assert needle in p.stderr


def test_codegen_dump_prints_the_generated_source():
    p = run("codegen", "--dump", "mask=window,window=512,sinks=4,head_dim=80,groups=2,dtype=float16")
    assert p.returncode == 0, p.stderr
    assert "@triton.jit" in p.stdout and "def attention_fwd" in p.stdout and "kvh = h // 2" in p.stdout
    compile(p.stdout, "<dump>", "exec")


def test_codegen_arch_compiles_for_a_gpu_without_one():
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = run("codegen", "--dump", "mask=causal,head_dim=64,dtype=float16", "--arch", "90", env=env)
    assert p.returncode == 0, p.stderr[-2000:]
    assert "attention_fwd: compiled for sm_90" in p.stderr and "bytes of shared memory" in p.stderr
    p = run("codegen", "--dump", "mask=causal", "--arch", "90", env={**env, "TRITON_INTERPRET": "1"})
    assert p.returncode == 2 and "unset TRITON_INTERPRET" in p.stderr


def test_every_user_facing_error_is_an_attnforge_error_and_exits_2(tmp_path):
    """One hierarchy (attnforge/errors.py); the CLI maps each to exit code 2: here an ONNX export that cannot
    translate an op. An unusable cache folder (a file where the folder should be) is no error: it warns, and the
    run keeps its results in memory (issue #18)."""
    import attnforge
    from attnforge.codegen.autotune import CorruptCache

    for cls in (attnforge.RecipeError, attnforge.CaptureError, attnforge.SpecError, attnforge.ExportError,
                attnforge.CacheError, CorruptCache):
        assert issubclass(cls, attnforge.AttnforgeError), cls
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    p = run("autotune", "--op", "sliding_window", "--shapes", "1x2x64x16", "--params", "window=8", "--reps", "1",
            "--cache", str(blocker), env=_env(tmp_path))
    assert p.returncode == 0 and "in memory only" in p.stderr and str(blocker) in p.stderr, p.stderr
    dropout = tmp_path / "dropout.py"
    dropout.write_text(DROPOUT_MODEL)
    p = run("rewrite", f"{dropout}:build", "--recipe", "fuse-attention", "-o", str(tmp_path / "d.onnx"),
            env=_env(tmp_path))
    assert p.returncode == 2 and "could not translate attnforge::attention" in p.stderr, p.stdout + p.stderr


DROPOUT_MODEL = '''
import torch

import attnforge  # noqa: F401  (defines torch.ops.attnforge)


class Attn(torch.nn.Module):
    def forward(self, q):
        return torch.ops.attnforge.attention(q, q, q, None, 0.5, False, 0.1)  # dropout: no ONNX form


def build():
    return Attn(), (torch.randn(2, 2, 8, 16),)
'''


def test_a_capture_failure_is_crossed_out_on_the_capture_line(tmp_path):
    spec = tmp_path / "dd.py"
    spec.write_text("import torch\n\n\nclass M(torch.nn.Module):\n    def forward(self, x):\n"
                    "        return x * 2 if x.sum() > 0 else -x\n\n\n"
                    "def build():\n    return M(), (torch.randn(2, 3),)\n")
    p = run("rewrite", "dd.py:build", cwd=tmp_path)
    assert "✗ capture: failed, the model runs unchanged" in p.stderr, p.stderr
    assert "capture failed, the model runs unchanged" in p.stdout
    p = run("rewrite", "dd.py:build", "--strict", cwd=tmp_path)
    assert p.returncode == 2 and "could not capture" in p.stderr


def _demo_lm_tokens(prompt: list[int], new: int) -> list[int]:
    """What opt.generate gives for demo:tiny-llama-lm in this process (the reference for the CLI's stream)."""
    import warnings

    import attnforge
    from attnforge.demos import build_demo

    model, args, kwargs = build_demo("tiny-llama-lm")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = attnforge.optimize(model, "exact", args, kwargs)
    return opt.generate(torch.tensor([prompt]), max_new_tokens=new)[0, len(prompt):].tolist()


def test_generate_streams_the_tokens_generate_gives():
    p = run("generate", "demo:tiny-llama-lm", "--prompt-ids", "5,6,7,8", "--max-new-tokens", "6")
    assert p.returncode == 0, p.stderr[-2000:]
    streamed = [int(t) for t in p.stdout.split()]
    assert streamed == _demo_lm_tokens([5, 6, 7, 8], 6)
    assert "tokens/s decoding" in p.stderr and "KV cache" in p.stderr and "bytes at 10 tokens" in p.stderr


def test_generate_with_a_text_prompt_and_a_tokenizer_folder(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = {f"w{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(words, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="w0").save_pretrained(tmp_path)
    p = run("generate", "demo:tiny-llama-lm", "--prompt", "w5 w6 w7 w8", "--tokenizer", str(tmp_path),
            "--max-new-tokens", "5")
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == [f"w{t}" for t in _demo_lm_tokens([5, 6, 7, 8], 5)]


@pytest.mark.parametrize("args, message", [
    ([], "--prompt-ids 1,2,3 or as --prompt"),
    (["--prompt-ids", "1,x"], "expected integers"),
    (["--prompt-ids", "1,2", "--max-new-tokens", "-1"], "--max-new-tokens -1"),
    (["--prompt", "hello"], "needs a tokenizer"),
    (["--prompt-ids", "1,2", "--do-sample", "--top-p", "2"], "top_p"),
])
def test_generate_refuses_bad_input_with_exit_code_2(args, message):
    p = run("generate", "demo:tiny-llama-lm", *args)
    assert p.returncode == 2 and message in p.stderr, p.stderr[-2000:]


def test_a_model_that_does_not_generate_exits_2():
    p = run("generate", "demo:tiny-bert", "--prompt-ids", "1,2,3")
    assert p.returncode == 2 and "bidirectional" in p.stderr, p.stderr[-2000:]


def test_rewrite_for_text_generation_writes_the_decode_step_and_checks_it(tmp_path):
    p = run("rewrite", "demo:tiny-llama-lm", "--recipe", "exact", "--task", "text-generation", "-o",
            str(tmp_path / "onnx"))
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
    assert (tmp_path / "onnx" / "model.onnx").exists()
    layout = json.loads((tmp_path / "onnx" / "decode_layout.json").read_text())
    assert layout["inputs"][3] == "past_key_values.0.key" and layout["outputs"][1] == "present.0.key"
    assert "[✓] greedy tokens, 8 steps, batch 2 left-padded (full cache)" in p.stdout
    recipe = tmp_path / "b.json"
    recipe.write_text(json.dumps({"steps": [{"rewrite": "block_sparse", "params": {"block": 4}}]}))
    p = run("rewrite", "demo:tiny-llama-lm", "--recipe", str(recipe), "--task", "text-generation", "-o",
            str(tmp_path / "b"))
    assert p.returncode == 2 and "'blocks' cache has no exported decode step" in p.stderr, p.stderr[-2000:]
