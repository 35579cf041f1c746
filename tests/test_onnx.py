"""ONNX translations of the attnforge ops, run in onnxruntime; and the real CLI's ``-o`` on demo and user models."""
from __future__ import annotations

import json
import subprocess
import sys

import onnx
import pytest
import torch
from torch import nn

from attnforge.runtime.ffn import ACTIVATIONS, ONNX_ACTIVATIONS
from attnforge.runtime.onnx import ExportError, export_onnx, run_onnx

TOL = 1e-4


def _ops(path) -> set[str]:
    return {n.op_type for n in onnx.load(str(path)).graph.node}


def _parity(module, args, path, opset):
    export_onnx(module, args, {}, path, opset)
    with torch.no_grad():
        ref = module(*args)
    got = run_onnx(path, args, {}, ref)
    return [float((g - r).abs().max()) for g, r in zip(got, ref)], _ops(path)


class Attentions(nn.Module):
    """One attention op per case: GQA, boolean/additive masks broadcast over queries, causal, causal + mask, 3D,
    soft-capped scores."""

    def forward(self, q, k, v, kg, vg, pad, bias):
        a = torch.ops.attnforge.attention
        q3, k3, v3 = (t.flatten(0, 1) for t in (q, k, v))
        return (a(q, kg, vg, None, 0.25, False, 0.0),  # GQA, 4 query heads on 2 kv heads
                a(q, kg, vg, pad, 0.25, False, 0.0),  # GQA + boolean padding mask [B, 1, 1, M]
                a(q, k, v, bias, 0.3, False, 0.0),  # additive per-head mask [B, H, N, M]
                a(q, kg, vg, None, 0.25, True, 0.0),  # causal GQA
                a(q, k, v, pad, 0.25, True, 0.0),  # causal and a mask: composition at any opset
                a(q3, k3, v3, None, 0.25, False, 0.0),  # [B·H, N, D] spelling
                a(q, kg, vg, None, 0.25, True, 0.0, 0.5),  # soft-capped (Gemma 2): Attention's softcap
                a(q, k, v, pad, 0.25, True, 0.0, 0.5))  # soft-capped, causal and a mask: Tanh in the composition


def _attention_inputs():
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8)
    kg, vg = torch.randn(2, 2, 6, 8), torch.randn(2, 2, 6, 8)
    pad = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    pad[1, ..., 4:] = False
    return q, k, v, kg, vg, pad, torch.randn(2, 4, 6, 6)


@pytest.mark.parametrize("opset", [23, 18])
def test_attention_translation_matches(opset, tmp_path):
    diffs, ops = _parity(Attentions(), _attention_inputs(), tmp_path / "a.onnx", opset)
    assert max(diffs) <= TOL, diffs
    assert ("Attention" in ops) == (opset >= 23), ops  # Attention where it fits, MatMul/Softmax otherwise
    assert {"MatMul", "Softmax"} <= ops


class FFNs(nn.Module):
    """Every activation, gated (nn.Linear layout) and plain (GPT-2 Conv1D layout)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.gate, self.down = torch.randn(12, 8), torch.randn(12, 8), torch.randn(8, 12)
        self.b_up, self.b_down = torch.randn(12), torch.randn(8)

    def forward(self, x):
        f = torch.ops.attnforge.ffn
        outs = [f(x, self.up, self.b_up, self.down, self.b_down, self.gate, None, act, "out_in") for act in ACTIVATIONS]
        outs.append(f(x, self.up.T.contiguous(), self.b_up, self.down.T.contiguous(), None, None, None, "gelu_tanh",
                      "in_out"))
        return tuple(outs)


@pytest.mark.parametrize("opset", [23, 18])
def test_ffn_translation_matches_for_every_activation(opset, tmp_path):
    assert set(ONNX_ACTIVATIONS) == set(ACTIVATIONS)
    diffs, _ = _parity(FFNs(), (torch.randn(2, 5, 8),), tmp_path / "f.onnx", opset)
    assert len(diffs) == len(ACTIVATIONS) + 1 and max(diffs) <= TOL, dict(zip(list(ACTIVATIONS) + ["in_out"], diffs))


def test_export_failure_names_the_op(tmp_path):
    class Dropped(nn.Module):
        def forward(self, q):
            return torch.ops.attnforge.attention(q, q, q, None, 0.5, False, 0.1)

    with pytest.raises(ExportError, match="attnforge::attention.*dropout_p"):
        export_onnx(Dropped(), (torch.randn(1, 2, 4, 8),), {}, tmp_path / "d.onnx")


def test_translations_come_from_the_registry_and_an_untranslated_op_is_named(tmp_path):
    from attnforge.runtime.registry import VARIANTS, Variant, register

    twice = register(Variant(name="_onnx_test_twice", schema="(Tensor x) -> Tensor", reference=lambda x: x * 2,
                             cpu=lambda x: x * 2, fake=lambda x: torch.empty_like(x)))
    try:
        class Twice(nn.Module):
            def forward(self, x):
                return torch.ops.attnforge._onnx_test_twice(x) + 1

        x = torch.randn(3, 4)
        gm = torch.export.export(Twice(), (x,)).module()
        with pytest.raises(ExportError, match="no ONNX translation for attnforge::_onnx_test_twice"):
            export_onnx(gm, (x,), {}, tmp_path / "t.onnx")  # a graph: checked before exporting
        with pytest.raises(ExportError, match=r"could not translate attnforge\._onnx_test_twice\.default"):
            export_onnx(Twice(), (x,), {}, tmp_path / "t.onnx")  # a module: named from torch.onnx's dispatch error
        twice.onnx = lambda op, x: op.Mul(x, 2.0)  # the variant's translation is what export reads
        diffs, ops = _parity(gm, (x,), tmp_path / "t.onnx", 23)
        assert max(diffs) == 0 and "Mul" in ops
    finally:
        VARIANTS.pop("_onnx_test_twice")


# --------------------------------------------------------------------------- the real CLI


def cli(*args, cwd=None, env=None, timeout=300):
    return subprocess.run([sys.executable, "-m", "attnforge.tools.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd, env=env)


def _onnx_rows(report_json):
    data = json.loads(report_json.read_text())
    assert not data["onnx"]["error"], data["onnx"]
    return data["onnx"]["outputs"]


@pytest.mark.parametrize("spec,recipe,opset", [
    ("demo:tiny-llama", "exact", 23),  # GQA through Attention's kv heads, gated SiLU FFN
    ("demo:tiny-llama", "fuse-attention", 18),  # GQA through the MatMul/Softmax composition
    ("demo:tiny-bert", "exact", 23),  # eager attention with a padding mask, GELU FFN
    ("demo:tiny-vit", "exact", 23),
])
def test_cli_onnx_parity(spec, recipe, opset, tmp_path):
    out, rep = tmp_path / "m.onnx", tmp_path / "r.json"
    p = cli("rewrite", spec, "--recipe", recipe, "-o", str(out), "--opset", str(opset), "--json", str(rep))
    assert p.returncode == 0, p.stdout + p.stderr
    rows = _onnx_rows(rep)
    assert rows and all(r["passed"] and r["max_abs"] <= TOL for r in rows), rows
    assert f"[✓] {rows[0]['name']}: max diff" in p.stdout and "[x]" not in p.stdout
    counts = json.loads(rep.read_text())["counts"]
    ops = _ops(out)
    assert "attnforge" not in str(ops) and ("Attention" in ops) == (opset >= 23)
    assert counts["fuse_attention"] == 2 and counts.get("fuse_ffn", 0) == (2 if recipe == "exact" else 0)


USER_MODEL = '''
import torch
import torch.nn.functional as F
from torch import nn


class Block(nn.Module):
    """Eager attention with a boolean padding mask, then a GELU FFN."""

    def __init__(self, d=32, h=4):
        super().__init__()
        self.h, self.qkv, self.o = h, nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.up, self.down = nn.Linear(d, 64), nn.Linear(64, d)

    def forward(self, x, mask=None):
        B, N, D = x.shape
        q, k, v = self.qkv(x).view(B, N, 3, self.h, D // self.h).permute(2, 0, 3, 1, 4)
        s = q @ k.transpose(-1, -2) / (D // self.h) ** 0.5
        if mask is not None:
            s = s.masked_fill(~mask[:, None, None, :], float("-inf"))
        x = x + self.o((s.softmax(-1) @ v).transpose(1, 2).reshape(B, N, D))
        return x + self.down(F.gelu(self.up(x)))


def build():
    torch.manual_seed(0)
    mask = torch.ones(2, 16, dtype=torch.bool)
    mask[1, 12:] = False
    return Block().eval(), (torch.randn(2, 16, 32),), {"mask": mask}


def bare():
    torch.manual_seed(0)
    return Block()


def pair():
    torch.manual_seed(0)
    return Block(), torch.randn(1, 8, 32)
'''


@pytest.fixture
def user_model(tmp_path):
    f = tmp_path / "mymodel.py"
    f.write_text(USER_MODEL)
    return f


@pytest.mark.parametrize("opset", [23, 18])
def test_cli_onnx_parity_user_spec_file(user_model, opset, tmp_path):
    out, rep = tmp_path / "u.onnx", tmp_path / "u.json"
    p = cli("rewrite", f"{user_model}:build", "-o", str(out), "--opset", str(opset), "--json", str(rep))
    assert p.returncode == 0, p.stdout + p.stderr
    assert json.loads(rep.read_text())["counts"] == {"fuse_attention": 1, "fuse_ffn": 1}
    rows = _onnx_rows(rep)
    assert rows[0]["name"] == "output" and all(r["max_abs"] <= TOL for r in rows), rows
    assert len(rows) == 2 and rows[1]["name"].startswith("output (at ")  # and at another batch and length


def _default_config_llama_folder(path):
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=100, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    model = tf.LlamaForCausalLM(cfg).eval()  # default config: use_cache=True
    model.save_pretrained(path)
    return model


@pytest.mark.parametrize("which", ["demo:tiny-llama", "hf-folder", "minilm"])
def test_dynamic_onnx_at_other_shapes_with_the_mask_and_named_outputs(which, tmp_path, minilm_path):
    """The exported file takes other batch sizes and lengths, keeps attention_mask as an input and names its
    outputs from the model's output structure; onnxruntime there equals the original model."""
    import onnxruntime as ort
    import transformers as tf

    from attnforge.demos import build_demo

    if which == "demo:tiny-llama":
        spec, task, model = which, [], build_demo("tiny-llama")[0]
        names, vocab = ["last_hidden_state"], 256
    elif which == "hf-folder":
        spec, task = str(tmp_path / "llama"), ["--task", "causal-lm"]
        model, names, vocab = _default_config_llama_folder(spec), ["logits"], 100
    else:
        spec, task = minilm_path, []
        model = tf.AutoModel.from_pretrained(minilm_path).eval()
        names, vocab = ["last_hidden_state", "pooler_output"], 1000
    out = tmp_path / "m.onnx"
    p = cli("rewrite", spec, *task, "-o", str(out))
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inputs = [i.name for i in session.get_inputs()]
    assert inputs[:2] == ["input_ids", "attention_mask"], inputs
    assert [o.name for o in session.get_outputs()] == names
    for shape in [(3, 37), (1, 70)]:
        torch.manual_seed(1)
        ids = torch.randint(0, vocab, shape)
        mask = torch.ones(shape, dtype=torch.long)
        mask[-1, shape[1] // 2:] = 0
        feed = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        if "token_type_ids" in inputs:
            feed["token_type_ids"] = torch.zeros(shape, dtype=torch.long).numpy()
        got = session.run(None, feed)
        with torch.no_grad():
            want = model(input_ids=ids, attention_mask=mask)
        for name, g in zip(names, got):
            w = want[name]
            assert g.shape == tuple(w.shape), (name, shape)
            keep = mask.bool() if name != "pooler_output" and g.ndim == 3 else torch.ones(g.shape[:1], dtype=torch.bool)
            err = float((torch.from_numpy(g) - w).abs()[keep].max())  # padded positions are don't-care
            assert err <= 1e-4, (name, shape, err)
