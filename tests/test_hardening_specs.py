"""Issue #18: model files are data (a .pt2 or attnforge archive never runs code unless --trust-pickle), and a bad
model spec is a clear error (exit 2) naming the spec, the file:line or the example input that is wrong.

Each planted payload writes a marker file when it runs; the tests assert the marker never appears."""
from __future__ import annotations

import io
import json
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from attnforge.tools.cli import main


class Attn(nn.Module):
    """A tiny attention block the exact recipe rewrites."""

    def __init__(self, d: int = 16, heads: int = 2):
        super().__init__()
        self.heads, self.qkv, self.out = heads, nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, x):
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v)
        return self.out(y.transpose(1, 2).reshape(b, n, d))


class Payload:
    """Unpickling it writes ``marker``: what an attacker plants."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "pwned"))


def rezip(data: bytes, edit) -> bytes:
    """A copy of the zip ``data``, each member passed through ``edit(name, bytes)`` -> bytes or (new name, bytes)."""
    out = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(data)) as zin, zipfile.ZipFile(out, "w") as zout:
        for name in zin.namelist():
            got = edit(name, zin.read(name))
            name, got = got if isinstance(got, tuple) else (name, got)
            zout.writestr(name, got)
    return out.getvalue()


def saved(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    """A genuine torch.export.save archive: dynamic shapes, a weight, a lifted constant, stored example inputs."""

    class M(Attn):
        def forward(self, x):
            return super().forward(x) * torch.tensor(2.0)

    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    ep = torch.export.export(M().eval(), (x,), dynamic_shapes=({0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO},))
    path = tmp_path_factory.mktemp("pt2") / "good.pt2"
    torch.export.save(ep, path)
    return path


def rewrite(capsys, *argv) -> tuple[int, str]:
    code = main(["rewrite", *map(str, argv)])
    return code, capsys.readouterr().err


def evil(archive: Path, tmp_path: Path, edit) -> Path:
    path = tmp_path / "evil.pt2"
    path.write_bytes(rezip(archive.read_bytes(), edit))
    return path


def assert_refused(code: int, err: str, marker: Path, *needles: str) -> None:
    assert not marker.exists(), "the payload ran"
    assert code == 2, err
    assert "--trust-pickle" in err and "refusing to load" in err, err
    for needle in needles:
        assert needle in err, err


# --------------------------------------------------------------------------- .pt2 archives are data


def test_a_plain_archive_still_loads_and_rewrites(archive, capsys):
    code, err = rewrite(capsys, archive)
    assert code == 0, err


def test_a_payload_in_the_sample_inputs_is_refused_not_run(archive, tmp_path, capsys):
    """torch.export.load retries a failed weights_only load of the sample inputs with weights_only=False."""
    marker = tmp_path / "marker"
    path = evil(archive, tmp_path, lambda n, d: saved(((Payload(marker),), {})) if n.endswith("sample_inputs/model.pt")
                else d)
    code, err = rewrite(capsys, path)
    assert_refused(code, err, marker, "data/sample_inputs/model.pt", "evil.pt2")


def test_a_pickled_weight_is_refused_not_run(archive, tmp_path, capsys):
    """A weight marked use_pickle is torch.load-ed with weights_only=False by torch's archive loader."""
    marker = tmp_path / "marker"
    with zipfile.ZipFile(archive) as z:
        config_name = next(n for n in z.namelist() if n.endswith("model_weights_config.json"))
        config = json.loads(z.read(config_name))
    first = next(iter(config["config"].values()))
    first["use_pickle"] = True

    def edit(name, data):
        if name == config_name:
            return json.dumps(config).encode()
        return saved(Payload(marker)) if name.endswith(f"data/weights/{first['path_name']}") else data

    code, err = rewrite(capsys, evil(archive, tmp_path, edit))
    assert_refused(code, err, marker, "needs unpickling beyond tensors")


def test_a_pickled_python_constant_is_refused_not_run(archive, tmp_path, capsys):
    """An 'opaque object' constant is unpickled with plain pickle.loads."""
    marker = tmp_path / "marker"

    def edit(name, data):
        if name.endswith("model_constants_config.json"):
            config = json.loads(data)
            next(iter(config["config"].values())).update(path_name="opaque_obj_0", use_pickle=True)
            return json.dumps(config).encode()
        if name.endswith("data/constants/tensor_0"):
            return name.replace("tensor_0", "opaque_obj_0"), pickle.dumps(Payload(marker))
        return data

    code, err = rewrite(capsys, evil(archive, tmp_path, edit))
    assert_refused(code, err, marker, "pickled Python object")


def test_code_in_a_shape_expression_is_refused_not_evaluated(archive, tmp_path, capsys):
    """Symbolic sizes are strings torch parses with sympy.sympify, an eval."""
    marker = tmp_path / "marker"

    def edit(name, data):
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        size = program["graph_module"]["graph"]["tensor_values"]["x"]["sizes"][0]["as_expr"]
        size["expr_str"] = f"__import__('pathlib').Path({str(marker)!r}).write_text('x') and {size['expr_str']}"
        return json.dumps(program).encode()

    code, err = rewrite(capsys, evil(archive, tmp_path, edit))
    assert_refused(code, err, marker, "not a plain sympy expression", "__import__")


def test_a_module_named_by_an_input_spec_is_not_imported(archive, tmp_path, capsys, monkeypatch):
    """A defaultdict in an input spec names its default_factory's module, which torch imports."""
    marker = tmp_path / "marker"
    (tmp_path / "h18_planted.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n"
                                             "factory = list\n")
    monkeypatch.syspath_prepend(str(tmp_path))

    def edit(name, data):
        if not name.endswith("models/model.json"):
            return data
        program = json.loads(data)
        signature = program["graph_module"]["module_call_graph"][0]["signature"]
        spec = json.loads(signature["in_spec"])
        spec[1]["children_spec"][1] = {"type": "collections.defaultdict", "children_spec": [
            {"type": None, "context": None, "children_spec": []}], "context": {
            "default_factory_module": "h18_planted", "default_factory_name": "factory", "dict_context": ["x"]}}
        signature["in_spec"] = json.dumps(spec)
        return json.dumps(program).encode()

    code, err = rewrite(capsys, evil(archive, tmp_path, edit))
    assert_refused(code, err, marker, "h18_planted")


def test_compiled_code_shipped_in_an_archive_is_refused(archive, tmp_path, capsys):
    data = rezip(archive.read_bytes(), lambda n, d: d)
    with zipfile.ZipFile(buf := io.BytesIO(data), "a") as z:
        root = z.namelist()[0].split("/")[0]
        z.writestr(f"{root}/data/aotinductor/model/model.so", b"\x7fELF")
    path = tmp_path / "aoti.pt2"
    path.write_bytes(buf.getvalue())
    code, err = rewrite(capsys, path)
    assert_refused(code, err, tmp_path / "none", "AOTInductor")


def test_trust_pickle_is_the_opt_in(archive, tmp_path, capsys):
    """With --trust-pickle the archive loads as torch.export.load reads it (here: its payload runs)."""
    marker = tmp_path / "marker"
    inputs = saved(((torch.randn(2, 8, 16),), {"_": Payload(marker)}))
    path = evil(archive, tmp_path, lambda n, d: inputs if n.endswith("sample_inputs/model.pt") else d)
    main(["rewrite", str(path), "--trust-pickle"])
    capsys.readouterr()
    assert marker.exists()


def test_attnforge_load_reads_its_programs_as_data(tmp_path):
    import attnforge

    torch.manual_seed(0)
    x = torch.randn(2, 8, 16)
    opt = attnforge.optimize(Attn().eval(), "exact", (x,))
    good = attnforge.save(opt, tmp_path / "good.attnforge")
    torch.testing.assert_close(attnforge.load(good)(x), opt(x))

    marker = tmp_path / "marker"

    def inner(name, data):
        return saved(((Payload(marker),), {})) if name.endswith("sample_inputs/model.pt") else data

    def edit(name, data):
        return rezip(data, inner) if name == "program_0.pt2" else data

    bad = tmp_path / "bad.attnforge"
    bad.write_bytes(rezip(good.read_bytes(), edit))
    with pytest.raises(attnforge.SpecError, match="--trust-pickle"):
        attnforge.load(bad)
    assert not marker.exists()


def test_attnforge_load_imports_no_module_lying_about(tmp_path, monkeypatch):
    """``output_modules`` in attnforge.json are imported before loading: only installed ones are."""
    import attnforge

    marker = tmp_path / "marker"
    (tmp_path / "h18_planted_out.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    x = torch.randn(2, 8, 16)
    good = attnforge.save(attnforge.optimize(Attn().eval(), "exact", (x,)), tmp_path / "good.attnforge")

    def edit(name, data):
        if name != "attnforge.json":
            return data
        meta = json.loads(data)
        meta["programs"][0]["output_modules"] = ["h18_planted_out"]
        return json.dumps(meta).encode()

    bad = tmp_path / "bad.attnforge"
    bad.write_bytes(rezip(good.read_bytes(), edit))
    attnforge.load(bad)(x)
    assert not marker.exists()


# --------------------------------------------------------------------------- Hugging Face folders run no code


def _tiny_bert(folder: Path) -> Path:
    from transformers import BertConfig

    BertConfig(vocab_size=32, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
               intermediate_size=32, max_position_embeddings=32).save_pretrained(folder)
    return folder


def test_a_hf_folder_never_unpickles_its_bin_weights(tmp_path, capsys):
    """A guard (transformers' own default already holds): pytorch_model.bin is read with weights_only=True."""
    marker = tmp_path / "marker"
    folder = _tiny_bert(tmp_path / "bert")
    (folder / "pytorch_model.bin").write_bytes(saved({"bert.embeddings.word_embeddings.weight": Payload(marker)}))
    code, err = rewrite(capsys, folder)
    assert not marker.exists() and code == 2, err
    assert "weights_only=True" in " ".join(err.split()), err


def test_a_hf_folder_never_runs_its_own_code(tmp_path, capsys):
    """A guard: a config's auto_map naming the folder's modeling file is not trusted (trust_remote_code=False)."""
    marker = tmp_path / "marker"
    folder = _tiny_bert(tmp_path / "bert")
    (folder / "modeling_evil.py").write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('x')\n")
    config = json.loads((folder / "config.json").read_text())
    config["auto_map"] = {"AutoModel": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    code, err = rewrite(capsys, folder)
    assert not marker.exists() and code == 2, err


# --------------------------------------------------------------------------- bad model specs are clear errors


SPECS = '''
import torch
from torch import nn


class Tokens(nn.Module):
    def __init__(self):
        super().__init__()
        self.emb, self.proj = nn.Embedding(10, 8), nn.Linear(8, 8)

    def forward(self, ids):
        return self.proj(self.emb(ids))


class Seq(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(8, 8)

    def forward(self, x, scale):
        b, n, d = x.shape
        return self.proj(x).view(b * n, d) * scale


def raises():
    raise RuntimeError("weights not found")


def kwargs_list():
    return nn.Linear(4, 4), (torch.randn(2, 4),), [1, 2]


def inputs_int():
    return nn.Linear(4, 4), 3


def float_ids():
    return Tokens(), torch.randn(2, 5)


def int_features():
    return nn.Linear(4, 4), torch.ones(2, 4, dtype=torch.long)


def rank2():
    return Seq(), (torch.randn(5, 8),), {"scale": torch.ones(1)}
'''


@pytest.fixture
def specs(tmp_path) -> Path:
    path = tmp_path / "specs.py"
    path.write_text(SPECS)
    return path


def bad_spec(capsys, spec: str) -> str:
    code, err = rewrite(capsys, spec)
    assert code == 2, err
    return " ".join(err.split())  # rich wraps long lines


def test_a_spec_function_that_raises(specs, capsys):
    err = bad_spec(capsys, f"{specs}:raises")
    assert "raises() raised RuntimeError: weights not found" in err and f"{specs}:" in err
    assert "Traceback" not in err


def test_a_spec_module_with_a_syntax_error(tmp_path, capsys):
    path = tmp_path / "broken.py"
    path.write_text("import torch\n\n\ndef build(:\n    return None\n")
    err = bad_spec(capsys, f"{path}:build")
    assert f"{path}:4" in err and "syntax error" in err


def test_a_spec_module_that_fails_to_import(tmp_path, capsys):
    path = tmp_path / "failing.py"
    path.write_text("import torch\n\nVOCAB = {}['size']\n")
    err = bad_spec(capsys, f"{path}:build")
    assert "KeyError" in err and f"{path}:3" in err


def test_a_third_element_that_is_not_a_dict(specs, capsys):
    err = bad_spec(capsys, f"{specs}:kwargs_list")
    assert "third element" in err and "list" in err


def test_example_inputs_that_are_not_inputs(specs, capsys):
    err = bad_spec(capsys, f"{specs}:inputs_int")
    assert "second element" in err and "int" in err


def test_float_ids_into_an_embedding_name_the_input(specs, capsys):
    err = bad_spec(capsys, f"{specs}:float_ids")
    assert "'ids' (float32[2, 5])" in err and "embedding" in err


def test_integer_features_into_a_linear_name_the_input(specs, capsys):
    err = bad_spec(capsys, f"{specs}:int_features")
    assert "'input' (int64[2, 4])" in err and "linear" in err


def test_a_rank_2_input_where_rank_3_is_needed_names_the_input(specs, capsys):
    err = bad_spec(capsys, f"{specs}:rank2")
    assert "'x' (float32[5, 8])" in err and "'scale'" not in err
    assert "b, n, d = x.shape" in err and "not enough values to unpack" in err


def test_a_wrong_input_shape_for_a_pt2_names_the_input(archive, capsys):
    """A .pt2 saved without inputs, given a rank-2 --input-shape where its graph needs rank 3."""
    ep = torch.export.load(archive)  # a trusted archive of ours, re-saved without example inputs
    ep.example_inputs = None
    bare = archive.parent / "bare.pt2"
    torch.export.save(ep, bare)
    code, err = rewrite(capsys, bare, "--input-shape", "2,16")
    err = " ".join(err.split())
    assert code == 2 and "float32[2, 16]" in err, err


def test_docs_say_what_each_spec_form_may_execute():
    text = (Path(__file__).resolve().parent.parent / "docs" / "cli.md").read_text()
    section = text.split("What a spec may execute", 1)[1].split("\n## ", 1)[0]
    for needle in ("--trust-pickle", "trust_remote_code", "weights_only", ".pt2", "demo:"):
        assert needle in section, needle


def test_optimize_names_the_example_input_the_model_refuses():
    """Through the Python API as through the CLI: an example the model itself cannot run is a CaptureError naming
    the input, not a passthrough that fails at its first call."""
    import attnforge

    with pytest.raises(attnforge.CaptureError, match=r"example input 'input' \(float32\[2, 3\]\) in embedding"):
        attnforge.optimize(torch.nn.Embedding(9, 4), "exact", (torch.zeros(2, 3),))


@pytest.mark.parametrize("reps", ["0", "-3", "x"])
def test_autotune_reps_must_be_a_positive_count(reps, capsys):
    with pytest.raises(SystemExit) as e:
        main(["autotune", "--op", "attention", "--shapes", "1x2x64x16", "--reps", reps])
    assert e.value.code == 2 and "--reps" in capsys.readouterr().err
