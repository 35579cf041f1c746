"""``optimize(model, recipe)``: capture -> canonicalise -> one ``run_step`` per recipe step -> verify (DESIGN.md,
"The pipeline"). Orchestration only: the pass manager (passes/manager.py) owns matching, the per-site transactions
and rollbacks."""
from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import nn

from attnforge.passes import REGISTRY, canonicalize
from attnforge.passes.base import ParamError
from attnforge.passes.manager import run_step
from attnforge.runtime.dispatch import BACKENDS, check_backend, use_backend  # noqa: F401 (BACKENDS re-exported)

from .capture import capture, flat_inputs
from .errors import CaptureError, RecipeError
from .recipe import Recipe, load_recipe
from .report import MissRecord, Report, SiteRecord
from .verify import compare_outputs


class OptimizedModel(nn.Module):
    """The rewritten model. Call it like the original; ``.report``, ``.graph_module``, ``.recipe``, ``.backend``
    (the kernels its ops run on: runtime/dispatch.py)."""

    def __init__(self, module: nn.Module, report: Report, recipe: Recipe, graph_module=None, backend: str = "auto"):
        super().__init__()
        self.module = module
        self.report = report
        self.recipe = recipe
        self.backend = backend
        self._graph_module = graph_module

    @property
    def graph_module(self):
        """The rewritten ``fx.GraphModule`` (None when capture failed and the original runs unchanged)."""
        return self._graph_module

    def forward(self, *args, **kwargs):
        with use_backend(self.backend):
            return self.module(*args, **kwargs)


def _as_args(example_inputs) -> tuple:
    if example_inputs is None:
        return ()
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise TypeError(f"example_inputs must be a tensor or a tuple of inputs, not {type(example_inputs).__name__}")


def optimize(model: nn.Module, recipe: Any = "exact", example_inputs=(), example_kwargs: dict | None = None, *,
             verify: bool = True, strict: bool = False, backend: str = "auto", dynamic: bool = True,
             progress: Callable[[str], None] | None = None, dry_run: bool = False) -> OptimizedModel:
    """Rewrite ``model``'s attention and FFN subgraphs as ``recipe`` says; never mutates ``model``.

    ``recipe``: builtin name (``"exact"``), YAML/JSON path, dict or ``Recipe`` (validated first:
    ``RecipeError``). ``example_inputs``/``example_kwargs``: what the model is captured and verified
    on. ``strict``: raise ``CaptureError`` when the model cannot be captured, instead of returning
    a passthrough whose report says why. ``backend``: "auto" (Triton kernels on CUDA tensors, PyTorch kernels
    otherwise), "torch" or "triton" (also on CPU tensors under ``TRITON_INTERPRET=1``); the per-site checks and
    the final verification run on it too. ``dynamic``: keep batch/sequence dims symbolic. ``dry_run``:
    match and select only; the report lists the sites each step would rewrite (status ``planned``, all
    matched on the unrewritten graph) and the model is not changed or verified.
    """
    recipe = load_recipe(recipe)
    check_backend(backend)
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    say = progress or (lambda msg: None)
    report = Report(model=type(model).__name__, recipe=recipe.name, backend=backend)

    t = time.perf_counter()
    say("capture")
    try:
        captured = capture(model, args, kwargs, dynamic=dynamic)
    except CaptureError as e:
        if strict:
            raise
        report.capture_error = str(e)
        return OptimizedModel(copy.deepcopy(model), report, recipe, backend=backend)
    report.timings["capture"] = time.perf_counter() - t
    report.capture_method, report.dynamic = captured.method, captured.dynamic
    report.notes += captured.notes
    gm = captured.gm

    t = time.perf_counter()
    canonicalize(gm)
    report.timings["canonicalize"] = time.perf_counter() - t
    report.nodes_before = len(gm.graph.nodes)
    flat = flat_inputs(gm, args, kwargs)

    seen_misses = set()
    for i, step in enumerate(recipe.steps):
        rw, params = REGISTRY[step.rewrite], recipe.params_of(i)
        say(f"step {i + 1}/{len(recipe.steps)}: {rw.name}")
        try:
            outcomes, misses = run_step(gm, rw, params, flat, step.why_not, rtol=recipe.verify.rtol, backend=backend,
                                        dry_run=dry_run, timings=report.timings)
        except ParamError as e:
            raise RecipeError(str(e), f"steps[{i}].params.{e.param}") from None
        for m in misses:
            if (m.fqn, m.kind, m.reason) not in seen_misses:
                seen_misses.add((m.fqn, m.kind, m.reason))
                report.misses.append(MissRecord(m.fqn, m.kind, m.reason, m.node))
        report.sites += [SiteRecord(o.site.fqn, rw.kind, rw.name, o.status, o.reason, o.site.pattern, o.error, o.info)
                         for o in outcomes]
    report.nodes_after = len(gm.graph.nodes)

    if verify and not dry_run:
        say("verify")
        t = time.perf_counter()
        with torch.no_grad():
            ref = captured.model(*args, **kwargs)
            with use_backend(backend):
                got = gm(*args, **kwargs)
        report.outputs = compare_outputs(ref, got, recipe.verify.atol)
        report.timings["verify"] = time.perf_counter() - t
    return OptimizedModel(gm, report, recipe, graph_module=gm, backend=backend)
