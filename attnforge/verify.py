"""Numerical checks of the whole model: per-output error against the original (the per-site local check, which
decides rollbacks, is the pass manager's: passes/check.py)."""
from __future__ import annotations

import dataclasses
import math

import torch

from attnforge.passes.check import error_stats, record  # noqa: F401  (re-exported)


def compare_outputs(ref, got, tolerance=1e-4, approximate: bool = False, *, atol: float | None = None) -> list[dict]:
    """Error of each floating-point output of ``got`` against ``ref`` (same structure), and whether it passes.

    ``tolerance``: a recipe's ``VerifyConfig`` (or a plain ``atol``). Exact recipes pass an output when
    max|Δ| ≤ atol; recipes with an approximate step are judged by their quality budget instead: cosine ≥
    ``min_cosine`` and relative max error ≤ ``max_rel_error`` (each when set). Integer outputs must be equal.
    NaN and ±inf count as equal where both sides have them; on one side only, the output fails and
    ``row["note"]`` says what differs (``error_stats``). ``row["budget"]`` says what was allowed."""
    tolerance = atol if atol is not None else tolerance
    atol = tolerance if isinstance(tolerance, (int, float)) else tolerance.atol
    ref_leaves, got_leaves = named_leaves(ref), named_leaves(got)
    if [n for n, _ in ref_leaves] != [n for n, _ in got_leaves]:
        return [{"name": "<structure>", "max_abs": math.inf, "rel": math.inf, "cosine": float("nan"),
                 "passed": False, "note": f"outputs {[n for n, _ in got_leaves]}, expected "
                                          f"{[n for n, _ in ref_leaves]}"}]
    rows = []
    for (name, r), (_, g) in zip(ref_leaves, got_leaves):
        if not r.is_floating_point():
            ok = isinstance(g, torch.Tensor) and torch.equal(g, r)
            rows.append({"name": name, "max_abs": 0.0 if ok else math.inf, "rel": 0.0 if ok else math.inf,
                         "cosine": 1.0 if ok else 0.0, "passed": ok, "budget": "equal"})
            continue
        st = error_stats(g, r)
        if approximate and not isinstance(tolerance, (int, float)):
            cos, rel = tolerance.min_cosine, tolerance.max_rel_error
            st["passed"] = (cos is None or st["cosine"] >= cos) and (rel is None or st["rel"] <= rel)
            st["budget"] = ", ".join(x for x in (f"cosine >= {cos:g}" if cos is not None else "",
                                                 f"rel <= {rel:g}" if rel is not None else "") if x) or "none"
        else:
            st["passed"], st["budget"] = st["max_abs"] <= atol, f"max abs <= {atol:g}"
        st["passed"] = st["passed"] and "note" not in st  # NaN/inf on one side only fails under any budget
        st["name"] = name
        rows.append(st)
    return rows


def named_leaves(x, prefix: str = "") -> list[tuple[str, torch.Tensor]]:
    """The tensors of a model output with their names (``logits``, ``hidden_states.1``, ``0``), walking mappings
    (Hugging Face ``ModelOutput`` included), sequences and dataclasses; None and non-tensors are skipped."""
    def join(key):
        return f"{prefix}.{key}" if prefix else str(key)

    if isinstance(x, torch.Tensor):
        return [(prefix or "output", x)]
    if isinstance(x, dict):  # ModelOutput is an OrderedDict: its set fields, in order
        return [leaf for k, v in x.items() for leaf in named_leaves(v, join(k))]
    if isinstance(x, (tuple, list)):
        return [leaf for i, v in enumerate(x) for leaf in named_leaves(v, join(i))]
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return [leaf for f in dataclasses.fields(x) for leaf in named_leaves(getattr(x, f.name), join(f.name))]
    return []
