"""Numerical checks of the whole model: per-output error against the original (the per-site local check, which
decides rollbacks, is the pass manager's: passes/check.py)."""
from __future__ import annotations

import math

import torch
import torch.utils._pytree as pytree

from attnforge.passes.check import error_stats, record  # noqa: F401  (re-exported)


def compare_outputs(ref, got, atol: float, rtol: float = 0.0) -> list[dict]:
    """Error of each floating-point output leaf of ``got`` against ``ref`` (same pytree structure)."""
    ref_leaves = pytree.tree_flatten_with_path(ref)[0]
    got_leaves = pytree.tree_leaves(got)
    rows = []
    if len(ref_leaves) != len(got_leaves):
        return [{"name": "<structure>", "max_abs": math.inf, "rel": math.inf, "cosine": float("nan"),
                 "passed": False, "note": f"{len(got_leaves)} outputs, expected {len(ref_leaves)}"}]
    for (path, r), g in zip(ref_leaves, got_leaves):
        if not isinstance(r, torch.Tensor):
            continue
        name = _path_name(path)
        if not r.is_floating_point():
            ok = isinstance(g, torch.Tensor) and torch.equal(g, r)
            rows.append({"name": name, "max_abs": 0.0 if ok else math.inf, "rel": 0.0 if ok else math.inf,
                         "cosine": 1.0 if ok else 0.0, "passed": ok})
            continue
        st = error_stats(g, r)
        st.update(name=name, passed=st["max_abs"] <= atol + rtol * float(r.abs().max() if r.numel() else 0))
        rows.append(st)
    return rows


def _path_name(path) -> str:
    """'last_hidden_state', '0', 'logits.1' for pytree key paths."""
    parts = []
    for k in path:
        for attr in ("key", "idx", "name"):
            if hasattr(k, attr):
                parts.append(str(getattr(k, attr)))
                break
        else:
            parts.append(str(k))
    return ".".join(parts) or "output"
