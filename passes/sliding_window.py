"""``sliding_window``: attention restricted to a local window plus attention sinks (approximate).

Longformer/Mistral local attention (query i sees keys i − window < j ≤ i, or |i − j| < window for
bidirectional sites) plus StreamingLLM sinks (Xiao et al., 2023: the first ``sinks`` tokens stay
visible), ANDed with the model's own mask. The rule and its kernels: runtime/sliding_window/.
"""
from __future__ import annotations

import sympy

from attnforge.patterns import AttentionSite
from attnforge.patterns.graph import example_size, shape
from attnforge.runtime.sliding_window import VARIANT, SlidingWindowParams, pairs

from .base import RewritePass, register
from .fuse_attention import dense_flops, match, needs, site_flops

N = sympy.Symbol("N", positive=True, integer=True)


def apply(edit, site: AttentionSite, params: SlidingWindowParams):
    return edit.replace_core(VARIANT.op, site.scale, params.window, params.sinks, site.causal)


def describe(site: AttentionSite, params: SlidingWindowParams) -> dict:
    n = example_size(shape(site.q)[-2]) if shape(site.q) else None
    w, s = params.window, params.sinks
    after = lambda n: site_flops(site, VARIANT, n, w, s, site.causal)  # noqa: E731
    info = {"window": w, "sinks": s, "causal": site.causal, "heads": site.num_heads, "kv_heads": site.num_kv_heads,
            "flops_before": str(sympy.expand(dense_flops(site, N))), "flops_after": str(sympy.expand(after(N))),
            "formula_valid_for": f"N >= {w + s}"}
    if n:
        visible, total = pairs(n, w, s, site.causal), n * (n + 1) // 2 if site.causal else n * n
        info.update(example_n=n, kept_fraction=visible / total, flops_before_at_n=int(dense_flops(site, n)),
                    flops_after_at_n=int(after(n)))
    return info


PASS = register(RewritePass("sliding_window", "attention", False, match, apply, needs, describe, SlidingWindowParams))
