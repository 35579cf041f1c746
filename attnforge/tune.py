"""``attnforge autotune``: find the kernels a rewritten model (or one op) runs, tune each, report the winners.

A model is run once under a dispatch mode that records every ``torch.ops.attnforge`` call with its arguments;
each call maps to the kernels it runs (``codegen.autotune.tunables_for``), calls with the same cache key are
tuned once, and the winners land in the cache that the ops read at run time.
"""
from __future__ import annotations

import math
import time
from typing import Callable, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from attnforge.codegen.autotune import Cache, Result, Tunable, tune, tunables_for
from attnforge.runtime.dispatch import use_backend

from .errors import AttnforgeError

OPS = {"attention": "attention", "sliding_window": "sliding_window_attention",
       "sliding_window_attention": "sliding_window_attention", "block_sparse": "block_sparse_attention",
       "block_sparse_attention": "block_sparse_attention", "linear": "linear_attention",
       "linear_attention": "linear_attention", "ffn": "ffn"}


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


def _flag(params: dict, name: str, default):
    value = params.pop(name, default)
    if isinstance(default, bool) and isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return type(default)(value)


def synthetic_call(op: str, shape: tuple[int, ...], params: dict, dtype: torch.dtype, device) -> tuple[str, tuple]:
    """Random inputs for one op: attention-like ops take q's shape B×H×N×D (``kv_heads`` in params), ``ffn``
    takes ROWS×D_IN (``hidden``, ``out``, ``activation``, ``gated``, ``layout``)."""
    if op not in OPS:
        raise AttnforgeError(f"--op {op!r}: expected one of {sorted(OPS)}")
    name, params = OPS[op], dict(params)
    make = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    try:
        if name == "ffn":
            if len(shape) != 2:
                raise AttnforgeError(f"--shapes {'x'.join(map(str, shape))}: ffn takes ROWSxD_IN, e.g. 512x384")
            rows, d = shape
            hidden, out = _flag(params, "hidden", 4 * d), _flag(params, "out", d)
            act, gated = _flag(params, "activation", "gelu"), _flag(params, "gated", False)
            layout = _flag(params, "layout", "out_in")
            w = (lambda i, o: make(o, i) / math.sqrt(i)) if layout == "out_in" else (lambda i, o: make(i, o) / math.sqrt(i))
            args = (make(rows, d), w(d, hidden), make(hidden), w(hidden, out), make(out),
                    w(d, hidden) if gated else None, None, act, layout)
        else:
            if len(shape) != 4:
                raise AttnforgeError(f"--shapes {'x'.join(map(str, shape))}: {name} takes q's shape BxHxNxD, "
                                     "e.g. 1x8x4096x64")
            b, h, n, d = shape
            kv = _flag(params, "kv_heads", h)
            if kv < 1 or h % kv:
                raise AttnforgeError(f"--params kv_heads={kv}: must divide the {h} query heads")
            q, k, v = make(b, h, n, d), make(b, kv, n, d), make(b, kv, n, d)
            scale, causal = _flag(params, "scale", 1 / math.sqrt(d)), _flag(params, "causal", True)
            if name == "attention":
                args = (q, k, v, None, scale, causal, 0.0)
            elif name == "sliding_window_attention":
                args = (q, k, v, None, scale, _flag(params, "window", 512), _flag(params, "sinks", 4), causal)
            elif name == "block_sparse_attention":
                args = (q, k, v, None, scale, _flag(params, "block", 64), _flag(params, "local", 3),
                        _flag(params, "global", 1), _flag(params, "random", 0), 0, _flag(params, "topk", 0), causal)
            else:
                fmap = _flag(params, "feature_map", "elu")
                if fmap in ("performer", "hedgehog"):
                    raise AttnforgeError(f"--params feature_map={fmap}: needs learned weights; tune it with --model")
                args = (q, k, v, None, scale, fmap, causal, _flag(params, "window", 0), 1e-6, None, None,
                        torch.zeros(h, dtype=dtype, device=device) if params.get("window") else None)
    except ValueError as e:
        raise AttnforgeError(f"--params: {e}") from None
    if params:
        raise AttnforgeError(f"--params: {sorted(params)} are not parameters of {name}")
    return name, args


def collect(calls: list[tuple[str, tuple]], device, backend: str) -> list[Tunable]:
    """The distinct kernels (by cache key) that ``calls`` run."""
    seen: dict[str, Tunable] = {}
    for name, args in calls:
        for t in tunables_for(name, args, device, backend):
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
