"""What every rewrite pass provides, and the registry the pass manager reads."""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from pydantic import BaseModel, ConfigDict
from torch.fx import GraphModule, Node


class Params(BaseModel):
    """Base of every rewrite's parameter model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class ParamError(ValueError):
    """A parameter that validated on its own but does not fit this model (e.g. a block size that does not
    divide the sequence length). The pipeline turns it into a RecipeError naming ``steps[i].params.<param>``."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class SkipSite(Exception):
    """Raised by ``apply`` (before it changes the graph) when a site cannot take this rewrite; the reason is
    reported and the site is left as it is."""


class NoParams(Params):
    """Exact rewrites take no parameters."""


@dataclass(frozen=True)
class RewritePass:
    """One recipe step name.

    ``match(gm)`` finds (sites, misses); ``needs(site)`` lists the graph values the local check reads;
    ``apply(gm, site, params)`` inserts the replacement before ``site.out`` and returns the new nodes
    (the last one replaces ``site.out``); ``exact`` passes are rolled back per site when the local
    check exceeds the tolerance. ``params`` is the pydantic model the recipe validates the step's
    ``params`` against (before anything runs). A pass with ``uses_values`` is called as
    ``apply(gm, site, params, values)``, ``values`` holding the example-input values of ``needs(site)``
    (for calibration); ``apply`` may put measurements for the report in ``new[-1].meta["attnforge_info"]``.
    """

    name: str
    kind: str  # "attention" | "ffn"
    exact: bool
    match: Callable[[GraphModule], tuple[list, list]]
    needs: Callable[[Any], list[Node]]
    apply: Callable[[GraphModule, Any, Any], list[Node]]
    describe: Callable[..., dict] = lambda site: {}
    params: type[Params] = NoParams
    uses_values: bool = False

    def info(self, site, params) -> dict:
        """What the report says about a site: ``describe(site)`` or ``describe(site, params)``."""
        takes_params = len(inspect.signature(self.describe).parameters) > 1
        return self.describe(site, params) if takes_params else self.describe(site)


REGISTRY: dict[str, RewritePass] = {}


def register(p: RewritePass) -> RewritePass:
    REGISTRY[p.name] = p
    return p
