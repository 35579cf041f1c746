"""Find feed-forward blocks: ``down(act(up(x)))`` and gated ``down(act(gate(x)) * up(x))``.

The activation is whatever elementwise subgraph sits between the projections. It is identified by
evaluating that subgraph on a probe tensor and comparing with the known activations, so every
spelling of, say, tanh-GELU (``aten.gelu(approximate="tanh")`` or GPT-2's hand-written formula)
is recognised once, and an unknown one is reported as a miss instead of being guessed.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch.fx import Graph, GraphModule, Node

from .graph import aten, common_prefix, is_op
from .projections import projection_at
from .sites import FFNSite, Miss, Projection

ELEMENTWISE = (
    aten.mul, aten.add, aten.sub, aten.div, aten.pow, aten.tanh, aten.sigmoid, aten.erf, aten.exp,
    aten.neg, aten.relu, aten.gelu, aten.silu, aten.rsub, aten.sqrt, aten.abs, aten.clamp,
    aten.clamp_min, aten.hardtanh, aten.leaky_relu, aten.elu, aten.softplus, aten.mish,
    aten.hardswish, aten.hardsigmoid, aten.relu6, aten.dropout, aten.to, aten._to_copy,
    aten.reciprocal, aten.log1p, aten.expm1, aten.square,
)
_PROBE = torch.linspace(-8.0, 8.0, 8001, dtype=torch.float32)


def match_ffn(graph: Graph, activations: dict[str, Callable]) -> tuple[list[FFNSite], list[Miss]]:
    sites, misses = [], _expert_misses(graph)
    for node in graph.nodes:
        down = projection_at(node)
        if down is None:
            continue
        res = _match_block(down, activations)
        if isinstance(res, FFNSite):
            sites.append(res)
        elif isinstance(res, Miss):
            misses.append(res)
    return sites, misses


_LAYOUT = (aten.transpose, aten.permute, aten.view, aten.reshape, aten.t, aten.to, aten._to_copy, aten.contiguous)


def _expert_misses(graph: Graph) -> list[Miss]:
    """Mixture-of-experts blocks: a stack of expert weights [E, ...] (a 3-D parameter) multiplied by the routed
    tokens. No fused op takes per-token expert routing, so each block is reported once, with what reads it."""
    misses, seen = [], set()
    for n in graph.nodes:
        v = n.meta.get("val") if n.op == "get_attr" else None
        if not isinstance(v, torch.Tensor) or v.dim() != 3 or not v.is_floating_point():
            continue
        user = next(iter(n.users), None)
        while is_op(user, *_LAYOUT) and len(user.users) == 1:
            user = next(iter(user.users))
        name = getattr(getattr(user, "target", None), "__name__", str(getattr(user, "target", "")))
        if user is None or not any(k in name for k in ("mm", "matmul", "einsum")):
            continue
        owner = n.target.rpartition(".")[0]
        if owner not in seen:
            seen.add(owner)
            misses.append(Miss(owner, "ffn", f"mixture-of-experts block: the expert weights {n.target} "
                                             f"{list(v.shape)} go into {name} (a grouped matmul over the routed "
                                             "tokens); no fused op takes expert routing, so the experts run as "
                                             "they are", n.name))
    return misses


def _skip_dropout(n):
    while is_op(n, aten.dropout) and not (n.args[2] if len(n.args) > 2 else False):
        n = n.args[0]
    return n


def _match_block(down: Projection, activations) -> FFNSite | Miss | None:
    h = _skip_dropout(down.x)
    region = _region(h)
    if region is None:
        return None
    nodes, leaves = region
    if not nodes:
        return None  # projection straight into projection: no activation, not an FFN
    fqn = common_prefix([down.fqn] + [p.fqn for p in leaves])
    if len(leaves) == 1:
        (up,) = leaves
        act = identify_activation(nodes, up.out, h, activations)
        if act is None:
            return Miss(fqn, "ffn", "activation between the projections is not a known one", h.name)
        gate = None
    elif len(leaves) == 2 and is_op(h, aten.mul):
        a, b = (_skip_dropout(x) for x in h.args[:2])
        by_out = {p.out: p for p in leaves}
        if a in by_out and b not in by_out:
            up, act_out = by_out[a], b
        elif b in by_out and a not in by_out:
            up, act_out = by_out[b], a
        else:
            return Miss(fqn, "ffn", "gated product without an activation on either side", h.name)
        (gate,) = [p for p in leaves if p is not up]
        act_nodes = _region(act_out)
        if act_nodes is None or len(act_nodes[1]) != 1 or act_nodes[1][0] != gate:
            return Miss(fqn, "ffn", "gate activation mixes both projections", h.name)
        act = identify_activation(act_nodes[0], gate.out, act_out, activations)
        if act is None:
            return Miss(fqn, "ffn", "gate activation is not a known one", h.name)
        if gate.x is not up.x:
            return Miss(fqn, "ffn", "gate and up projections read different inputs", h.name)
    else:
        return None
    projs = [up, down] + ([gate] if gate else [])
    if len({p.layout for p in projs}) != 1:
        return Miss(fqn, "ffn", "projections mix nn.Linear and Conv1D layouts", h.name)
    inner = set(nodes) | {p.out for p in leaves}
    for n in inner:
        if any(u not in inner and u is not down.x and u not in _projection_nodes(down) for u in n.users):
            return Miss(fqn, "ffn", "an intermediate activation is used outside the block", n.name)
    core = tuple(sorted(inner | set(_projection_nodes(down)), key=_order))
    return FFNSite(fqn=fqn, x=up.x, out=down.out, up=up, down=down, gate=gate, activation=act,
                   pattern="gated" if gate else "mlp", core_nodes=core)


def _order(n: Node):
    return list(n.graph.nodes).index(n)


def _projection_nodes(p: Projection) -> list[Node]:
    out = [p.out]
    if p.layout == "in_out":
        mm = p.out.args[0]
        out += [mm, mm.args[1]]
    return out


def _region(h: Node):
    """Elementwise nodes feeding ``h`` and the projections at their leaves, or None."""
    nodes: list[Node] = []
    leaves: list[Projection] = []
    seen: set = set()

    def visit(n) -> bool:
        if not isinstance(n, Node):
            return isinstance(n, (int, float, bool, str, torch.dtype, type(None)))
        if n in seen:
            return True
        seen.add(n)
        p = projection_at(n)
        if p is not None:
            leaves.append(p)
            return True
        if not is_op(n, *ELEMENTWISE):
            return False
        if not all(visit(a) for a in list(n.args) + list(n.kwargs.values())):
            return False
        nodes.append(n)
        return True

    if not visit(h):
        return None
    return nodes, leaves


def identify_activation(nodes: list[Node], src: Node, out: Node, activations: dict[str, Callable]) -> str | None:
    """Name of the activation that the elementwise ``nodes`` compute from ``src``, by probing."""
    g = Graph()
    env = {src: g.placeholder("x")}
    for n in sorted(nodes, key=_order):
        env[n] = g.node_copy(n, lambda a: env[a])
    g.output(env[out])
    try:
        got = GraphModule(torch.nn.Module(), g)(_PROBE)
    except Exception:
        return None
    for name, fn in activations.items():
        want = fn(_PROBE)
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            return name
    return None
