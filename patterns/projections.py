"""Recognise dense projections (nn.Linear, GPT-2 Conv1D) and trace q/k/v back to theirs."""
from __future__ import annotations

import dataclasses
import operator

from torch.fx import Node

from .graph import aten, fqn_of, is_op, shape, static_int
from .sites import Projection, RopeInfo

# ops that move or relabel data without mixing features: a q/k/v tensor passes through them
# between its projection and the attention core
_LAYOUT_OPS = (
    aten.view, aten.reshape, aten._unsafe_view, aten.transpose, aten.permute, aten.contiguous,
    aten.clone, aten.unflatten, aten.select, aten.squeeze, aten.unsqueeze, aten.expand,
    aten.to, aten._to_copy, aten.slice, aten.split, aten.split_with_sizes, aten.chunk,
    aten.alias, aten.dropout,
)


def _is_param(node) -> bool:
    return isinstance(node, Node) and node.op == "get_attr"


def projection_at(node: Node) -> Projection | None:
    """The projection whose output is ``node``, if ``node`` is one."""
    if is_op(node, aten.linear) and _is_param(node.args[1]):
        bias = node.args[2] if len(node.args) > 2 else node.kwargs.get("bias")
        if bias is not None and not _is_param(bias):
            return None
        return Projection(fqn_of(node), node.args[0], node, node.args[1], bias, "out_in")
    # GPT-2 Conv1D: view(addmm(b, view(x, [-1, nx]), W), [..., nf])
    if is_op(node, aten.view, aten.reshape, aten._unsafe_view) and is_op(node.args[0], aten.addmm):
        mm = node.args[0]
        b, x2d, w = mm.args[:3]
        if (_is_param(w) and _is_param(b) and len(mm.users) == 1 and mm.kwargs.get("beta", 1) == 1
                and mm.kwargs.get("alpha", 1) == 1
                and is_op(x2d, aten.view, aten.reshape, aten._unsafe_view)):
            return Projection(fqn_of(mm), x2d.args[0], node, w, b, "in_out")
    return None


def rope_input(node: Node) -> RopeInfo | None:
    """x for ``node = x * cos + rotate_half(x) * sin`` (rotary embeddings), else None."""
    if not is_op(node, aten.add) or len(node.args) < 2:
        return None
    a, b = node.args[:2]
    if not (is_op(a, aten.mul) and is_op(b, aten.mul)):
        return None
    for m1, m2 in ((a, b), (b, a)):
        for x, cos in ((m1.args[0], m1.args[1]), (m1.args[1], m1.args[0])):
            if not isinstance(x, Node):
                continue
            for rot, sin in ((m2.args[0], m2.args[1]), (m2.args[1], m2.args[0])):
                if _depends_on(rot, x, depth=5):
                    return RopeInfo(x, x, cos, sin)
    return None


def _depends_on(node, target: Node, depth: int) -> bool:
    if node is target:
        return True
    if depth == 0 or not isinstance(node, Node) or node.op != "call_function":
        return False
    return any(_depends_on(a, target, depth - 1) for a in node.all_input_nodes)


def trace_projection(node: Node, max_depth: int = 24) -> tuple[Projection | None, RopeInfo | None]:
    """Walk from a q/k/v tensor back to the projection that produced it (and rotary embeddings on the way)."""
    rope = None
    for _ in range(max_depth):
        if not isinstance(node, Node):
            return None, rope
        p = projection_at(node)
        if p is not None:
            return p, rope
        if is_op(node, *_LAYOUT_OPS) or (is_op(node, aten.mul) and not isinstance(node.args[1], Node)):
            node = node.args[0]
            continue
        if node.op == "call_function" and node.target is operator.getitem:
            node = node.args[0]
            continue
        r = rope_input(node)
        if r is not None:
            rope = rope or r
            node = r.q_in
            continue
        return None, rope
    return None, rope


# --------------------------------------------------------------------------- per-head paths (gqa)


@dataclasses.dataclass(frozen=True)
class HeadPath:
    """How a q/k/v tensor ``end`` comes from its projection: layout ops from ``proj.out`` to ``pre``, then the
    ``steps`` (from ``pre`` towards ``end``): "scale" (a constant factor), "rope" (rotary embeddings),
    "partial" (the head dim cut into parts, each rotated or passed through, and concatenated back: partial or
    interleaved rotary), "norm" (a normalisation over the last dim: RMSNorm, LayerNorm, spelled as one op or
    decomposed) and "affine" (a product with, or a sum of, a tensor made of parameters only: a norm's weight or
    bias). ``params``: the get_attr nodes those steps read (norm weights and biases)."""

    proj: Projection
    pre: Node
    end: Node
    steps: tuple
    params: tuple


def trace_heads(end: Node, max_depth: int = 48) -> HeadPath | None:
    """The projection and the steps from it to ``end`` (see ``HeadPath``), or None when the path from a dense
    projection to ``end`` is made of anything else. ``pre`` is the input of the step nearest to the projection
    (``end`` when there are only layout ops), so ``proj.out`` -> ``pre`` is layout ops alone."""
    node, pre, steps, params = end, end, [], []
    for _ in range(max_depth):
        if not isinstance(node, Node):
            return None
        p = projection_at(node)
        if p is not None:
            return HeadPath(p, pre, end, tuple(reversed(steps)), tuple(dict.fromkeys(params)))
        if is_op(node, *_LAYOUT_OPS, *_MORE_LAYOUT) or (node.op == "call_function" and node.target is operator.getitem):
            node = node.args[0]
            continue
        step = _step(node)
        if step is None:
            return None
        kind, node, ps = step
        pre = node
        steps.append(kind)
        params += ps
    return None


# layout ops on a head path besides _LAYOUT_OPS: type_as(x, other) casts x (Gemma 3's norm casts back to its
# input's dtype); unbind splits a fused q/k/v (ModernBERT: [..., 3, H, D] unbound into q, k, v)
_MORE_LAYOUT = (aten.type_as, aten.unbind)
_ELEMENTWISE = (aten.pow, aten.mul, aten.add, aten.sub, aten.div, aten.rsqrt, aten.sqrt, aten.reciprocal, aten.neg,
                aten.abs, aten.clamp_min, aten.clamp, aten.to, aten._to_copy, aten.type_as, aten.unsqueeze,
                aten.alias, aten.clone, aten.contiguous)
_REDUCTIONS = (aten.mean, aten.sum, aten.var, aten.std, aten.amax)


def _step(node: Node):
    """(kind, the step's input on the path, parameters it reads) for one non-layout step, or None."""
    r = rope_input(node)
    if r is not None:
        return "rope", r.q_in, []
    if is_op(node, aten.mul) and len(node.args) > 1 and not isinstance(node.args[1], Node):
        return "scale", node.args[0], []
    if is_op(node, aten.cat):
        common = _common_source(node)
        return ("partial", common, []) if common is not None else None
    if is_op(node, aten.layer_norm, aten.rms_norm, aten.native_layer_norm) and _last_dim_only(node):
        ps = [a for a in node.args[2:4] if isinstance(a, Node)]
        leaves = [leaf for a in ps for leaf in (_param_leaves(a) or [None])]
        return ("norm", node.args[0], leaves) if None not in leaves else None
    if is_op(node, aten.mul, aten.div, aten.sub, aten.add) and len(node.args) >= 2 and \
            all(isinstance(a, Node) for a in node.args[:2]):
        a, b = node.args[:2]
        commutes = is_op(node, aten.mul, aten.add)
        for x, other in ((a, b), (b, a)) if commutes else ((a, b),):
            if not is_op(node, aten.add) and _row_stat(other, x):  # x·s, x/s, x − s: s a statistic of x's rows
                return "norm", x, []
            leaves = _param_leaves(other)
            if leaves:
                return "affine", x, leaves
    return None


def _last_dim_only(node: Node) -> bool:
    """A layer_norm / rms_norm over the last dim alone."""
    s, dims = shape(node.args[0]), node.args[1]
    return s is not None and isinstance(dims, (list, tuple)) and len(dims) == 1 and \
        static_int(dims[0]) is not None and static_int(dims[0]) == static_int(s[-1])


def _common_source(cat: Node) -> Node | None:
    """For ``cat([f_1(x), f_2(x), ...], dim=-1)`` whose parts come from one tensor x through slices, layout ops,
    constant factors and rotary embeddings (partial rotary: the rotated part and the rest of the head dim), x."""
    parts, dim = cat.args[0], cat.args[1] if len(cat.args) > 1 else cat.kwargs.get("dim", 0)
    s = shape(cat)
    if s is None or not isinstance(parts, (list, tuple)) or len(parts) < 2 or dim not in (-1, len(s) - 1):
        return None
    chains = []
    for part in parts:
        chain, n = [], part
        for _ in range(16):
            if not isinstance(n, Node):
                break
            chain.append(n)
            r = rope_input(n)
            if r is not None:
                n = r.q_in
            elif is_op(n, *_LAYOUT_OPS) or (is_op(n, aten.mul) and not isinstance(n.args[1], Node)) or \
                    (n.op == "call_function" and n.target is operator.getitem):
                n = n.args[0]
            else:
                break
        chains.append(chain)
    others = [set(c) for c in chains[1:]]
    return next((n for n in chains[0] if all(n in o for o in others)), None)


def _row_stat(s, x: Node, depth: int = 16) -> bool:
    """True when ``s`` ([..., 1]) is a statistic of the rows of ``x`` (or of what ``x`` is a layout view or a
    centring of): made of reductions over the last dim and elementwise ops, e.g. rsqrt(mean(x², -1) + ε)."""
    ss = shape(s) if isinstance(s, Node) else None
    if ss is None or not ss or static_int(ss[-1]) != 1:
        return False
    sources, n = {x}, x  # x and what it is a view or a centring (x − mean) of
    for _ in range(6):
        if is_op(n, *_LAYOUT_OPS) or (is_op(n, aten.sub) and isinstance(n.args[1], Node)):
            n = n.args[0]
            sources.add(n)
        else:
            break
    reduced = reached = False
    todo, seen = [(s, 0)], set()
    while todo:
        n, d = todo.pop()
        if n in sources:
            reached = True
            continue
        if n in seen:
            continue
        seen.add(n)
        if d > depth or not is_op(n, *_ELEMENTWISE, *_REDUCTIONS):
            return False
        if is_op(n, *_REDUCTIONS):
            dims, src = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim"), shape(n.args[0])
            dims = [dims] if isinstance(dims, int) else dims
            if src is None or not isinstance(dims, (list, tuple)) or [x_ % len(src) for x_ in dims] != [len(src) - 1]:
                return False
            reduced = True
        todo += [(a, d + 1) for a in n.all_input_nodes]
    return reduced and reached


def _param_leaves(n, depth: int = 8) -> list | None:
    """The get_attr nodes ``n`` is made of when it is built from parameters and constants only (a norm weight,
    Gemma's 1 + w, a cast of either), else None."""
    if not isinstance(n, Node):
        return None
    if n.op == "get_attr":
        return [n]
    if depth == 0 or not is_op(n, *_ELEMENTWISE, *_LAYOUT_OPS):
        return None
    out = []
    for a in n.all_input_nodes:
        leaves = _param_leaves(a, depth - 1)
        if leaves is None:
            return None
        out += leaves
    return out or None
