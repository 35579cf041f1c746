"""``attnforge autotune``: find the kernels a rewritten model (or one op) runs, tune each, report the winners.

A model is run once under a dispatch mode that records every ``torch.ops.attnforge`` call with its arguments;
each call maps to the kernels it runs (its variant's ``tunables``, runtime/registry.py), calls with the same cache
key are tuned once, and the winners land in the cache that the ops read at run time. One op is tuned on the
synthetic arguments its variant makes from a shape and name=value parameters.
"""
from __future__ import annotations

import time
from typing import Annotated, Callable, Optional

import torch
from pydantic import TypeAdapter, ValidationError
from torch.utils._python_dispatch import TorchDispatchMode

from attnforge.codegen.autotune import Cache, Result, Tunable, tune
from attnforge.runtime import VARIANTS, op_names, variant
from attnforge.runtime.dispatch import use_backend

from .errors import AttnforgeError

class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.calls: list[tuple[str, tuple]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "attnforge":
            self.calls.append((func._opname, args))
        return func(*args, **(kwargs or {}))


def record_calls(module: Callable, args: tuple, kwargs: dict, backend: str) -> list[tuple[str, tuple]]:
    """Every ``attnforge`` op call of one forward pass, as (op name, arguments)."""
    with torch.no_grad(), use_backend(backend), _Recorder() as rec:
        module(*args, **kwargs)
    return rec.calls


def synthetic_call(op: str, shape: tuple[int, ...], params: dict, dtype: torch.dtype, device) -> tuple[str, tuple]:
    """(op name, random arguments) for one op, named by its op or rewrite name, from a shape and name=value params
    (each variant's ``synthetic``: attention-like ops take q's shape B×H×N×D, ``ffn`` ROWS×D_IN)."""
    try:
        v = variant(op)
    except KeyError:
        raise AttnforgeError(f"--op {op!r}: expected one of {', '.join(sorted(op_names(tunable_only=True)))}") from None
    if v.synthetic is None:
        raise AttnforgeError(f"--op {op!r}: {v.name} has no synthetic inputs; tune it with --model")
    params = dict(params)
    _check_params(v, params)
    try:
        args = v.synthetic(shape, params, dtype, device)
    except ValueError as e:
        raise AttnforgeError(f"--params: {e}") from None
    if params:
        raise AttnforgeError(f"--params: {sorted(params)} are not parameters of {v.name}")
    return v.name, args


def _check_params(v, params: dict) -> None:
    """Each name=value that the variant's rewrite params model declares is validated by that model's field (its
    types and bounds, as in a recipe) before any tensor is made or any result cached."""
    fields = getattr(v.params, "model_fields", {})
    for name, raw in params.items():
        info = fields.get(name) or fields.get(f"{name}_")  # block_sparse's global_ is global= on the command line
        if info is None:
            continue
        try:
            TypeAdapter(Annotated[info.annotation, info]).validate_python(raw)
        except ValidationError as e:
            shown = raw if len(str(raw)) <= 80 else f"{str(raw)[:77]}..."
            raise AttnforgeError(f"--params {name}={shown}: {e.errors()[0]['msg']}") from None


def collect(calls: list[tuple[str, tuple]], device, backend: str) -> list[Tunable]:
    """The distinct kernels (by cache key) that ``calls`` run."""
    seen: dict[str, Tunable] = {}
    for name, args in calls:
        v = VARIANTS.get(name)
        for t in (v.tunables_for(args, device, backend) if v is not None else []):
            seen.setdefault(str(t.key), t)
    return list(seen.values())


def tune_all(tunables: list[Tunable], cache: Cache, budget_s: Optional[float], reps: int = 5,
             progress: Optional[Callable[[str, int, int], None]] = None) -> list[Result]:
    """Tune each kernel in turn; the budget is shared out evenly among those not yet tuned."""
    results, start = [], time.perf_counter()
    for i, t in enumerate(tunables):
        share = None
        if budget_s is not None:
            share = max(0.0, budget_s - (time.perf_counter() - start)) / (len(tunables) - i)
        results.append(tune(t, cache, share, reps, (lambda done, total, t=t: progress(t.label, done, total))
                            if progress else None))
    return results
