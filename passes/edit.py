"""A site's rewrite as a transaction, and the graph-edit toolkit every pass uses.

``SiteEdit`` records what a pass does to one site: the nodes it inserts and the module state it changes
(parameters, buffers and submodules added or replaced, through ``store``/``add_tensor``/``add_module``; a snapshot
of every module's tables is taken first, so any change made through ``nn.Module``'s own methods is covered too).
``commit(out)`` routes the users of ``site.out`` to ``out``; ``rollback()`` undoes everything: the graph is as it
was and ``state_dict()`` has the same keys and the same tensors as before the site. Passes never write into an
existing tensor (``store`` puts a new one in place), which is what makes the rollback exact.
"""
from __future__ import annotations

import contextlib
from typing import Any, Optional

import torch
from torch import nn
from torch.fx import GraphModule, Node
from torch.fx.node import map_arg

from attnforge.patterns.graph import aten, insert_call, val

from .base import SkipSite


class SiteEdit:
    def __init__(self, gm: GraphModule, site, values: Optional[dict] = None):
        self.gm, self.graph, self.site = gm, gm.graph, site
        self.values = values if values is not None else {}
        self.info: dict = {}  # what the pass measured, for the report
        self._before = set(gm.graph.nodes)
        self._state = [(m, dict(m._parameters), dict(m._buffers), dict(m._modules), set(m._non_persistent_buffers_set))
                       for m in gm.modules()]
        self._out: Optional[Node] = None
        self.open = True

    # ------------------------------------------------------------------ nodes

    @property
    def fqn(self) -> str:
        return self.site.fqn

    def call(self, target, args: tuple, kwargs: Optional[dict] = None, *, fqn: Optional[str] = None) -> Node:
        """Insert ``target(*args, **kwargs)`` at the graph's insertion point, with its fake value and the module FQN
        (default: the site's)."""
        return insert_call(self.graph, target, tuple(args), kwargs, fqn=self.fqn if fqn is None else fqn)

    def get_attr(self, target: str, like: Optional[Node] = None) -> Node:
        """A get_attr node for ``target`` with a fake value in the fake mode of ``like`` (default: the site's out)."""
        node = self.graph.get_attr(target)
        t = self.fetch(target)
        mode = torch._guards.detect_fake_mode([val(like if like is not None else self.site.out)])
        node.meta["val"] = mode.from_tensor(t, static_shapes=True) if mode else torch.empty_like(t, device="meta")
        return node

    def like_site(self, node: Node) -> Node:
        """Give ``node`` the site output's module stack and example value (later steps find it under the same FQN)."""
        node.meta["nn_module_stack"] = self.site.out.meta.get("nn_module_stack", {})
        if self.site.out.meta.get("val") is not None:
            node.meta["val"] = self.site.out.meta["val"]
        return node

    @property
    def new_nodes(self) -> list[Node]:
        """The nodes inserted so far, in graph order."""
        return [n for n in self.graph.nodes if n not in self._before]

    def evaluate(self, nodes: Optional[list[Node]] = None):
        """Run the inserted ``nodes`` (default: all, the last giving the result) on the recorded example values."""
        return run_nodes(self.gm, nodes if nodes is not None else self.new_nodes, self.values)

    # ------------------------------------------------------------------ module state

    def fetch(self, target: str):
        """The parameter, buffer or submodule at a dotted ``target``."""
        owner, _, leaf = target.rpartition(".")
        return getattr(self.gm.get_submodule(owner) if owner else self.gm, leaf)

    def store(self, target: str, tensor: torch.Tensor) -> None:
        """Put ``tensor`` at ``target`` in place of the parameter (kept a Parameter) or buffer there; never writes
        into the old tensor."""
        owner, _, leaf = target.rpartition(".")
        mod, old = self.gm.get_submodule(owner) if owner else self.gm, self.fetch(target)
        if isinstance(old, nn.Parameter) and not isinstance(tensor, nn.Parameter):
            tensor = nn.Parameter(tensor, old.requires_grad)
        setattr(mod, leaf, tensor)

    def owner(self, fqn: str) -> nn.Module:
        """The submodule ``fqn`` when it exists, else the graph module itself."""
        try:
            mod = self.gm.get_submodule(fqn) if fqn else self.gm
        except AttributeError:
            return self.gm
        return mod if isinstance(mod, nn.Module) else self.gm

    def fresh_name(self, owner: nn.Module, base: str) -> str:
        name = base
        while hasattr(owner, name):
            name += "_"
        return name

    def add_tensor(self, owner_fqn: str, base: str, tensor: torch.Tensor, *, trainable: bool = False,
                   parameter: Optional[bool] = None, persistent: bool = True) -> str:
        """Register ``tensor`` under a fresh name on the module ``owner_fqn`` (a Parameter when ``parameter``,
        by default when ``trainable``; else a buffer) and return its dotted target."""
        owner = self.owner(owner_fqn)
        name = self.fresh_name(owner, base)
        if parameter if parameter is not None else trainable:
            owner.register_parameter(name, nn.Parameter(tensor, requires_grad=trainable))
        else:
            owner.register_buffer(name, tensor, persistent=persistent)
        return self._target(owner, name)

    def add_module(self, owner_fqn: str, base: str, module: nn.Module) -> str:
        """Register ``module`` under a fresh name on the module ``owner_fqn``; return its dotted target."""
        owner = self.owner(owner_fqn)
        name = self.fresh_name(owner, base)
        owner.add_module(name, module)
        return self._target(owner, name)

    def _target(self, owner: nn.Module, name: str) -> str:
        if owner is self.gm:
            return name
        prefix = next(f for f, m in self.gm.named_modules() if m is owner)
        return f"{prefix}.{name}"

    # ------------------------------------------------------------------ attention cores

    def build_mask(self) -> Optional[Node]:
        """The single additive (or boolean keep-) mask equal to the site's mask parts, as graph nodes."""
        parts = self.site.mask_parts
        if not parts:
            return None
        if len(parts) == 1 and parts[0][2] in ("bool", "add") and parts[0][1] == 1.0 and not self.site.folded:
            return parts[0][0]
        dtype = val(self.site.q).dtype if val(self.site.q) is not None else torch.float32
        total = None
        for node, coef, kind in parts:
            if node in self.site.folded:  # [B·H, N, M] (ALiBi of Bloom) -> [B, H, N, M], as the op's scores
                node = self.call(aten.unflatten.int, (node, 0, [-1, self.site.num_heads]))
            if kind == "add":
                term = node if coef == 1.0 else self.call(aten.mul.Tensor, (node, coef))
            elif kind == "fill":  # masked_fill(scores, cond, value): value where cond
                term = self.call(aten.where.Scalar, (node, coef, 0.0))
            elif kind == "keep":  # where(cond, scores, value): value where not cond
                term = self.call(aten.where.Scalar, (node, 0.0, coef))
            else:  # boolean keep-mask combined with others
                term = self.call(aten.where.Scalar, (node, 0.0, float("-inf")))
            if val(term) is not None and val(term).dtype != dtype:
                term = self.call(aten.to.dtype, (term, dtype))
            total = term if total is None else self.call(aten.add.Tensor, (total, term))
        return total

    def replace_core(self, op, *args, q: Optional[Node] = None, k: Optional[Node] = None,
                     v: Optional[Node] = None) -> Node:
        """Insert ``op(q, k, v, mask, *args)`` (the site's q/k/v unless given; the site's mask built first) and
        return it, carrying the site's module stack. A soft-capped site takes only an op with a ``softcap``
        argument (the caller passes it); any other variant would drop the cap, so the site is skipped."""
        s = self.site
        if s.softcap and "softcap" not in [a.name for a in op._schema.arguments]:
            raise SkipSite(f"soft-capped scores (c·tanh(s / c), c = {s.softcap:g}): {op._schema.name} has no "
                           "softcap")
        mask = self.build_mask()
        return self.like_site(self.call(op, (q or s.q, k or s.k, v or s.v, mask, *args)))

    # ------------------------------------------------------------------ the transaction

    def commit(self, out: Node) -> None:
        """Route the users of ``site.out`` (other than the inserted nodes) to ``out``."""
        mine = set(self.new_nodes)
        self.site.out.replace_all_uses_with(out, delete_user_cb=lambda user: user not in mine)
        self._out = out

    def rollback(self) -> None:
        """Undo the site: users back to ``site.out``, inserted nodes erased, every module's parameters, buffers and
        submodules as they were."""
        if not self.open:
            return
        if self._out is not None:
            self._out.replace_all_uses_with(self.site.out)
        for n in reversed(self.new_nodes):
            self.graph.erase_node(n)
        for mod, params, buffers, modules, non_persistent in self._state:
            for table, saved in ((mod._parameters, params), (mod._buffers, buffers), (mod._modules, modules)):
                table.clear()
                table.update(saved)
            mod._non_persistent_buffers_set.clear()
            mod._non_persistent_buffers_set.update(non_persistent)
        self.open = False

    @contextlib.contextmanager
    def inserting_before(self, node: Node):
        with self.graph.inserting_before(node):
            yield


def run_nodes(gm: GraphModule, nodes: list[Node], env: dict) -> Any:
    """Run inserted ``nodes`` on recorded values of the original graph (``env``); the last node's value."""
    local = dict(env)

    def value(a):
        if a in local:
            return local[a]
        if a.op == "get_attr":
            return _fetch(gm, a.target)
        raise KeyError(f"value of {a.name} was not recorded")

    for n in nodes:
        if n.op == "get_attr":
            local[n] = _fetch(gm, n.target)
        elif n.op == "call_function":
            local[n] = n.target(*map_arg(n.args, value), **map_arg(n.kwargs, value))
    return local[nodes[-1]]


def _fetch(gm: GraphModule, target: str):
    obj = gm
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj
