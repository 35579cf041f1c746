"""What every rewrite pass provides, and the registry the pass manager reads.

A pass is one recipe step name. ``match(gm)`` finds (sites, misses); ``needs(site)`` lists the graph values the
pass and the local check read on the example inputs; ``apply(edit, site, params)`` builds the replacement of
``site.out`` with the toolkit of ``edit`` (a ``SiteEdit``, passes/edit.py: the site's transaction) and returns
the node that replaces it; ``describe(site, params)`` is what the report says about the site before it is
rewritten (``apply`` may add measurements to ``edit.info``). ``exact`` passes are rolled back per site when the
local check exceeds the tolerance. ``params`` is the pydantic model the recipe validates the step's ``params``
against before anything runs: the variant's (runtime/<variant>/) when the pass inserts a variant's op.
"""
from __future__ import annotations

import contextvars
from dataclasses import dataclass
from typing import Any, Callable

from torch.fx import GraphModule, Node

from attnforge.runtime.registry import NoParams, Params  # noqa: F401  (the base of every params model)


# True while an optimized model re-applies its recipe to another call form (generation's program is captured on
# a short example of its own): checks that judge the user's example inputs, such as a window longer than its
# prompt, do not apply to that one
REPLAY = contextvars.ContextVar("attnforge_replay", default=False)


class ParamError(ValueError):
    """A parameter that validated on its own but does not fit this model (e.g. a block size that does not
    divide the sequence length). The pipeline turns it into a RecipeError naming ``steps[i].params.<param>``."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class SkipSite(Exception):
    """Raised by ``apply`` when a site cannot take this rewrite; whatever the pass changed is rolled back, the
    reason is reported and the site is left as it was."""


def _no_info(site, params) -> dict:
    return {}


def _out_only(site) -> list[Node]:
    return [site.out]


@dataclass(frozen=True)
class RewritePass:
    name: str
    kind: str  # "attention" | "ffn" | "projection" | "residual"
    exact: bool
    match: Callable[[GraphModule], tuple[list, list]]
    apply: Callable[[Any, Any, Params], Node]
    needs: Callable[[Any], list[Node]] = _out_only
    describe: Callable[[Any, Params], dict] = _no_info
    params: type[Params] = NoParams


REGISTRY: dict[str, RewritePass] = {}


def register(p: RewritePass) -> RewritePass:
    if p.name in REGISTRY:
        raise ValueError(f"rewrite {p.name!r} is registered twice")
    REGISTRY[p.name] = p
    return p
