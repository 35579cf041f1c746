"""The pass manager: run one recipe step over a graph, site by site, each site a transaction.

For each step: match the sites, keep those the step selects, record the values they read on the example inputs,
then for each site apply the rewrite (``SiteEdit``, passes/edit.py), check the inserted nodes on the recorded
values against the original site (the local check), and roll the site back, graph and module state together,
when an exact rewrite is over tolerance or the replacement fails to run. ``optimize`` (attnforge/optimize.py)
turns the outcomes into the report.
"""
from __future__ import annotations

import operator
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch
from torch.fx import GraphModule

from attnforge.errors import CaptureError
from attnforge.patterns import refine_causal
from attnforge.runtime.dispatch import use_backend

from .base import ParamError, RewritePass, SkipSite
from .check import error_stats, record
from .edit import SiteEdit


@dataclass
class Outcome:
    """What happened to one site: ``applied``, ``rolled_back``, ``skipped`` or ``planned`` (a dry run)."""

    site: Any
    status: str
    reason: str = ""
    error: Optional[dict] = None
    info: dict = field(default_factory=dict)


def apply_site(gm: GraphModule, rewrite: RewritePass, site, params, values: Optional[dict] = None) -> SiteEdit:
    """Apply ``rewrite`` to ``site`` as a transaction: committed when ``apply`` returns, rolled back (and the error
    re-raised) when it raises."""
    edit = SiteEdit(gm, site, values)
    try:
        with gm.graph.inserting_before(site.out):
            out = rewrite.apply(edit, site, params)
        edit.commit(out)
    except BaseException:
        edit.rollback()
        raise
    return edit


def run_step(gm: GraphModule, rewrite: RewritePass, params, flat_inputs: list,
             select: Callable[[list[str]], list[Optional[str]]], *, rtol: float, backend: str = "auto",
             dry_run: bool = False, timings: Optional[dict] = None) -> tuple[list[Outcome], list]:
    """Run one recipe step on ``gm`` in place; (outcomes in report order, misses of the matcher).

    ``select(fqns)`` says, per matched site, None (rewrite it) or why it is left out. ``ParamError`` propagates
    (the recipe does not fit the model). ``timings`` gets the seconds spent matching and rewriting added."""
    timings = timings if timings is not None else {}
    t = time.perf_counter()
    sites, misses = rewrite.match(gm)
    outcomes, chosen = [], []
    for s, why in zip(sites, select([s.fqn for s in sites])):
        if why is None:
            chosen.append(s)
        else:
            outcomes.append(Outcome(s, "skipped", why))
    if dry_run:
        outcomes += [Outcome(s, "planned", info=rewrite.describe(s, params)) for s in chosen]
    timings["match"] = timings.get("match", 0.0) + time.perf_counter() - t
    if dry_run:
        return outcomes, misses
    t = time.perf_counter()
    if rewrite.kind == "attention":  # training graphs: attention dropout stays with the model's own ops
        for s in [s for s in chosen if s.dropout_p > 0]:
            chosen.remove(s)
            outcomes.append(Outcome(s, "skipped", f"attention dropout p={s.dropout_p:g} (a training graph): the "
                                                  "model's own ops keep it; the fused ops have no dropout backward"))
    needed = {n for s in chosen for n in rewrite.needs(s)}
    try:
        env = record(gm, flat_inputs, needed) if chosen else {}
    except Exception as e:  # noqa: BLE001 - a graph that cannot be replayed is not rewritten, and says why
        raise CaptureError(f"the captured graph could not be replayed on the example inputs to check the rewrites: "
                           f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}") from e
    if rewrite.kind == "attention":
        chosen = [refine_causal(s, env) for s in chosen]
    for s in chosen:
        outcomes.append(_rewrite_site(gm, rewrite, s, params, env, rtol, backend))
    dead_code(gm)
    timings["rewrite"] = timings.get("rewrite", 0.0) + time.perf_counter() - t
    return outcomes, misses


def _rewrite_site(gm, rewrite, site, params, env, rtol, backend) -> Outcome:
    outcome = Outcome(site, "applied", info=rewrite.describe(site, params))
    try:
        edit = apply_site(gm, rewrite, site, params, env)
    except (ParamError, KeyboardInterrupt):
        raise
    except SkipSite as e:  # the rewrite does not fit this site: left as it was, with the reason
        outcome.status, outcome.reason = "skipped", str(e)
        return outcome
    except Exception as e:  # noqa: BLE001 - a pass that fails on a site leaves it as it was, with the cause
        outcome.status, outcome.reason = "rolled_back", f"the rewrite failed: {type(e).__name__}: {e}"
        return outcome
    outcome.info.update(edit.info)
    failure = None
    try:
        with torch.no_grad(), use_backend(backend):
            outcome.error = error_stats(edit.evaluate(), env[site.out])
    except Exception as e:  # noqa: BLE001 - a failing kernel rolls the site back, with the cause
        failure = f"replacement failed on the example inputs: {type(e).__name__}: {e}"
    too_far = outcome.error is not None and not outcome.error["rel"] <= rtol
    if failure or (rewrite.exact and too_far):
        edit.rollback()
        outcome.status = "rolled_back"
        outcome.reason = failure or outcome.error.get("note") or \
            f"relative error {outcome.error['rel']:.2e} > rtol {rtol:g} for an exact rewrite"
    return outcome


def dead_code(gm: GraphModule) -> None:
    """Erase pure aten calls, tuple reads and get_attrs nobody uses; keep modules and side-effecting ops."""
    g = gm.graph
    for node in reversed(list(g.nodes)):
        if node.users:
            continue
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            schema = node.target._schema
            if not schema.is_mutable and schema.returns and "assert" not in schema.name:
                g.erase_node(node)
        elif node.op == "get_attr" or (node.op == "call_function" and node.target is operator.getitem):
            g.erase_node(node)
    gm.recompile()
