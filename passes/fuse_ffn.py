"""``fuse_ffn``: each FFN block -> one ``attnforge::ffn`` call (exact).

A gate or up projection that is a piece of one projection's output features (``Wi(x).chunk(2, dim=-1)``,
patterns/ffn.py ``FeatureSlice``) reads the rows [start, stop) of that layer's weight and bias: the op gets
``aten.slice`` views of the parameters (no copy, the state_dict keeps the layer's own names)."""
from __future__ import annotations

from torch.fx import GraphModule

from attnforge.patterns import FFNSite, match_ffn
from attnforge.patterns.ffn import FeatureSlice
from attnforge.patterns.graph import aten
from attnforge.runtime.ffn import ACTIVATIONS, VARIANT

from .base import RewritePass, register


def match(gm: GraphModule):
    return match_ffn(gm.graph, ACTIVATIONS)


def needs(site: FFNSite) -> list:
    return [site.x, site.out]


def _weights(edit, p):
    """(weight, bias) nodes of projection ``p``: the layer's own, or the rows of its piece for a FeatureSlice."""
    if p is None:
        return None, None
    if not isinstance(p, FeatureSlice):
        return p.weight, p.bias
    w = edit.call(aten.slice.Tensor, (p.weight, 0 if p.layout == "out_in" else 1, p.start, p.stop))
    b = edit.call(aten.slice.Tensor, (p.bias, 0, p.start, p.stop)) if p.bias is not None else None
    return w, b


def apply(edit, site: FFNSite, params):
    (w_up, b_up), (w_gate, b_gate) = _weights(edit, site.up), _weights(edit, site.gate)
    out = edit.call(VARIANT.op, (site.x, w_up, b_up, site.down.weight, site.down.bias, w_gate, b_gate,
                                 site.activation, site.up.layout))
    out.meta["val"] = site.out.meta.get("val", out.meta.get("val"))
    return out


def _name(p) -> str | None:
    if p is None:
        return None
    return f"{p.fqn}[{p.start}:{p.stop}]" if isinstance(p, FeatureSlice) else p.fqn


def describe(site: FFNSite, params) -> dict:
    return {"activation": site.activation, "gated": site.gate is not None, "layout": site.up.layout,
            "up": _name(site.up), "down": site.down.fqn, "gate": _name(site.gate)}


PASS = register(RewritePass("fuse_ffn", "ffn", True, match, apply, needs, describe))
