"""Recognise dense projections (nn.Linear, GPT-2 Conv1D) and trace q/k/v back to theirs."""
from __future__ import annotations

import operator

from torch.fx import Node

from .graph import aten, fqn_of, is_op
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
