"""``fuse_attention``: each attention core -> one ``attnforge::attention`` call (exact).

The eager chain softmax(s·q kᵀ + M) v is folded into the op's (scale, mask); repeated K/V heads
(``repeat_kv``) are dropped so the op reads the Hkv heads directly (grouped-query attention).
"""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from attnforge.patterns import AttentionSite, match_attention
from attnforge.patterns.graph import aten, insert_call, val
from attnforge.runtime import ops  # noqa: F401  (registers torch.ops.attnforge.*)

from .base import RewritePass, register


def match(gm: GraphModule):
    return match_attention(gm.graph)


def needs(site: AttentionSite) -> list:
    return [site.q, site.k, site.v, site.out] + [p[0] for p in site.mask_parts]


def build_mask(gm: GraphModule, site: AttentionSite):
    """The single additive (or boolean keep-) mask equal to the site's mask parts, as graph nodes."""
    g = gm.graph
    parts = site.mask_parts
    if not parts:
        return None
    if len(parts) == 1 and parts[0][2] in ("bool", "add") and parts[0][1] == 1.0:
        return parts[0][0]
    dtype = val(site.q).dtype if val(site.q) is not None else torch.float32
    total = None
    for node, coef, kind in parts:
        if kind == "add":
            term = node if coef == 1.0 else insert_call(g, aten.mul.Tensor, (node, coef), fqn=site.fqn)
        elif kind == "fill":  # masked_fill(scores, cond, value): value where cond
            term = insert_call(g, aten.where.Scalar, (node, coef, 0.0), fqn=site.fqn)
        elif kind == "keep":  # where(cond, scores, value): value where not cond
            term = insert_call(g, aten.where.Scalar, (node, 0.0, coef), fqn=site.fqn)
        else:  # boolean keep-mask combined with others
            term = insert_call(g, aten.where.Scalar, (node, 0.0, float("-inf")), fqn=site.fqn)
        if val(term) is not None and val(term).dtype != dtype:
            term = insert_call(g, aten.to.dtype, (term, dtype), fqn=site.fqn)
        total = term if total is None else insert_call(g, aten.add.Tensor, (total, term), fqn=site.fqn)
    return total


def replace_core(gm: GraphModule, site: AttentionSite, op, *args) -> list:
    """Insert ``op(q, k, v, mask, *args)`` before ``site.out`` (the site's mask built first); return the new nodes.

    The call keeps the site's module stack, so later steps find it under the same FQN."""
    g = gm.graph
    before = set(g.nodes)
    with g.inserting_before(site.out):
        mask = build_mask(gm, site)
        out = insert_call(g, op, (site.q, site.k, site.v, mask, *args), fqn=site.fqn)
    out.meta["nn_module_stack"] = site.out.meta.get("nn_module_stack", {})
    out.meta["val"] = site.out.meta.get("val", out.meta.get("val"))
    return [n for n in g.nodes if n not in before]


def apply(gm: GraphModule, site: AttentionSite, params) -> list:
    return replace_core(gm, site, torch.ops.attnforge.attention.default, site.scale, site.sdpa_causal,
                        site.dropout_p)


def describe(site: AttentionSite) -> dict:
    return {"heads": site.num_heads, "kv_heads": site.num_kv_heads, "head_dim": site.head_dim,
            "scale": site.scale, "causal": site.causal, "masked": bool(site.mask_parts),
            "projections": dict(site.proj), "rope": site.rope is not None}


PASS = register(RewritePass("fuse_attention", "attention", True, match, needs, apply, describe))
