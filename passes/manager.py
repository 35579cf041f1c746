"""Apply one rewrite to chosen sites, and undo it for one site."""
from __future__ import annotations

import operator

import torch
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from .base import RewritePass


def apply_site(gm: GraphModule, rewrite: RewritePass, site, params, values: dict | None = None) -> list[Node]:
    """Insert the replacement for ``site`` and route ``site.out``'s users to it."""
    new = rewrite.apply(gm, site, params, values) if rewrite.uses_values else rewrite.apply(gm, site, params)
    site.out.replace_all_uses_with(new[-1], delete_user_cb=lambda user: user not in new)
    return new


def rollback_site(gm: GraphModule, site, new: list[Node]) -> None:
    """Undo ``apply_site``: users go back to ``site.out`` and the inserted nodes are erased."""
    new[-1].replace_all_uses_with(site.out)
    for n in reversed(new):
        gm.graph.erase_node(n)


def evaluate(gm: GraphModule, new: list[Node], env: dict):
    """Run the inserted nodes on recorded values of the original graph (a local check of one site)."""
    local = dict(env)
    for n in new:
        if n.op == "get_attr":
            local[n] = _fetch(gm, n.target)
        elif n.op == "call_function":
            args = map_arg(n.args, lambda a: local[a] if a in local else _fetch_node(gm, a))
            kwargs = map_arg(n.kwargs, lambda a: local[a] if a in local else _fetch_node(gm, a))
            local[n] = n.target(*args, **kwargs)
    return local[new[-1]]


def _fetch_node(gm, node: Node):
    if node.op == "get_attr":
        return _fetch(gm, node.target)
    raise KeyError(f"value of {node.name} was not recorded")


def _fetch(gm, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def dead_code(gm: GraphModule) -> None:
    """Erase pure aten calls, tuple reads and get_attrs nobody uses; keep modules and side-effecting ops."""
    g = gm.graph
    for node in reversed(list(g.nodes)):
        if node.users:
            continue
        if node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload):
            schema = node.target._schema
            if not schema.is_mutable and schema.returns and "assert" not in schema.name:
                g.erase_node(node)
        elif node.op == "get_attr" or (node.op == "call_function" and node.target is operator.getitem):
            g.erase_node(node)
    gm.recompile()
