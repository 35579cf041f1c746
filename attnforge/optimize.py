"""``optimize(model, recipe)``: capture -> canonicalise -> one ``run_step`` per recipe step -> verify (DESIGN.md,
"The pipeline"). Orchestration only: the pass manager (passes/manager.py) owns matching, the per-site transactions
and rollbacks; ``OptimizedModel`` (attnforge/model.py) runs the result and builds a program for each new call form
with ``build_program``, the same pipeline on the same recipe."""
from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.fx import GraphModule

from attnforge.passes import REGISTRY, canonicalize
from attnforge.passes.base import ParamError
from attnforge.passes.manager import run_step
from attnforge.runtime.dispatch import BACKENDS, check_backend, use_backend  # noqa: F401 (BACKENDS re-exported)

from .capture import CallForm, Captured, bound_module, capture
from .errors import CaptureError, RecipeError
from .recipe import Recipe, load_recipe
from .report import MissRecord, Report, SiteRecord
from .verify import compare_outputs


@dataclass
class Program:
    """One captured and rewritten graph: the call form it serves, the graph, and what building it found."""

    form: CallForm
    gm: GraphModule
    report: Report
    example: list = field(default_factory=list)  # the graph inputs it was captured on


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
             progress: Callable[[str], None] | None = None, dry_run: bool = False, check_decode: bool = True):
    """Rewrite ``model``'s attention and FFN subgraphs as ``recipe`` says; never mutates ``model``.

    ``recipe``: builtin name (``"exact"``), YAML/JSON path, dict or ``Recipe`` (validated first:
    ``RecipeError``). ``example_inputs``/``example_kwargs``: a call of the model (positional, keyword, with the
    optional inputs and flags it takes); the model is captured and verified on it, and other calls are served
    too (attnforge/model.py). ``strict``: raise ``CaptureError`` when the model cannot be captured, instead of
    returning a passthrough whose report says why (with a warning), and ``RecipeError`` when a step's targets or
    skip_first/skip_last select no site (else a warning, in ``report.warnings`` too). ``backend``: "auto"
    (Triton kernels on CUDA tensors, PyTorch kernels otherwise), "torch" or "triton" (also on CPU tensors under
    ``TRITON_INTERPRET=1``);
    the per-site checks and the final verification run on it too. ``dynamic``: keep batch/sequence dims
    symbolic. ``dry_run``: match and select only; the report lists the sites each step would rewrite (status
    ``planned``, all matched on the unrewritten graph) and the model is not changed or verified.
    ``check_decode``: for a model that generates (Hugging Face's ``can_generate()``), check the decode contract on
    the example and report it with the KV-cache bytes (attnforge/generate.py).

    A ``SentenceTransformer`` comes back as a SentenceTransformer whose transformer runs the rewritten graph
    (``.encode()`` as before), with the report at ``.report``.
    """
    from .model import OptimizedModel
    from .sentence import is_sentence_transformer, optimize_sentence_transformer

    recipe = load_recipe(recipe)
    check_backend(backend)
    if is_sentence_transformer(model):
        return optimize_sentence_transformer(model, recipe, example_inputs, example_kwargs, verify=verify,
                                             strict=strict, backend=backend, dynamic=dynamic, progress=progress,
                                             dry_run=dry_run)
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    args, kwargs = _as_args(example_inputs), dict(example_kwargs or {})
    source = copy.deepcopy(model)
    options = {"verify": verify, "dynamic": dynamic, "dry_run": dry_run}
    try:
        program = build_program(source, recipe, args, kwargs, backend=backend, progress=progress, **options)
    except CaptureError as e:
        _check_example(source, args, kwargs)  # a model that fails on its own example cannot run unchanged either
        if strict:
            raise
        report = Report(model=type(model).__name__, recipe=recipe.name, backend=backend, capture_error=str(e))
        warnings.warn(f"attnforge: {type(model).__name__} was not rewritten, it runs unchanged: {e}", RuntimeWarning,
                      stacklevel=2)
        return OptimizedModel(source, recipe, backend, options, None, report)
    for w in program.report.warnings:  # a step whose selection selects nothing
        if strict:
            where, _, why = w.partition(": ")
            raise RecipeError(why, where)
        warnings.warn(f"attnforge: {w}", RuntimeWarning, stacklevel=2)
    if not program.report.dynamic and dynamic:
        warnings.warn(f"attnforge: {type(model).__name__} was captured with static shapes: other batch sizes and "
                      f"lengths are captured again when they come ({program.report.notes[-1]})", RuntimeWarning,
                      stacklevel=2)
    opt = OptimizedModel(source, recipe, backend, options, program, program.report)
    if check_decode and not dry_run and _can_generate(source):
        if progress:
            progress("decode contract")
        _report_decode(opt, program, args, kwargs)
    return opt


def _check_example(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """``CaptureError`` naming the example input the model itself refuses (its name, dtype and shape, and the op
    or line that refused it: attnforge/specs.py), when the model fails on its example outside any capture."""
    from .errors import SpecError
    from .specs import check_example

    try:
        check_example(model, args, kwargs, type(model).__name__)
    except SpecError as e:
        raise CaptureError(str(e)) from None


def _can_generate(model: nn.Module) -> bool:
    can = getattr(model, "can_generate", None)
    try:
        return bool(can()) if callable(can) else False
    except Exception:  # noqa: BLE001
        return False


def _report_decode(opt, program: Program, args, kwargs) -> None:
    """Check the decode contract on the example (attnforge/generate.py) and put it, with the KV-cache bytes
    per layer before and after as formulas in the context length N, in the report."""
    from .capture import _bind, _signature
    from .generate import GenerationError, cache_formula, check_decode

    report = program.report
    named = _bind(_signature(type(opt._source)), tuple(args), dict(kwargs))
    ids, mask = named.get("input_ids"), named.get("attention_mask")
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        report.decode = {"checked": False, "reason": "the example has no [batch, length] input_ids"}
        return
    if ids.shape[1] < 2:
        ids = ids.repeat(1, 4)
        mask = None if mask is None else mask.repeat(1, 4)
    try:
        report.decode = {"checked": True, **check_decode(opt, ids, mask)}
        report.kv_cache = {**cache_formula(opt), "before": _full_cache_formula(opt, report)}
    except GenerationError as e:
        report.decode = {"checked": False, "reason": str(e)}
        warnings.warn(f"attnforge: {type(opt._source).__name__} cannot generate with attnforge's cache: {e}",
                      RuntimeWarning, stacklevel=3)


def _full_cache_formula(opt, report: Report) -> str:
    """The original model's cache: every key and value of its own KV heads, per layer."""
    import sympy

    from attnforge.runtime.cache import POLICIES

    from .generate import N

    decoder = next(iter(opt._decoders.values()))
    kv = {s.fqn: s.info.get("kv_heads") for s in report.sites if s.kind == "attention"}
    total = 0
    for s in decoder.graph.sites:
        site = s.site if not kv.get(s.fqn) else type(s.site)(**{**s.site.__dict__, "kv_heads": kv[s.fqn]})
        total += POLICIES["full"].bytes(site, 1, N)
    return str(sympy.simplify(total))


def build_program(source: nn.Module, recipe: Recipe, args: tuple, kwargs: dict, *, backend: str = "auto",
                  verify: bool = True, dynamic: bool = True, dry_run: bool = False,
                  progress: Optional[Callable[[str], None]] = None, training: Optional[bool] = None) -> Program:
    """Capture ``source`` (attnforge's own copy: its tensors become the graph's) on one call, rewrite it as
    ``recipe`` says and verify it on that call. ``CaptureError`` when it cannot be captured or replayed."""
    say = progress or (lambda msg: None)
    report = Report(model=type(source).__name__, recipe=recipe.name, backend=backend)
    t = time.perf_counter()
    say("capture")
    captured = capture(source, args, kwargs, dynamic=dynamic, copy_model=False, training=training)
    report.timings["capture"] = time.perf_counter() - t
    report.capture_method, report.dynamic = captured.method, captured.dynamic
    report.notes += captured.notes
    report.call_form, report.shapes = captured.form.describe(), captured.shapes
    gm = captured.gm

    t = time.perf_counter()
    canonicalize(gm)
    report.timings["canonicalize"] = time.perf_counter() - t
    report.nodes_before = len(gm.graph.nodes)

    seen_misses, modules = set(), {name for name, _ in source.named_modules()}
    for i, step in enumerate(recipe.steps):
        rw, params = REGISTRY[step.rewrite], recipe.params_of(i)
        say(f"step {i + 1}/{len(recipe.steps)}: {rw.name}")
        try:
            outcomes, misses = run_step(gm, rw, params, captured.inputs, step.why_not, rtol=recipe.verify.rtol,
                                        backend=backend, dry_run=dry_run, timings=report.timings)
        except ParamError as e:
            raise RecipeError(str(e), f"steps[{i}].params.{e.param}") from None
        for m in misses:
            if (m.fqn, m.kind, m.reason) not in seen_misses:
                seen_misses.add((m.fqn, m.kind, m.reason))
                report.misses.append(MissRecord(m.fqn, m.kind, m.reason, m.node))
        report.sites += [SiteRecord(o.site.fqn, rw.kind, rw.name, o.status, o.reason, o.site.pattern, o.error, o.info)
                         for o in outcomes]
        warning = selection_warning(step, i, [o.site.fqn for o in outcomes], modules)
        if warning:
            report.warnings.append(warning)
    report.nodes_after = len(gm.graph.nodes)

    if verify and not dry_run:
        say("verify")
        t = time.perf_counter()
        report.outputs = verify_program(captured, gm, recipe, backend)
        report.timings["verify"] = time.perf_counter() - t
    return Program(captured.form, gm, report, list(captured.inputs))


def selection_warning(step, index: int, fqns: list[str], modules: set[str]) -> str:
    """'' when the ``index``-th recipe step's targets and skip_first/skip_last select something; else a warning
    that starts with the field: they leave none of the sites its rewrite found (``fqns``), or a target matches no
    module FQN of the model (``modules``) nor any site."""
    def few(names):
        names = list(dict.fromkeys(n or "<root>" for n in names))
        return ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")

    if fqns and (step.targets is not None or step.skip_first or step.skip_last) and not any(step.choose(fqns)):
        if step.targets is not None and not any(step.selects(f) for f in fqns):
            where, what = "targets", f"targets {few(repr(t)[:80] for t in step.targets)}"
        else:
            where = "skip_first" if step.skip_first else "skip_last"
            what = f"skip_first={step.skip_first}, skip_last={step.skip_last}"
        return (f"steps[{index}].{where}: {what} select none of the {len(fqns)} {step.rewrite} site"
                f"{'s' if len(fqns) > 1 else ''} ({few(fqns)})")
    names = modules | set(fqns)
    for t in step.targets or []:
        if not any(step.model_copy(update={"targets": [t]}).selects(n) for n in names):
            return f"steps[{index}].targets: {repr(t)[:80]} matches no module of the model"
    return ""


def approximate(recipe: Recipe) -> bool:
    """Whether any step of the recipe is an approximate rewrite (judged by the quality budget, not by atol)."""
    return any(not REGISTRY[s.rewrite].exact for s in recipe.steps)


def verify_program(captured: Captured, gm: GraphModule, recipe: Recipe, backend: str) -> list[dict]:
    """The rewritten graph against the model on the example (and on the widened example it was captured on, when
    it was): per output, error stats and whether the recipe's tolerance or quality budget holds."""
    call = bound_module(captured.model, captured.form)
    examples = [captured.example] + ([captured.inputs] if captured.widened else [])
    rows = []
    try:
        with torch.no_grad():
            for n, example in enumerate(examples):
                ref = call(*example)
                with use_backend(backend):
                    got = gm(*example)
                for row in compare_outputs(ref, got, recipe.verify, approximate(recipe)):
                    if n:
                        row["name"] += " (capture example)"
                    rows.append(row)
    except Exception as e:  # noqa: BLE001 - the report says why; the model is not rewritten
        raise CaptureError(f"the rewritten graph failed on the example inputs: {type(e).__name__}: "
                           f"{str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    return rows
