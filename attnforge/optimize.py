"""``optimize(model, recipe)``: capture -> canonicalise -> match -> rewrite -> verify (DESIGN.md, "The pipeline")."""
from __future__ import annotations

import copy
import time
from typing import Any, Callable

import torch
from torch import nn

from attnforge.passes import REGISTRY, canonicalize
from attnforge.passes.base import ParamError, SkipSite
from attnforge.passes.manager import apply_site, dead_code, evaluate, rollback_site
from attnforge.patterns import refine_causal
from attnforge.runtime.dispatch import BACKENDS, check_backend, use_backend  # noqa: F401 (BACKENDS re-exported)

from .capture import capture, flat_inputs
from .errors import CaptureError, RecipeError
from .recipe import Recipe, load_recipe
from .report import MissRecord, Report, SiteRecord
from .verify import compare_outputs, error_stats, record



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
        t = time.perf_counter()
        sites, misses = rw.match(gm)
        for m in misses:
            key = (m.fqn, m.kind, m.reason)
            if key not in seen_misses:
                seen_misses.add(key)
                report.misses.append(MissRecord(m.fqn, m.kind, m.reason, m.node))
        chosen = []
        for s, picked in zip(sites, step.choose([s.fqn for s in sites])):
            if picked:
                chosen.append(s)
            else:
                why = "left out by skip_first/skip_last" if step.selects(s.fqn) else "not selected by targets"
                report.sites.append(SiteRecord(s.fqn, rw.kind, rw.name, "skipped", why, s.pattern))
        report.timings["match"] = report.timings.get("match", 0.0) + time.perf_counter() - t
        if dry_run:
            report.sites += [SiteRecord(s.fqn, rw.kind, rw.name, "planned", pattern=s.pattern, info=rw.info(s, params))
                             for s in chosen]
            continue

        t = time.perf_counter()
        needed = set()
        for s in chosen:
            needed.update(rw.needs(s))
        env = record(gm, flat, needed) if chosen else {}
        if rw.kind == "attention":
            chosen = [refine_causal(s, env) for s in chosen]
        for s in chosen:
            rec = SiteRecord(s.fqn, rw.kind, rw.name, "applied", pattern=s.pattern, info=rw.info(s, params))
            try:
                new = apply_site(gm, rw, s, params, env)
            except ParamError as e:
                raise RecipeError(str(e), f"steps[{i}].params.{e.param}") from None
            except SkipSite as e:  # the rewrite does not fit this site: leave it, say why
                rec.status, rec.reason = "skipped", str(e)
                report.sites.append(rec)
                continue
            rec.info.update(new[-1].meta.pop("attnforge_info", {}))
            try:
                with torch.no_grad(), use_backend(backend):
                    rec.error = error_stats(evaluate(gm, new, env), env[s.out])
                failure = None
            except Exception as e:  # noqa: BLE001 - a failing kernel rolls the site back, with the cause
                failure = f"replacement failed on the example inputs: {type(e).__name__}: {e}"
            too_far = rec.error is not None and not rec.error["rel"] <= recipe.verify.rtol
            if failure or (rw.exact and too_far):
                rollback_site(gm, s, new)
                rec.status = "rolled_back"
                rec.reason = failure or (f"relative error {rec.error['rel']:.2e} > rtol {recipe.verify.rtol:g} "
                                         "for an exact rewrite")
            report.sites.append(rec)
        dead_code(gm)
        report.timings["rewrite"] = report.timings.get("rewrite", 0.0) + time.perf_counter() - t
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
