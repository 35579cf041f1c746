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


def error_stats(got: torch.Tensor, ref: torch.Tensor) -> dict:
    """max abs error, relative max error (max|Δ| / max|ref|) and cosine similarity."""
    got, ref = got.detach().double(), ref.detach().double()
    if got.shape != ref.shape:
        return {"max_abs": math.inf, "rel": math.inf, "cosine": float("nan"), "shape": [list(got.shape), list(ref.shape)]}
    finite = torch.isfinite(ref) & torch.isfinite(got)
    same_nonfinite = torch.equal(torch.isnan(ref), torch.isnan(got)) and torch.equal(
        ref.nan_to_num(nan=0.0, posinf=1.0, neginf=-1.0) * ~finite, got.nan_to_num(nan=0.0, posinf=1.0, neginf=-1.0) * ~finite)
    diff = (got - ref)[finite].abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    if not same_nonfinite:
        max_abs = math.inf
    scale = float(ref[finite].abs().max()) if finite.any() else 0.0
    rel = max_abs / scale if scale > 0 else (0.0 if max_abs == 0 else math.inf)
    g, r = got[finite].flatten(), ref[finite].flatten()
    denom = float(g.norm() * r.norm())
    cosine = float((g @ r) / denom) if denom > 0 else (1.0 if max_abs == 0 else 0.0)
    return {"max_abs": max_abs, "rel": rel, "cosine": cosine}
