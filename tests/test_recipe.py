"""Recipe validation: every bad recipe is a RecipeError naming the field; targets select by FQN."""
from __future__ import annotations

import json

import pytest

import attnforge
from attnforge import Recipe, RecipeError, load_recipe, recipe_schema
from conftest import build_hf


def test_builtin_and_dict_and_object():
    r = load_recipe("exact")
    assert [s.rewrite for s in r.steps] == ["fuse_attention", "fuse_ffn"]
    assert load_recipe({"steps": [{"rewrite": "fuse_ffn"}]}).steps[0].rewrite == "fuse_ffn"
    assert load_recipe(r) == r


def test_yaml_and_json_files(tmp_path):
    y = tmp_path / "r.yaml"
    y.write_text("name: mine\nsteps:\n  - rewrite: fuse_attention\n    targets: ['layers.*']\nverify: {atol: 1.0e-3}\n")
    r = load_recipe(y)
    assert r.name == "mine" and r.steps[0].targets == ["layers.*"] and r.verify.atol == 1e-3
    j = tmp_path / "r.json"
    j.write_text(json.dumps({"steps": [{"rewrite": "fuse_ffn"}]}))
    assert load_recipe(str(j)).steps[0].rewrite == "fuse_ffn"


@pytest.mark.parametrize("recipe,field", [
    ({"steps": [{"rewrite": "fuse_attn"}]}, "steps[0].rewrite"),
    ({"steps": [{"rewrite": "fuse_ffn", "params": {"window": 3}}]}, "steps[0].params.window"),
    ({"steps": [{"rewrite": "fuse_ffn", "target": ["x"]}]}, "steps[0].target"),
    ({"steps": [{"rewrite": "fuse_ffn", "targets": "layers.*"}]}, "steps[0].targets"),
    ({"steps": [{"rewrite": "fuse_ffn", "targets": ["re:(unclosed"]}]}, "steps[0].targets"),
    ({"steps": []}, "steps"),
    ({"stepz": [{"rewrite": "fuse_ffn"}]}, "stepz"),
    ({"steps": [{"rewrite": "fuse_ffn"}], "verify": {"rtol": -1}}, "verify.rtol"),
    ({"steps": [{"rewrite": "fuse_ffn"}], "verify": {"atol": "tight"}}, "verify.atol"),
    ("no-such-recipe", "recipe"),
    ("missing.yaml", "recipe"),
])
def test_bad_recipes_name_the_field(recipe, field):
    with pytest.raises(RecipeError) as e:
        load_recipe(recipe)
    assert e.value.field == field, str(e.value)
    assert isinstance(e.value, ValueError)
    assert field in str(e.value)


def test_bad_recipe_fails_before_anything_runs():
    class Boom(attnforge.OptimizedModel.__base__):  # an nn.Module whose capture would blow up
        def forward(self, x):
            raise AssertionError("the model must not run for a bad recipe")

    with pytest.raises(RecipeError):
        attnforge.optimize(Boom(), {"steps": [{"rewrite": "fuse_ffn", "params": {"x": 1}}]}, ())


def test_unparsable_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: [unclosed")
    with pytest.raises(RecipeError, match="cannot parse"):
        load_recipe(p)


def test_targets_fnmatch_and_regex():
    model, args, kwargs = build_hf("bert", "sdpa")
    recipe = {"steps": [{"rewrite": "fuse_attention", "targets": ["encoder.layer.1.*"]},
                        {"rewrite": "fuse_ffn", "targets": [r"re:encoder\.layer\.0"]}]}
    rep = attnforge.optimize(model, recipe, args, kwargs).report
    applied = {(s.rewrite, s.fqn) for s in rep.sites if s.status == "applied"}
    assert applied == {("fuse_attention", "encoder.layer.1.attention.self"), ("fuse_ffn", "encoder.layer.0")}
    skipped = {(s.rewrite, s.fqn) for s in rep.sites if s.status == "skipped"}
    assert skipped == {("fuse_attention", "encoder.layer.0.attention.self"), ("fuse_ffn", "encoder.layer.1")}
    assert rep.passed


def test_schema_is_json_schema_of_recipes():
    jsonschema = pytest.importorskip("jsonschema")
    schema = recipe_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate({"name": "x", "steps": [{"rewrite": "fuse_attention"}]}, schema)
    for bad in ({"steps": [{"rewrite": "nope"}]}, {"steps": []}, {"stepz": [{"rewrite": "fuse_ffn"}]},
                {"steps": [{"rewrite": "sliding_window", "params": {"window": 0}}]},
                {"steps": [{"rewrite": "sliding_window"}]},  # window is required
                {"steps": [{"rewrite": "fuse_ffn", "params": {"window": 4}}]},
                {"steps": [{"rewrite": "gqa", "params": {"kv_heads": 2}, "skip_first": -1}]},
                {"steps": [{"rewrite": "fuse_ffn"}], "verify": {"rtol": 0}}):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, schema)


def _documented_recipes():
    """Every YAML/JSON block in README.md and docs/ that holds a recipe (a mapping with ``steps``)."""
    import json
    import re
    from pathlib import Path

    import yaml

    root = Path(__file__).resolve().parent.parent
    for path in [root / "README.md", *sorted((root / "docs").rglob("*.md"))]:
        for lang, body in re.findall(r"```(yaml|json)\n(.*?)```", path.read_text(), re.S):
            data = json.loads(body) if lang == "json" else yaml.safe_load(body)
            if isinstance(data, dict) and "steps" in data:
                yield f"{path.relative_to(root)}: {data.get('name', '?')}", data


def test_every_builtin_and_documented_recipe_validates_against_the_generated_schema():
    """The schema is generated from the models that validate recipes, so what they accept it accepts (the
    hand-written one once rejected the builtin long-context recipe: it lacked skip_first/skip_last)."""
    jsonschema = pytest.importorskip("jsonschema")
    from attnforge.recipe import BUILTIN

    schema = recipe_schema()
    documented = list(_documented_recipes())
    assert len(documented) >= 4  # README, gqa, engram, memoryformer, extending
    for name, data in [*BUILTIN.items(), *documented]:
        jsonschema.validate(data, schema)
        load_recipe(data)  # and the validator agrees
    step = schema["$defs"]["Step_sliding_window"]["properties"]
    assert {"skip_first", "skip_last", "targets", "params", "rewrite"} <= set(step)


def test_recipe_object_is_immutable():
    r = Recipe(steps=[{"rewrite": "fuse_ffn"}])
    with pytest.raises(Exception):
        r.name = "other"
