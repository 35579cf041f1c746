"""The local check of a rewritten site: record the original graph's values on the example inputs, compare."""
from __future__ import annotations

import math

import torch
from torch.fx import GraphModule, Interpreter, Node


class _Recorder(Interpreter):
    def __init__(self, gm, wanted):
        super().__init__(gm)
        self.wanted, self.values = wanted, {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.wanted:
            self.values[n] = out
        return out


@torch.no_grad()
def record(gm: GraphModule, flat_inputs: list, nodes) -> dict[Node, object]:
    """Values of ``nodes`` when ``gm`` runs on ``flat_inputs``."""
    rec = _Recorder(gm, set(nodes))
    rec.run(*flat_inputs)
    for n in nodes:  # parameters are read directly
        if n not in rec.values and n.op == "get_attr":
            rec.values[n] = rec.fetch_attr(n.target)
    return rec.values


_KINDS = ("a finite value", "NaN", "+inf", "-inf")


def _kind(t: torch.Tensor) -> torch.Tensor:
    """Per element: 0 finite, 1 NaN, 2 +inf, 3 -inf."""
    return torch.isnan(t) * 1 + (t == math.inf) * 2 + (t == -math.inf) * 3


def nonfinite_mismatch(got: torch.Tensor, ref: torch.Tensor) -> str:
    """'' when NaN and ±inf sit at the same positions in ``got`` and ``ref`` (the same sign for inf), else what
    differs, e.g. "NaN where the original has a finite value (3 of 512 values)". Same shapes."""
    kg, kr = _kind(got), _kind(ref)
    bad = kg != kr
    count = int(bad.sum())
    if not count:
        return ""
    first = bad.flatten().nonzero()[0, 0]
    g, r = int(kg.flatten()[first]), int(kr.flatten()[first])
    return f"{_KINDS[g]} where the original has {_KINDS[r]} ({count} of {bad.numel()} values)"


def error_stats(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """max abs error, relative max error (max|Δ| / max|ref|) and cosine similarity, over the finite positions:
    NaN and ±inf count as equal where both sides have them. Where only one side has them, the error is inf, the
    cosine NaN (no budget passes) and ``note`` says what differs."""
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        return {"max_abs": math.inf, "rel": math.inf, "cosine": float("nan"), "shape": [list(got.shape), list(ref.shape)]}
    mismatch = nonfinite_mismatch(got, ref)
    if mismatch:
        return {"max_abs": math.inf, "rel": math.inf, "cosine": float("nan"), "note": mismatch}
    finite = torch.isfinite(ref)
    g, r = got[finite].flatten(), ref[finite].flatten()
    max_abs = float((g - r).abs().max()) if g.numel() else 0.0
    scale = float(r.abs().max()) if r.numel() else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    denom = float(g.norm() * r.norm())
    cosine = float((g @ r) / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return {"max_abs": max_abs, "rel": rel, "cosine": cosine}
