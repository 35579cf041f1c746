"""Find feed-forward blocks: ``down(act(up(x)))`` and gated ``down(act(gate(x)) * up(x))``.

The activation is whatever elementwise subgraph sits between the projections. It is identified by
evaluating that subgraph on a probe tensor and comparing with the known activations, so every
spelling of, say, tanh-GELU (``aten.gelu(approximate="tanh")`` or GPT-2's hand-written formula)
is recognised once, and an unknown one is reported as a miss instead of being guessed.

The gate and up projections may be one projection whose output features are cut in two (ModernBERT's
``input, gate = self.Wi(x).chunk(2, dim=-1)``, Phi-3's ``gate_up_proj``): ``chunk``, ``split``,
``split_with_sizes``, ``tensor_split``, ``narrow``, slicing (``h[..., :n]``) or ``unflatten`` + ``unbind``/``select``
along the feature dim. Each piece is a ``FeatureSlice`` of that projection: rows [start, stop) of its weight and
bias, which is what ``fuse_ffn`` hands the fused op.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Callable

import torch
from torch.fx import Graph, GraphModule, Node

from .graph import aten, common_prefix, is_op, shape
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


@dataclass(frozen=True)
class FeatureSlice(Projection):
    """Output features [start, stop) of a projection: one piece of a gate+up projection cut along its features.

    ``out`` stays the whole projection's output (what the layer computes, so the dense-projection listing sees
    one layer); ``part`` is the node holding the piece and ``chain`` the nodes from ``out`` to it (the split or
    slice, its getitem). ``weight``/``bias`` are the whole layer's: the piece's are their rows [start, stop)
    (columns for the GPT-2 Conv1D layout)."""

    start: int = 0
    stop: int = 0
    part: Node | None = None
    chain: tuple = ()


def tap(p: Projection) -> Node:
    """The node a block reads for projection ``p``: its output, or the piece of it for a ``FeatureSlice``."""
    return p.part if isinstance(p, FeatureSlice) else p.out


def _features(p: Projection) -> int | None:
    w = shape(p.weight)
    if not w or len(w) != 2 or not isinstance(w[0], int) or not isinstance(w[1], int):
        return None
    return w[0] if p.layout == "out_in" else w[1]


def _arg(node: Node, i: int, name: str, default=None):
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


def _last_dim(node: Node, dim, extra: int = 0) -> bool:
    """``dim`` is the last dim of ``node``'s output (``extra`` dims added after it, e.g. by unflatten)."""
    nd = len(shape(node) or ())
    return isinstance(dim, int) and nd > 0 and dim % (nd + extra) == nd - 1


def _pieces(split: Node, width: int) -> list[tuple[int, int]] | None:
    """[(start, stop)] of each output of a split-like op over ``width`` features, in order."""
    if is_op(split, aten.chunk):
        n = split.args[1]
        if not isinstance(n, int) or n < 1:
            return None
        c = -(-width // n)
        return [(i, min(width, i + c)) for i in range(0, width, c)]
    if is_op(split, aten.split) and isinstance(split.args[1], int):
        c = split.args[1]
        return [(i, min(width, i + c)) for i in range(0, width, c)] if c > 0 else None
    if is_op(split, aten.split, aten.split_with_sizes) and isinstance(split.args[1], (list, tuple)):
        sizes = split.args[1]
        if not all(isinstance(x, int) for x in sizes) or sum(sizes) != width:
            return None
        ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
        return list(zip([0] + ends[:-1], ends))
    if split.target is getattr(aten.tensor_split, "sections", None) and isinstance(split.args[1], int):
        n = split.args[1]
        sizes = [width // n + (i < width % n) for i in range(n)]
        ends = [sum(sizes[:i + 1]) for i in range(n)]
        return list(zip([0] + ends[:-1], ends))
    if split.target is getattr(aten.tensor_split, "indices", None) and all(isinstance(x, int) for x in split.args[1]):
        bounds = [0] + [min(max(x if x >= 0 else x + width, 0), width) for x in split.args[1]] + [width]
        return list(zip(bounds[:-1], [max(a, b) for a, b in zip(bounds[:-1], bounds[1:])]))
    return None


def _heads_of(node: Node) -> tuple[Node, list] | None:
    """(projection output, [k, h]) for ``unflatten(p, -1, [k, h])`` (one of k, h may be -1), else None."""
    if not is_op(node, aten.unflatten) or not _last_dim(node.args[0], node.args[1]):
        return None
    sizes = list(node.args[2])
    if len(sizes) != 2 or not all(isinstance(x, int) and (x > 0 or x == -1) for x in sizes) or sizes.count(-1) > 1:
        return None
    return node.args[0], sizes


def feature_slice(node: Node) -> FeatureSlice | None:
    """``node`` as output features [start, stop) of a projection (a piece of ``Wi(x).chunk(2, -1)`` and its
    other spellings), else None."""
    if not isinstance(node, Node) or node.op != "call_function":
        return None
    src, bounds, chain = None, None, (node,)
    if is_op(node, aten.slice):
        src, dim = node.args[0], _arg(node, 1, "dim", 0)
        start, end, step = _arg(node, 2, "start"), _arg(node, 3, "end"), _arg(node, 4, "step", 1)
        if step == 1 and _last_dim(src, dim) and isinstance(start, (int, type(None))) \
                and isinstance(end, (int, type(None))):
            bounds = (start or 0, end)
    elif is_op(node, aten.narrow):
        src, dim, start, length = node.args[:4]
        if _last_dim(src, dim) and isinstance(start, int) and isinstance(length, int) and length > 0:
            bounds = ("narrow", start, length)
    elif is_op(node, aten.select) and _heads_of(node.args[0]) and _last_dim(node.args[0].args[0], node.args[1], 1):
        src, sizes = _heads_of(node.args[0])
        if isinstance(node.args[2], int):
            bounds, chain = ("pieces", sizes, node.args[2]), (node.args[0], node)
    elif node.target is operator.getitem and isinstance(node.args[1], int) and isinstance(node.args[0], Node):
        split, i = node.args
        if is_op(split, aten.unbind) and _heads_of(split.args[0]) \
                and _last_dim(split.args[0].args[0], _arg(split, 1, "dim", 0), 1):
            src, sizes = _heads_of(split.args[0])
            bounds, chain = ("pieces", sizes, i), (split.args[0], split, node)
        elif is_op(split, aten.chunk, aten.split, aten.split_with_sizes, aten.tensor_split) \
                and _last_dim(split.args[0], _arg(split, 2, "dim", 0)):
            src, chain = split.args[0], (split, node)
            p = projection_at(src)
            pieces = _pieces(split, _features(p)) if p is not None and _features(p) else None
            if pieces is not None and 0 <= i < len(pieces):
                bounds = pieces[i]
    if bounds is None:
        return None
    p = projection_at(src)
    width = _features(p) if p is not None else None
    if width is None:
        return None
    if bounds[0] == "narrow":  # narrow(dim, start, length): start may count from the end
        start = bounds[1] + width if bounds[1] < 0 else bounds[1]
        bounds = (start, start + bounds[2])
    elif bounds[0] == "pieces":  # piece i of unflatten(-1, [k, h]): k pieces of h features, k·h of them in all
        (k, h), i = bounds[1], bounds[2]
        k, h = (width // h if k == -1 else k), (width // k if h == -1 else h)
        if k * h != width or not -k <= i < k:
            return None
        bounds = ((i % k) * h, (i % k + 1) * h)
    start, stop = bounds
    start = start + width if start < 0 else start
    stop = width if stop is None else stop + width if stop < 0 else min(stop, width)
    if not 0 <= start < stop <= width:
        return None
    return FeatureSlice(p.fqn, p.x, p.out, p.weight, p.bias, p.layout, start, stop, node, chain)


def _leaf(n: Node) -> Projection | None:
    return projection_at(n) or feature_slice(n)


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
        act = identify_activation(nodes, tap(up), h, activations)
        if act is None:
            return Miss(fqn, "ffn", "activation between the projections is not a known one", h.name)
        gate = None
    elif len(leaves) == 2 and is_op(h, aten.mul):
        a, b = (_skip_dropout(x) for x in h.args[:2])
        by_out = {tap(p): p for p in leaves}
        if a in by_out and b not in by_out:
            up, act_out = by_out[a], b
        elif b in by_out and a not in by_out:
            up, act_out = by_out[b], a
        else:
            return Miss(fqn, "ffn", "gated product without an activation on either side", h.name)
        (gate,) = [p for p in leaves if p is not up]
        act_nodes = _region(act_out)
        if act_nodes is None or len(act_nodes[1]) != 1 or tap(act_nodes[1][0]) is not tap(gate):
            return Miss(fqn, "ffn", "gate activation mixes both projections", h.name)
        act = identify_activation(act_nodes[0], tap(gate), act_out, activations)
        if act is None:
            return Miss(fqn, "ffn", "gate activation is not a known one", h.name)
        if gate.x is not up.x:
            return Miss(fqn, "ffn", "gate and up projections read different inputs", h.name)
    else:
        return None
    projs = [up, down] + ([gate] if gate else [])
    if len({p.layout for p in projs}) != 1:
        return Miss(fqn, "ffn", "projections mix nn.Linear and Conv1D layouts", h.name)
    inner = set(nodes) | {tap(p) for p in leaves}
    cut = {n for p in leaves if isinstance(p, FeatureSlice) for n in (p.out, *p.chain)}
    for n in cut - inner:
        if any(u not in inner | cut for u in n.users):
            cutp = next(p for p in leaves if isinstance(p, FeatureSlice) and n in (p.out, *p.chain))
            return Miss(fqn, "ffn", f"the output of {cutp.fqn or '<root>'} is cut into gate/up pieces, and it or "
                                    f"another piece of it ({n.name}) is also read outside the block", n.name)
    inner |= cut
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
        p = _leaf(n)
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
