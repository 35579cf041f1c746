"""``fuse_ffn``: each FFN block -> one ``attnforge::ffn`` call (exact)."""
from __future__ import annotations

from torch.fx import GraphModule

from attnforge.patterns import FFNSite, match_ffn
from attnforge.runtime.ffn import ACTIVATIONS, VARIANT

from .base import RewritePass, register


def match(gm: GraphModule):
    return match_ffn(gm.graph, ACTIVATIONS)


def needs(site: FFNSite) -> list:
    return [site.x, site.out]


def apply(edit, site: FFNSite, params):
    gate = site.gate
    out = edit.call(VARIANT.op, (site.x, site.up.weight, site.up.bias, site.down.weight, site.down.bias,
                                 gate.weight if gate else None, gate.bias if gate else None, site.activation,
                                 site.up.layout))
    out.meta["val"] = site.out.meta.get("val", out.meta.get("val"))
    return out


def describe(site: FFNSite, params) -> dict:
    return {"activation": site.activation, "gated": site.gate is not None, "layout": site.up.layout,
            "up": site.up.fqn, "down": site.down.fqn, "gate": site.gate.fqn if site.gate else None}


PASS = register(RewritePass("fuse_ffn", "ffn", True, match, apply, needs, describe))
