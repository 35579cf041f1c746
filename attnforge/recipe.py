"""Recipes: which rewrites run, in which order, on which modules (DESIGN.md, "Rewrites").

A recipe is a builtin name, a YAML/JSON file, a dict or a ``Recipe``; it is validated before
anything runs and every problem becomes a ``RecipeError`` naming the field.
"""
from __future__ import annotations

import difflib
import fnmatch
import json
import re
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from .errors import RecipeError


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def rewrite_params() -> dict[str, type[BaseModel]]:
    """rewrite name -> its parameter model; each pass declares its own (``passes/<rewrite>.py``)."""
    from attnforge.passes import REGISTRY

    return {name: p.params for name, p in REGISTRY.items()}


class Step(_Strict):
    rewrite: str
    targets: list[str] | None = Field(
        default=None, description="fnmatch patterns on module FQNs, or 're:' + a regex; all sites when absent")
    params: dict[str, Any] = Field(default_factory=dict)
    skip_first: int = Field(default=0, ge=0, description="leave the first N selected sites (graph order) as they are")
    skip_last: int = Field(default=0, ge=0, description="leave the last N selected sites (graph order) as they are")

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, v):
        for t in v or []:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise ValueError(f"bad regex {t[3:]!r}: {e}") from None
        return v

    def choose(self, fqns: list[str]) -> list[bool]:
        """Which of the sites (FQNs in graph order) this step rewrites: targets, then skip_first/skip_last."""
        picked = [self.selects(f) for f in fqns]
        order = [i for i, p in enumerate(picked) if p]
        for i in order[:self.skip_first] + (order[len(order) - self.skip_last:] if self.skip_last else []):
            picked[i] = False
        return picked

    def why_not(self, fqns: list[str]) -> list[str | None]:
        """Per site (FQNs in graph order): None when this step rewrites it, else why it is left out."""
        return [None if picked else "left out by skip_first/skip_last" if self.selects(f) else
                "not selected by targets" for f, picked in zip(fqns, self.choose(fqns))]

    def selects(self, fqn: str) -> bool:
        if self.targets is None:
            return True
        for t in self.targets:
            if t.startswith("re:"):
                if re.fullmatch(t[3:], fqn):
                    return True
            elif fnmatch.fnmatchcase(fqn, t):
                return True
        return False


class VerifyConfig(_Strict):
    rtol: float = Field(default=1e-5, gt=0, description="relative max error allowed for exact rewrites, per site")
    atol: float = Field(default=1e-4, ge=0, description="absolute error allowed on the model outputs (exact recipes)")
    min_cosine: float | None = Field(default=0.9, ge=-1, le=1, description="quality budget of recipes with an "
                                     "approximate step: least cosine similarity of each output to the original's")
    max_rel_error: float | None = Field(default=None, gt=0, description="quality budget of recipes with an "
                                        "approximate step: largest max|Δ| / max|original| of each output")


class Recipe(_Strict):
    name: str = "custom"
    description: str = ""
    steps: list[Step] = Field(min_length=1)
    verify: VerifyConfig = VerifyConfig()

    def params_of(self, i: int) -> BaseModel:
        step = self.steps[i]
        return rewrite_params()[step.rewrite](**step.params)


BUILTIN: dict[str, dict] = {
    "exact": {
        "name": "exact",
        "description": "fuse every attention core and FFN into one op each; numerically equal to the model",
        "steps": [{"rewrite": "fuse_attention"}, {"rewrite": "fuse_ffn"}],
    },
    "long-context": {
        "name": "long-context",
        "description": "exact fusion, then a 512-token sliding window with 4 attention sinks on every attention "
                       "layer but the first and the last (docs/rewrites/sparse.md says why)",
        "steps": [{"rewrite": "fuse_attention"}, {"rewrite": "fuse_ffn"},
                  {"rewrite": "sliding_window", "params": {"window": 512, "sinks": 4}, "skip_first": 1,
                   "skip_last": 1}],
        "verify": {"min_cosine": 0.95},
    },
    "fuse-attention": {
        "name": "fuse-attention",
        "description": "fuse attention cores only",
        "steps": [{"rewrite": "fuse_attention"}],
    },
}


def load_recipe(recipe: Union[str, Path, dict, Recipe]) -> Recipe:
    """Validate ``recipe`` (builtin name, file path, dict or Recipe) into a ``Recipe``."""
    if isinstance(recipe, Recipe):
        return _validate(recipe.model_dump())
    if isinstance(recipe, dict):
        return _validate(recipe)
    if isinstance(recipe, (str, Path)):
        text = str(recipe)
        if text in BUILTIN:
            return _validate(BUILTIN[text])
        path = Path(text)
        if path.suffix.lower() in (".yaml", ".yml", ".json") or path.exists():
            if not path.exists():
                raise RecipeError(f"recipe file {text!r} does not exist", "recipe")
            try:
                data = json.loads(path.read_text()) if path.suffix.lower() == ".json" else yaml.safe_load(
                    path.read_text())
            except (yaml.YAMLError, json.JSONDecodeError) as e:
                raise RecipeError(f"cannot parse {text!r}: {e}", "recipe") from None
            if not isinstance(data, dict):
                raise RecipeError(f"{text!r} must hold a mapping with 'steps'", "recipe")
            return _validate(data)
        raise RecipeError(f"unknown recipe {text!r}; builtin recipes: {', '.join(BUILTIN)}", "recipe")
    raise RecipeError(f"a recipe is a name, a path, a dict or a Recipe, not {type(recipe).__name__}", "recipe")


def _loc(loc) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _first_error(e: ValidationError, known: list[str]) -> dict:
    """The most telling error: an unknown (misspelled) key explains a missing one, so it comes first."""
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
    err = dict(errors[0])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(str(err["loc"][-1]), known, n=1)
        err["msg"] = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})")
    return err


def _validate(data: dict) -> Recipe:
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        err = _first_error(e, list(Recipe.model_fields) + list(Step.model_fields) + list(VerifyConfig.model_fields))
        raise RecipeError(f"{err['msg']} (got {err.get('input')!r})", _loc(err["loc"])) from None
    except TypeError as e:
        raise RecipeError(str(e), "recipe") from None
    for i, step in enumerate(recipe.steps):
        if step.rewrite not in rewrite_params():
            close = difflib.get_close_matches(step.rewrite, list(rewrite_params()), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown rewrite {step.rewrite!r}{hint}; available: {', '.join(rewrite_params())}",
                              f"steps[{i}].rewrite")
        try:
            recipe.params_of(i)
        except ValidationError as e:
            err = _first_error(e, list(rewrite_params()[step.rewrite].model_fields))
            field = _loc(("steps", i, "params") + tuple(err["loc"]))
            if err["type"] == "extra_forbidden" and not rewrite_params()[step.rewrite].model_fields:
                err["msg"] = f"{step.rewrite} takes no parameters"
            raise RecipeError(f"{err['msg']} (got {err.get('input')!r})", field) from None
    return recipe


def recipe_schema() -> dict:
    """JSON Schema of recipe files, generated from the models that validate them: ``Recipe``, ``Step`` and
    ``VerifyConfig`` here, and each rewrite's params model (its variant's, runtime/<variant>/), one step schema per
    rewrite told apart by ``rewrite``."""
    steps = []
    for name, params in rewrite_params().items():
        required = any(f.is_required() for f in params.model_fields.values())
        default = ... if required else Field(default_factory=lambda params=params: params().model_dump())
        steps.append(create_model(f"Step_{name}", __base__=Step, rewrite=(Literal[name], ...),
                                  params=(params, default)))
    typed_steps = list[Annotated[Union[tuple(steps)], Field(discriminator="rewrite")]]
    file_model = create_model("RecipeFile", __base__=Recipe, steps=(typed_steps, Field(min_length=1)))
    schema = file_model.model_json_schema()
    schema["title"] = "attnforge recipe"
    return schema
