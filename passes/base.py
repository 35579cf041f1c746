"""What every rewrite pass provides, and the registry the pass manager reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict
from torch.fx import GraphModule, Node


class Params(BaseModel):
    """Base of every rewrite's parameter model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    """Exact rewrites take no parameters."""


@dataclass(frozen=True)
class RewritePass:
    """One recipe step name.

    ``match(gm)`` finds (sites, misses); ``needs(site)`` lists the graph values the local check reads;
    ``apply(gm, site, params)`` inserts the replacement before ``site.out`` and returns the new nodes
    (the last one replaces ``site.out``); ``exact`` passes are rolled back per site when the local
    check exceeds the tolerance. ``params`` is the pydantic model the recipe validates the step's
    ``params`` against (before anything runs).
    """

    name: str
    kind: str  # "attention" | "ffn"
    exact: bool
    match: Callable[[GraphModule], tuple[list, list]]
    needs: Callable[[Any], list[Node]]
    apply: Callable[[GraphModule, Any, Any], list[Node]]
    describe: Callable[[Any], dict] = lambda site: {}
    params: type[Params] = NoParams


REGISTRY: dict[str, RewritePass] = {}


def register(p: RewritePass) -> RewritePass:
    REGISTRY[p.name] = p
    return p
