"""What every rewrite pass provides, and the registry the pass manager reads."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from torch.fx import GraphModule, Node


@dataclass(frozen=True)
class RewritePass:
    """One recipe step name.

    ``match(gm)`` finds (sites, misses); ``needs(site)`` lists the graph values the local check reads;
    ``apply(gm, site, params)`` inserts the replacement before ``site.out`` and returns the new nodes
    (the last one replaces ``site.out``); ``exact`` passes are rolled back per site when the local
    check exceeds the tolerance.
    """

    name: str
    kind: str  # "attention" | "ffn"
    exact: bool
    match: Callable[[GraphModule], tuple[list, list]]
    needs: Callable[[Any], list[Node]]
    apply: Callable[[GraphModule, Any, Any], list[Node]]
    describe: Callable[[Any], dict] = lambda site: {}


REGISTRY: dict[str, RewritePass] = {}


def register(p: RewritePass) -> RewritePass:
    REGISTRY[p.name] = p
    return p
