"""``fuse_ffn``: each FFN block -> one ``attnforge::ffn`` call (exact)."""
from __future__ import annotations

import torch
from torch.fx import GraphModule

from attnforge.patterns import FFNSite, match_ffn
from attnforge.patterns.graph import insert_call
from attnforge.runtime import ACTIVATIONS

from .base import RewritePass, register


def match(gm: GraphModule):
    return match_ffn(gm.graph, ACTIVATIONS)


def needs(site: FFNSite) -> list:
    return [site.x, site.out]


def apply(gm: GraphModule, site: FFNSite, params) -> list:
    g = gm.graph
    before = set(g.nodes)
    gate = site.gate
    with g.inserting_before(site.out):
        out = insert_call(g, torch.ops.attnforge.ffn.default,
                          (site.x, site.up.weight, site.up.bias, site.down.weight, site.down.bias,
                           gate.weight if gate else None, gate.bias if gate else None,
                           site.activation, site.up.layout), fqn=site.fqn)
    out.meta["val"] = site.out.meta.get("val", out.meta.get("val"))
    return [n for n in g.nodes if n not in before]


def describe(site: FFNSite) -> dict:
    return {"activation": site.activation, "gated": site.gate is not None, "layout": site.up.layout,
            "up": site.up.fqn, "down": site.down.fqn, "gate": site.gate.fqn if site.gate else None}


PASS = register(RewritePass("fuse_ffn", "ffn", True, match, needs, apply, describe))
