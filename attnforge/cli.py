"""``attnforge`` command line: ``rewrite``, ``diff`` and ``recipes`` (docs/cli.md). Bad input exits with code 2."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import AttnforgeError
from .report import _finite
from .specs import SPEC_FORMS, load_spec, parse_shape


class _Stages:
    """Rich progress on stderr: one line per pipeline stage, ticked off with its time when the next one starts."""

    def __init__(self):
        from rich.console import Console
        from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

        self.progress = Progress(SpinnerColumn(finished_text="✓"), TextColumn("{task.description}"),
                                 TimeElapsedColumn(), console=Console(stderr=True))
        self.task = None

    def __enter__(self):
        self.progress.start()
        return self

    def __call__(self, stage: str) -> None:
        self._finish()
        self.task = self.progress.add_task(stage, total=1)

    def _finish(self):
        if self.task is not None:
            self.progress.update(self.task, completed=1)

    def __exit__(self, kind, *_):
        if kind is None:
            self._finish()
        self.progress.stop()


def _recipe(a):
    from .recipe import load_recipe

    recipe = load_recipe(a.recipe)  # validated before anything runs
    if a.atol is not None:
        recipe = load_recipe({**recipe.model_dump(), "verify": {**recipe.verify.model_dump(), "atol": a.atol}})
    return recipe


def _optimize(a, stage, recipe, **options):
    """Load the spec and run ``optimize`` under the progress display; ``(opt, args, kwargs)``."""
    from .optimize import optimize

    stage(f"load {a.spec}")
    model, args, kwargs = load_spec(a.spec, parse_shape(a.input_shape), a.task)
    opt = optimize(model, recipe, args, kwargs, strict=a.strict, progress=stage, **options)
    opt.report.model = a.spec
    return model, opt, args, kwargs


def _diff(a, stage, model, opt, args, kwargs) -> dict:
    from attnforge.tools.diff import build_diff, canonical_graph

    stage("diff against the unrewritten graph")
    return build_diff(canonical_graph(model, args, kwargs), opt, a.spec)


def _write(path: str, text: str, console) -> None:
    Path(path).write_text(text, encoding="utf-8")
    console.print(f"written: {path}", markup=False)


def cmd_rewrite(a) -> int:
    import torch
    from rich.console import Console

    from attnforge.runtime.onnx import ExportError, export_onnx, run_onnx

    from .verify import compare_outputs

    recipe = _recipe(a)
    if a.opset < 18:
        raise AttnforgeError(f"--opset {a.opset}: the torch.onnx (dynamo) exporter writes opset 18 or newer")
    onnx_rows, export_error = None, ""
    with _Stages() as stage:
        model, opt, args, kwargs = _optimize(a, stage, recipe, dry_run=a.dry_run)
        if a.output and not a.dry_run:
            stage(f"export ONNX, opset {a.opset}")
            target = opt.graph_module if opt.graph_module is not None else opt.module
            try:
                export_onnx(target, args, kwargs, a.output, a.opset)
                stage("run the ONNX file in onnxruntime")
                with torch.no_grad():
                    ref = target(*args, **kwargs)
                onnx_rows = compare_outputs(ref, run_onnx(a.output, args, kwargs, ref), recipe.verify.atol)
            except ExportError as e:
                export_error = str(e)
        diff = _diff(a, stage, model, opt, args, kwargs) if a.report and not a.dry_run and opt.graph_module else None
    out = Console(width=120)
    report = opt.report
    report.render(out)
    if a.dry_run:
        out.print(f"dry run: {sum(s.status == 'planned' for s in report.sites)} planned rewrites; nothing was changed"
                  + (", no ONNX written" if a.output else ""))
    if onnx_rows is not None:
        out.print(f"ONNX {a.output} (opset {a.opset}) in onnxruntime vs the rewritten model, "
                  f"atol {recipe.verify.atol:g}:", markup=False)
        for o in onnx_rows:
            out.print(f"{'[✓]' if o['passed'] else '[x]'} {o['name']}: max diff {o['max_abs']:.2e}", markup=False)
    if a.json:
        data = report.to_dict()
        if a.output and not a.dry_run:
            data["onnx"] = {"path": a.output, "opset": a.opset, "error": export_error, "outputs": onnx_rows or []}
        _write(a.json, json.dumps(_finite(data), indent=2, default=str), out)
    if diff is not None:
        from attnforge.tools.report_html import render_html

        _write(a.report, render_html(diff), out)
    elif a.report:
        why = "a dry run changes nothing" if a.dry_run else "the model was not captured"
        out.print(f"no HTML report written: {why}", markup=False)
    if export_error:
        print(f"attnforge: error: {export_error}", file=sys.stderr)
        return 1
    return 0 if report.passed and all(o["passed"] for o in onnx_rows or []) else 1


def cmd_diff(a) -> int:
    from rich.console import Console

    from attnforge.tools.diff import render_text

    recipe = _recipe(a)
    with _Stages() as stage:
        model, opt, args, kwargs = _optimize(a, stage, recipe)
        if opt.graph_module is None:
            print(f"attnforge: error: nothing to diff, the model was not captured:\n{opt.report.capture_error}",
                  file=sys.stderr)
            return 1
        diff = _diff(a, stage, model, opt, args, kwargs)
    out = Console(width=140)
    render_text(diff, out)
    if a.json:
        _write(a.json, json.dumps(diff, indent=2, default=str), out)
    if a.html:
        from attnforge.tools.report_html import render_html

        _write(a.html, render_html(diff), out)
    return 0 if diff["passed"] else 1


def cmd_recipes(a) -> int:
    from .recipe import BUILTIN, recipe_schema

    if a.schema:
        print(json.dumps(recipe_schema(), indent=2))
        return 0
    for name, r in BUILTIN.items():
        def step(s):
            extra = {k: v for k, v in s.items() if k not in ("rewrite", "params")}
            return s["rewrite"] + (f"({s['params']})" if s.get("params") else "") + (f" {extra}" if extra else "")
        steps = " -> ".join(step(s) for s in r["steps"])
        print(f"{name:16} {steps}\n{'':16} {r['description']}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="attnforge", description="Rewrite the attention of PyTorch models.")
    sub = p.add_subparsers(dest="command", required=True)
    model = argparse.ArgumentParser(add_help=False)
    model.add_argument("spec", help=f"model spec: {SPEC_FORMS}")
    model.add_argument("--recipe", default="exact", help="builtin recipe name or YAML/JSON file (default: exact)")
    model.add_argument("--atol", type=float, help="absolute tolerance for output checks (overrides the recipe's)")
    model.add_argument("--input-shape", help="example input size, e.g. 2,32, when the spec brings no inputs")
    model.add_argument("--task", help="Hugging Face head for a model folder: causal-lm, masked-lm, ... "
                                      "(default: the bare AutoModel)")
    model.add_argument("--strict", action="store_true", help="fail when the model cannot be captured")

    r = sub.add_parser("rewrite", parents=[model], help="capture, rewrite, verify; export ONNX and check it")
    r.add_argument("-o", "--output", help="ONNX file to write, then run in onnxruntime against the rewritten model")
    r.add_argument("--opset", type=int, default=23, help="ONNX opset (default 23: the Attention op; >= 18)")
    r.add_argument("--report", help="write the HTML diff report to this file")
    r.add_argument("--json", help="write the report as JSON to this file")
    r.add_argument("--dry-run", action="store_true", help="show matches and planned rewrites, apply nothing")
    r.set_defaults(fn=cmd_rewrite)

    d = sub.add_parser("diff", parents=[model], help="what a recipe changes: sites, graph regions, FLOPs, memory")
    d.add_argument("--html", help="write the self-contained HTML report to this file")
    d.add_argument("--json", help="write the diff as JSON (docs/report-schema.md) to this file")
    d.set_defaults(fn=cmd_diff)

    b = sub.add_parser("bench", help="benchmarks (tools/bench.py): pipeline | kernels | e2e | decode",
                       add_help=False)
    b.add_argument("rest", nargs=argparse.REMAINDER)
    b.set_defaults(fn=lambda a: __import__("attnforge.tools.bench", fromlist=["main"]).main(a.rest))

    rc = sub.add_parser("recipes", help="list builtin recipes")
    rc.add_argument("--schema", action="store_true", help="print the JSON Schema of recipe files")
    rc.set_defaults(fn=cmd_recipes)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except AttnforgeError as e:  # bad spec, recipe or shape: the message names the problem
        print(f"attnforge: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
