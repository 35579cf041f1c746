"""``attnforge`` command line: ``rewrite`` and ``recipes`` (more subcommands arrive with the CLI issue)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AttnforgeError, RecipeError


class UsageError(AttnforgeError):
    """Bad command-line input (exit code 2)."""


def _load_spec(spec: str):
    if spec.startswith("demo:"):
        from .demos import build_demo

        try:
            return build_demo(spec[5:])
        except KeyError as e:
            raise UsageError(str(e.args[0])) from None
    raise UsageError(f"unknown model spec {spec!r}: this version accepts built-in demos "
                     "(demo:tiny-llama, demo:tiny-bert, demo:tiny-vit)")


def cmd_rewrite(a) -> int:
    from rich.console import Console

    from .optimize import optimize
    from .recipe import load_recipe

    console = Console(stderr=True)
    recipe = load_recipe(a.recipe)  # validated before anything runs
    if a.atol is not None:
        recipe = load_recipe({**recipe.model_dump(), "verify": {**recipe.verify.model_dump(), "atol": a.atol}})
    if a.output:
        raise UsageError("-o/--output (ONNX export) is not available in this version; run without it")
    with console.status("capturing") as status:
        model, args, kwargs = _load_spec(a.spec)
        opt = optimize(model, recipe, args, kwargs, strict=a.strict,
                       progress=lambda msg: status.update(msg))
    report = opt.report
    report.model = a.spec
    out = Console(width=120)
    report.render(out)
    if a.json:
        Path(a.json).write_text(report.to_json())
        out.print(f"report written to {a.json}")
    return 0 if report.passed else 1


def cmd_recipes(a) -> int:
    from .recipe import BUILTIN, recipe_schema

    if a.schema:
        print(json.dumps(recipe_schema(), indent=2))
        return 0
    for name, r in BUILTIN.items():
        steps = " -> ".join(s["rewrite"] + (f"({s['params']})" if s.get("params") else "") for s in r["steps"])
        print(f"{name:16} {steps}\n{'':16} {r['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnforge", description="Rewrite the attention of PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("rewrite", help="capture, rewrite and verify a model; print the report")
    r.add_argument("spec", help="model spec: demo:tiny-llama | demo:tiny-bert | demo:tiny-vit")
    r.add_argument("--recipe", default="exact", help="builtin recipe name or YAML/JSON file (default: exact)")
    r.add_argument("-o", "--output", help="ONNX file to write")
    r.add_argument("--json", help="write the report as JSON to this file")
    r.add_argument("--atol", type=float, help="absolute tolerance for output checks")
    r.add_argument("--strict", action="store_true", help="fail when the model cannot be captured")
    r.set_defaults(fn=cmd_rewrite)
    rc = sub.add_parser("recipes", help="list builtin recipes")
    rc.add_argument("--schema", action="store_true", help="print the JSON Schema of recipe files")
    rc.set_defaults(fn=cmd_recipes)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except (RecipeError, UsageError, AttnforgeError) as e:
        print(f"attnforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
