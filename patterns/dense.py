"""Dense projection sites: the linear layers of FFN blocks (up/gate/down) and of attention (q/k/v), one site each.

The FFN and attention matchers find the blocks; this module lists their projections with the role each
plays, for rewrites that replace single linear layers (``memoryformer``). A projection feeding several of
q/k/v (GPT-2's ``c_attn``, ``nn.MultiheadAttention``'s ``in_proj``) is one site holding all its roles.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch.fx import Graph, Node

from .attention import match_attention
from .ffn import match_ffn
from .projections import trace_projection
from .sites import Miss, Projection


@dataclass(frozen=True)
class LinearSite:
    fqn: str  # the projection's module ("model.layers.0.mlp.up_proj")
    x: Node
    out: Node
    proj: Projection
    roles: tuple[str, ...]  # of "up", "gate", "down", "q", "k", "v"
    pattern: str = ""  # the roles joined by "+"


def match_linears(graph: Graph, activations: dict[str, Callable]) -> tuple[list[LinearSite], list[Miss]]:
    """Every FFN and q/k/v projection found by the block matchers, in graph order; the FFN matcher's misses."""
    found: dict[Node, tuple[Projection, list[str]]] = {}

    def add(p: Projection | None, role: str):
        if p is not None:
            roles = found.setdefault(p.out, (p, []))[1]
            if role not in roles:
                roles.append(role)

    ffn, misses = match_ffn(graph, activations)
    for s in ffn:
        add(s.up, "up")
        add(s.gate, "gate")
        add(s.down, "down")
    for s in match_attention(graph)[0]:
        for role in ("q", "k", "v"):
            add(trace_projection(getattr(s, role))[0], role)
    order = {n: i for i, n in enumerate(graph.nodes)}
    sites = [LinearSite(p.fqn, p.x, p.out, p, tuple(roles), "+".join(roles))
             for p, roles in sorted(found.values(), key=lambda pr: order[pr[0].out])]
    return sites, misses
