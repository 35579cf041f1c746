"""Recipes: which rewrites run, in which order, on which modules (DESIGN.md, "Rewrites").

A recipe is a builtin name, a YAML/JSON file, a dict or a ``Recipe``; it is validated before
anything runs and every problem becomes a ``RecipeError`` naming the field. A recipe file is read only if it is a
regular file of at most ``MAX_RECIPE_BYTES``, as UTF-8 (or UTF-16/32 with a byte order mark), nested at most
``MAX_DEPTH`` levels and, YAML aliases expanded, at most ``MAX_VALUES`` values; messages quote at most
``EXCERPT`` characters of any input.
"""
from __future__ import annotations

import codecs
import difflib
import fnmatch
import json
import os
import re
import reprlib
import stat
from pathlib import Path
from typing import Annotated, Any, Literal, Union

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, create_model, field_validator

from attnforge.runtime.params import Float, Int

from .errors import RecipeError

MAX_RECIPE_BYTES = 2 ** 20
MAX_DEPTH = 64
MAX_VALUES = 100_000
EXCERPT = 80


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
    skip_first: Int = Field(default=0, ge=0, description="leave the first N selected sites (graph order) as they are")
    skip_last: Int = Field(default=0, ge=0, description="leave the last N selected sites (graph order) as they are")

    @field_validator("targets")
    @classmethod
    def _check_targets(cls, v):
        for t in v or []:
            if t.startswith("re:"):
                try:
                    re.compile(t[3:])
                except re.error as e:
                    raise ValueError(f"bad regex {_excerpt(t[3:])}: {e}") from None
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
    rtol: Float = Field(default=1e-5, gt=0, description="relative max error allowed for exact rewrites, per site")
    atol: Float = Field(default=1e-4, ge=0, description="absolute error allowed on the model outputs (exact recipes)")
    min_cosine: Float | None = Field(default=0.9, ge=-1, le=1, description="quality budget of recipes with an "
                                     "approximate step: least cosine similarity of each output to the original's")
    max_rel_error: Float | None = Field(default=None, gt=0, description="quality budget of recipes with an "
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
        path, shown = Path(text), _excerpt(text)
        if path.suffix.lower() in (".yaml", ".yml", ".json") or os.path.lexists(text):
            if not os.path.lexists(text):
                raise RecipeError(f"recipe file {shown} does not exist", "recipe")
            data = _parse(_read(path, shown), path.suffix.lower() == ".json", shown)
            if not isinstance(data, dict):
                raise RecipeError(f"{shown} must hold a mapping with 'steps'", "recipe")
            return _validate(data)
        raise RecipeError(f"unknown recipe {shown}; builtin recipes: {', '.join(BUILTIN)}", "recipe")
    raise RecipeError(f"a recipe is a name, a path, a dict or a Recipe, not {type(recipe).__name__}", "recipe")


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxstring, _REPR.maxother, _REPR.maxlong = 3, EXCERPT, EXCERPT, EXCERPT
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = 4


def _excerpt(value: Any) -> str:
    """``repr(value)`` cut to ``EXCERPT`` characters (never building the whole repr of a huge input)."""
    try:
        text = _REPR.repr(value)
    except ValueError:  # an int with more digits than Python prints
        return f"<{type(value).__name__} too long to print>"
    return text if len(text) <= EXCERPT else text[:EXCERPT - 3] + "..."


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _not_regular(mode: int, shown: str) -> None:
    if not stat.S_ISREG(mode):
        kind = next((k for test, k in _KINDS if test(mode)), "not a regular file")
        raise RecipeError(f"recipe file {shown} is {kind}; a recipe is a regular YAML or JSON file", "recipe")


def _read(path: Path, shown: str) -> str:
    """The text of a recipe file: a regular file (checked before and after opening, which never blocks) of at most
    ``MAX_RECIPE_BYTES``, decoded as UTF-8, or UTF-16/32 when it starts with a byte order mark."""
    too_big = f"recipe file {shown} is %s bytes, more than a recipe may hold ({MAX_RECIPE_BYTES} bytes: 1 MiB)"
    try:
        info = os.stat(path)
        _not_regular(info.st_mode, shown)
        if info.st_size > MAX_RECIPE_BYTES:
            raise RecipeError(too_big % info.st_size, "recipe")
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
        with os.fdopen(fd, "rb") as f:
            _not_regular(os.fstat(f.fileno()).st_mode, shown)  # it may have been replaced since the stat
            data = f.read(MAX_RECIPE_BYTES + 1)
    except OSError as e:
        raise RecipeError(f"cannot read recipe file {shown}: {e.strerror or e}", "recipe") from None
    if len(data) > MAX_RECIPE_BYTES:
        raise RecipeError(too_big % f"over {MAX_RECIPE_BYTES}", "recipe")
    for bom, codec in ((codecs.BOM_UTF32_LE, "utf-32"), (codecs.BOM_UTF32_BE, "utf-32"),
                       (codecs.BOM_UTF16_LE, "utf-16"), (codecs.BOM_UTF16_BE, "utf-16"), (codecs.BOM_UTF8, "utf-8")):
        if data.startswith(bom):
            break
    else:
        bom, codec = b"", "utf-8"
    try:
        text = data[len(bom):].decode(codec)
    except UnicodeDecodeError as e:
        at = len(bom) + e.start
        raise RecipeError(f"recipe file {shown} is not {codec.upper()} text: byte 0x{data[at]:02x} at offset {at} "
                          "cannot be decoded (save the recipe as UTF-8)", "recipe") from None
    if "\x00" in text:
        raise RecipeError(f"recipe file {shown} holds a NUL character at offset {text.index(chr(0))}: not a text "
                          "file (UTF-16 without a byte order mark?)", "recipe")
    return text


class _RecipeLoader(yaml.SafeLoader):
    """YAML's safe loader, bounded: nesting deeper than ``MAX_DEPTH`` and documents that hold more than
    ``MAX_VALUES`` values once aliases are expanded (an alias bomb is small on disk, huge in memory) are parse
    errors, and so are recursive aliases. Recipes need no aliases; a few small ones are fine."""

    def __init__(self, stream):
        super().__init__(stream)
        self._open = 0  # nodes being composed: the nesting depth
        self._seen: dict[int, tuple] = {}  # id(node) -> (node, values in it with aliases expanded, its depth)

    def _refuse(self, problem: str, mark):
        raise yaml.composer.ComposerError(None, None, problem, mark)

    def compose_node(self, parent, index):
        alias, mark = self.check_event(yaml.AliasEvent), self.peek_event().start_mark
        self._open += 1
        try:
            if self._open > MAX_DEPTH:
                self._refuse(f"nested more than {MAX_DEPTH} levels deep", mark)
            node = super().compose_node(parent, index)
        finally:
            self._open -= 1
        if id(node) not in self._seen:
            if alias:
                self._refuse("an alias refers to a value that contains it (a recursive alias)", mark)
            kids = [] if isinstance(node, yaml.ScalarNode) else node.value if isinstance(node, yaml.SequenceNode) \
                else [n for pair in node.value for n in pair]
            kids = [self._seen[id(k)] for k in kids]
            self._seen[id(node)] = (node, 1 + sum(k[1] for k in kids), 1 + max((k[2] for k in kids), default=0))
        _, values, depth = self._seen[id(node)]
        if values > MAX_VALUES:
            self._refuse(f"holds more than {MAX_VALUES} values once its aliases are expanded", mark)
        if depth > MAX_DEPTH:
            self._refuse(f"nested more than {MAX_DEPTH} levels deep once its aliases are expanded", mark)
        return node


def _depth(data: Any) -> int:
    """How deep lists and dicts nest in ``data`` (iteratively: no recursion limit)."""
    deepest, todo = 0, [(data, 1)]
    while todo:
        x, d = todo.pop()
        if isinstance(x, (dict, list)):
            deepest = max(deepest, d)
            if d <= MAX_DEPTH:
                todo.extend((c, d + 1) for c in (x.values() if isinstance(x, dict) else x))
    return deepest


def _parse(text: str, is_json: bool, shown: str) -> Any:
    try:
        data = json.loads(text) if is_json else yaml.load(text, Loader=_RecipeLoader)
    except (yaml.YAMLError, ValueError) as e:  # ValueError: JSON syntax, an int with too many digits
        message = str(e)
        message = message if len(message) <= 4 * EXCERPT else message[:4 * EXCERPT - 3] + "..."
        raise RecipeError(f"cannot parse {shown}: {message}", "recipe") from None
    except RecursionError:
        raise RecipeError(f"cannot parse {shown}: nested more than {MAX_DEPTH} levels deep", "recipe") from None
    if is_json and _depth(data) > MAX_DEPTH:
        raise RecipeError(f"cannot parse {shown}: nested more than {MAX_DEPTH} levels deep", "recipe")
    return data


def _loc(loc) -> str:
    out = ""
    for part in loc:
        part = part if isinstance(part, int) else _short(str(part))
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _short(text: str, limit: int = EXCERPT) -> str:
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _message(err: dict) -> str:
    """An error's message and (an excerpt of) the value it refused."""
    return f"{_short(err['msg'], 4 * EXCERPT)} (got {_excerpt(err.get('input'))})"


def _first_error(e: ValidationError, known: list[str]) -> dict:
    """The most telling error: an unknown (misspelled) key explains a missing one, so it comes first."""
    errors = sorted(e.errors(), key=lambda err: err["type"] != "extra_forbidden")
    err = dict(errors[0])
    if err["type"] == "extra_forbidden":
        close = difflib.get_close_matches(_short(str(err["loc"][-1])), known, n=1)
        err["msg"] = "unknown field" + (f" (did you mean {close[0]!r}?)" if close else f" (known: {', '.join(known)})")
    return err


def _validate(data: dict) -> Recipe:
    try:
        recipe = Recipe(**data)
    except ValidationError as e:
        err = _first_error(e, list(Recipe.model_fields) + list(Step.model_fields) + list(VerifyConfig.model_fields))
        raise RecipeError(_message(err), _loc(err["loc"])) from None
    except TypeError as e:
        raise RecipeError(_short(str(e), 4 * EXCERPT), "recipe") from None
    for i, step in enumerate(recipe.steps):
        if step.rewrite not in rewrite_params():
            close = difflib.get_close_matches(_short(step.rewrite), list(rewrite_params()), n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"unknown rewrite {_excerpt(step.rewrite)}{hint}; available: "
                              f"{', '.join(rewrite_params())}",
                              f"steps[{i}].rewrite")
        try:
            recipe.params_of(i)
        except ValidationError as e:
            err = _first_error(e, list(rewrite_params()[step.rewrite].model_fields))
            field = _loc(("steps", i, "params") + tuple(err["loc"]))
            if err["type"] == "extra_forbidden" and not rewrite_params()[step.rewrite].model_fields:
                err["msg"] = f"{step.rewrite} takes no parameters"
            raise RecipeError(_message(err), field) from None
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
