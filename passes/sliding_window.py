"""``sliding_window``: attention restricted to a local window plus attention sinks (approximate).

Longformer/Mistral local attention (query i sees keys i − window < j ≤ i, or |i − j| < window for
bidirectional sites) plus StreamingLLM sinks (Xiao et al., 2023: the first ``sinks`` tokens stay
visible), ANDed with the model's own mask. Kept pairs per query: min(i + 1, w) + sinks, so the cost
is O(N·w) instead of O(N²).
"""
from __future__ import annotations

import sympy
import torch
from pydantic import Field
from torch.fx import GraphModule

from attnforge.patterns import AttentionSite
from attnforge.patterns.graph import example_size, shape
from attnforge.runtime import sparse  # noqa: F401  (registers the op)

from .base import Params, RewritePass, register
from .fuse_attention import match, needs, replace_core

N = sympy.Symbol("N", positive=True, integer=True)


class SlidingWindowParams(Params):
    window: int = Field(gt=0, description="keys visible behind (and, bidirectional, ahead of) each query")
    sinks: int = Field(default=0, ge=0, description="first tokens every query sees (StreamingLLM)")


def apply(gm: GraphModule, site: AttentionSite, params: SlidingWindowParams) -> list:
    return replace_core(gm, site, torch.ops.attnforge.sliding_window_attention.default, site.scale, params.window,
                        params.sinks, site.causal)


def pairs(causal: bool, window: int, sinks: int):
    """Visible (query, key) pairs as a formula in N, valid for N ≥ window + sinks (and sinks ≤ window)."""
    if causal:
        band = window * (window + 1) / 2 + (N - window) * window
        extra = sinks * (sinks + 1) / 2 + (N - window - sinks) * sinks  # sinks behind the window
    else:
        band = N * (2 * window - 1) - window * (window - 1)
        extra = sinks * (N - window) - sinks * (sinks - 1) / 2  # sink columns outside the band
    return sympy.nsimplify(band + extra)


def describe(site: AttentionSite, params: SlidingWindowParams) -> dict:
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    w, s = params.window, params.sinks
    dense = N * (N + 1) / 2 if site.causal else N ** 2
    kept = pairs(site.causal, w, s)
    per_pair = 4 * site.num_heads * site.head_dim  # q·k and p·v multiply-adds, as FLOPs
    info = {"window": w, "sinks": s, "causal": site.causal, "heads": site.num_heads, "kv_heads": site.num_kv_heads,
            "flops_before": str(sympy.expand(per_pair * dense)), "flops_after": str(sympy.expand(per_pair * kept)),
            "formula_valid_for": f"N >= {w + s}"}
    if n:
        if n >= w + s and s <= w:
            visible = int(kept.subs(N, n))
        else:
            i = torch.arange(n)[:, None]
            j = torch.arange(n)[None]
            visible = int(sparse.window_visible(i, j, w, s, site.causal).sum())
        total = n * (n + 1) // 2 if site.causal else n * n
        info.update(example_n=n, kept_fraction=visible / total, flops_before_at_n=per_pair * total,
                    flops_after_at_n=per_pair * visible)
    return info


PASS = register(RewritePass("sliding_window", "attention", False, match, needs, apply, describe,
                            SlidingWindowParams))
