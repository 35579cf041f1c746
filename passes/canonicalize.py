"""One spelling per op, so each pattern is written once.

* ``operator.*``, ``torch.*``/``F.*`` functions, tensor methods and leaf modules (symbolic_trace
  graphs) become aten overloads;
* ``x / c`` for a constant c becomes ``x * (1/c)``; ``c * x`` becomes ``x * c``; a constant written as a 0-dim
  tensor (``torch.full([], c)``, or ``torch.sqrt(torch.tensor(d) * f)``: constants and scalar arithmetic only)
  counts as one;
* ``where(cond, x, c)`` with c such a constant becomes ``where(cond, x, float(c))`` (GPT-Neo's mask fill);
* ``bmm`` becomes ``matmul``; ``baddbmm(M, a, b, beta, alpha)`` becomes ``alpha·matmul(a, b) + beta·M``;
* export's ``_assert_tensor_metadata`` checks are dropped (they would pin the values they read);
* ``permute`` that only swaps the last two dims becomes ``transpose``; transpose dims are
  written non-negative and in increasing order; ``_softmax`` becomes ``softmax``;
* in-place ``add_``/``sub_``/``mul_``/``div_``/``masked_fill_`` on a fresh (unaliased) tensor become their
  out-of-place ops, later reads of the tensor reading the new value (``scores /= math.sqrt(d)``);
* ``x @ W.T`` (+ ``b``) for 2-D parameter W (and 1-D parameter b) becomes ``linear(x, W, b)`` (Falcon's spelling).
"""
from __future__ import annotations

import math
import operator
from collections import Counter

import torch
import torch.nn.functional as F
from torch import nn
from torch.fx import GraphModule, Node

from attnforge.patterns.graph import aten, is_op, scalar, shape, val

from .manager import dead_code

# (function or method name) -> aten overload, for graphs from torch.fx.symbolic_trace
_BINARY = {
    operator.add: aten.add.Tensor, torch.add: aten.add.Tensor, "add": aten.add.Tensor,
    operator.sub: aten.sub.Tensor, torch.sub: aten.sub.Tensor, "sub": aten.sub.Tensor,
    operator.mul: aten.mul.Tensor, torch.mul: aten.mul.Tensor, "mul": aten.mul.Tensor,
    operator.truediv: aten.div.Tensor, torch.div: aten.div.Tensor, "div": aten.div.Tensor,
    operator.matmul: aten.matmul.default, torch.matmul: aten.matmul.default, "matmul": aten.matmul.default,
    torch.bmm: aten.matmul.default, "bmm": aten.matmul.default,
}
_UNARY = {
    F.relu: aten.relu.default, torch.relu: aten.relu.default, "relu": aten.relu.default,
    F.silu: aten.silu.default, torch.tanh: aten.tanh.default, "tanh": aten.tanh.default,
    torch.sigmoid: aten.sigmoid.default, "sigmoid": aten.sigmoid.default,
    "contiguous": aten.contiguous.default, torch.exp: aten.exp.default, torch.erf: aten.erf.default,
}
_MODULES = {nn.ReLU: aten.relu.default, nn.SiLU: aten.silu.default, nn.Tanh: aten.tanh.default,
            nn.Sigmoid: aten.sigmoid.default}


def canonicalize(gm: GraphModule) -> Counter:
    """Rewrite ``gm`` in place into canonical aten form; return how many nodes each rule changed."""
    counts: Counter = Counter()
    g = gm.graph
    if n := _out_of_place(g):
        counts["out_of_place"] = n
    for node in list(g.nodes):
        if node.op == "call_function" and node.target is aten._assert_tensor_metadata.default:
            g.erase_node(node)  # export-time dtype checks; they would pin every value they read
            counts["drop_assert"] += 1
            continue
        new = None
        with g.inserting_before(node):
            if node.op in ("call_function", "call_method", "call_module"):
                new = _to_aten(gm, node)
                if new is not None:
                    counts["to_aten"] += 1
            target = new if new is not None else node
            better = _normalise(g, target)
            if better is not None:
                counts[f"normalise:{_name(target)}"] += 1
                if new is not None:
                    new.replace_all_uses_with(better)
                    g.erase_node(new)
                new = better
        if new is not None and new is not node:
            new.meta.update({k: v for k, v in node.meta.items() if k not in new.meta or k == "val"})
            node.replace_all_uses_with(new)
            g.erase_node(node)
    dead_code(gm)
    return counts


_INPLACE = {"add_": "add", "sub_": "sub", "mul_": "mul", "div_": "div", "masked_fill_": "masked_fill"}
# names of non-aten calls whose result may share storage with their input (symbolic_trace graphs)
_ALIASING = {"view", "view_as", "reshape", "transpose", "permute", "t", "T", "expand", "expand_as", "getitem",
             "__getitem__", "unsqueeze", "squeeze", "flatten", "unflatten", "contiguous", "narrow", "select",
             "split", "chunk", "unbind", "detach", "to", "type_as", "as_strided", "movedim", "swapaxes", "getattr",
             "transpose_", "numpy_T", "real", "imag"}


def _may_alias(n) -> bool:
    """True unless ``n`` is a call known to return a fresh tensor of its own."""
    if not isinstance(n, Node) or n.op not in ("call_function", "call_method", "call_module"):
        return True
    t = n.target
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if n.op == "call_module" or "dropout" in name:  # a module or an eval-mode dropout may return its input
        return True
    if isinstance(t, torch._ops.OpOverload):
        return any(r.alias_info is not None for r in t._schema.returns)
    return isinstance(t, torch._ops.OpOverloadPacket) or name in _ALIASING | set(_INPLACE)


def _out_of_place(g) -> int:
    """Rewrite in-place ops on fresh, unaliased tensors out of place; later reads of the tensor read the result."""
    done, order = 0, {n: i for i, n in enumerate(g.nodes)}
    for node in list(g.nodes):
        t = node.target
        if node.op == "call_method" and t in _INPLACE:
            target = _INPLACE[t]
        elif node.op == "call_function" and isinstance(t, torch._ops.OpOverload) and t._opname in _INPLACE:
            target = getattr(getattr(aten, _INPLACE[t._opname]), t._overloadname, None)
        else:
            continue
        a = node.args[0] if node.args else None
        if target is None or _may_alias(a) or any(_may_alias(u) for u in a.users if u is not node):
            continue  # the mutation could be seen through another name: keep it
        with g.inserting_before(node):
            new = (g.call_method if node.op == "call_method" else g.call_function)(target, node.args, node.kwargs)
        new.meta.update(node.meta)
        for u in [u for u in a.users if u is not node and u is not new and order.get(u, -1) > order[node]]:
            u.replace_input_with(a, new)
        node.replace_all_uses_with(new)
        g.erase_node(node)
        order[new] = order[node]
        done += 1
    return done


def _name(node: Node) -> str:
    return getattr(node.target, "__name__", str(node.target))


def _call(g, target, args, kwargs=None) -> Node:
    return g.call_function(target, tuple(args), kwargs or {})


def _to_aten(gm: GraphModule, node: Node) -> Node | None:
    """The aten spelling of a torch-level call, or None if it is one already / unknown."""
    g, t, a, kw = gm.graph, node.target, node.args, node.kwargs
    if node.op == "call_module":
        mod = gm.get_submodule(t)
        if isinstance(mod, nn.Linear):
            w = g.get_attr(f"{t}.weight")
            b = g.get_attr(f"{t}.bias") if mod.bias is not None else None
            new = _call(g, aten.linear.default, (a[0], w, b))
            new.meta["attnforge_fqn"] = t
            return new
        if isinstance(mod, nn.Dropout):
            return _call(g, aten.dropout.default, (a[0], mod.p, mod.training))
        if isinstance(mod, nn.GELU):
            return _call(g, aten.gelu.default, (a[0],), {"approximate": mod.approximate})
        if type(mod) in _MODULES:
            return _call(g, _MODULES[type(mod)], (a[0],))
        return None
    key = t if node.op == "call_function" else t if isinstance(t, str) else None
    if key is None or isinstance(t, torch._ops.OpOverload):
        return None
    try:
        hash(key)
    except TypeError:
        return None
    if key in _BINARY and len(a) == 2 and not kw:
        if not any(isinstance(val(v), torch.Tensor) for v in a):
            return None  # arithmetic on sizes (SymInts) and numbers stays Python arithmetic
        x, y = a
        if not isinstance(x, Node) and isinstance(y, Node) and _BINARY[key] in (aten.add.Tensor, aten.mul.Tensor):
            x, y = y, x
        if isinstance(x, Node):
            return _call(g, _BINARY[key], (x, y))
        return None
    if key in _UNARY and len(a) == 1 and not kw:
        return _call(g, _UNARY[key], a)
    if key in (F.softmax, torch.softmax, "softmax"):
        dim = a[1] if len(a) > 1 else kw.get("dim")
        return _call(g, aten.softmax.int, (a[0], dim, kw.get("dtype")))
    if key in (torch.transpose, "transpose") and len(a) == 3:
        return _call(g, aten.transpose.int, a)
    if key in (torch.permute, "permute"):
        dims = list(a[1]) if len(a) == 2 and isinstance(a[1], (list, tuple)) else list(a[1:])
        return _call(g, aten.permute.default, (a[0], dims))
    if key in ("view", "reshape", torch.reshape):
        dims = list(a[1]) if len(a) == 2 and isinstance(a[1], (list, tuple)) else list(a[1:])
        return _call(g, aten.view.default if key == "view" else aten.reshape.default, (a[0], dims))
    if key in ("masked_fill", torch.masked_fill) and scalar(a[2] if len(a) > 2 else None) is not None:
        return _call(g, aten.masked_fill.Scalar, a[:3])
    if key is F.dropout:
        p = a[1] if len(a) > 1 else kw.get("p", 0.5)
        train = a[2] if len(a) > 2 else kw.get("training", True)
        return _call(g, aten.dropout.default, (a[0], p, train))
    if key is F.scaled_dot_product_attention:
        names = ["attn_mask", "dropout_p", "is_causal"]
        extra = {n: v for n, v in zip(names, a[3:])}
        extra.update({k: v for k, v in kw.items()})
        args = (a[0], a[1], a[2], extra.pop("attn_mask", None), extra.pop("dropout_p", 0.0),
                extra.pop("is_causal", False))
        return _call(g, aten.scaled_dot_product_attention.default, args, extra)
    if key is F.linear:
        b = a[2] if len(a) > 2 else kw.get("bias")
        return _call(g, aten.linear.default, (a[0], a[1], b))
    if key in (F.gelu, "gelu"):
        return _call(g, aten.gelu.default, (a[0],), {"approximate": kw.get("approximate", "none")})
    if key in ("unsqueeze", torch.unsqueeze) and len(a) == 2:
        return _call(g, aten.unsqueeze.default, a)
    if key in (torch.repeat_interleave, "repeat_interleave") and len(a) >= 2 and isinstance(a[1], int):
        dim = a[2] if len(a) > 2 else kw.get("dim")
        return _call(g, aten.repeat_interleave.self_int, (a[0], a[1], dim))
    return None


_CONST_UNARY = {"sqrt": lambda c: math.sqrt(c) if c >= 0 else None, "rsqrt": lambda c: c ** -0.5 if c > 0 else None,
                "neg": lambda c: -c, "reciprocal": lambda c: 1.0 / c if c else None}
_CONST_BINARY = {"mul": operator.mul, "div": lambda a, b: a / b if b else None, "add": operator.add,
                 "sub": operator.sub}


def _constant(n, depth: int = 8) -> float | None:
    """The value of a 0-dim tensor made from constants only: ``torch.full([], c)``, ``torch.scalar_tensor(c)``, or a
    tensor constant of the graph (``torch.tensor(d)`` in forward, lifted by export; not a parameter or buffer)
    through copies, casts and scalar arithmetic (DeBERTa's ``torch.sqrt(torch.tensor(d) * f)``)."""
    if not isinstance(n, Node) or depth == 0:
        return None
    if is_op(n, aten.full) and list(n.args[0]) == [] and scalar(n.args[1]) is not None:
        return scalar(n.args[1])
    if is_op(n, aten.scalar_tensor) and scalar(n.args[0]) is not None:
        return scalar(n.args[0])
    if n.op == "get_attr":
        return _tensor_constant(n)
    if is_op(n, aten.lift_fresh_copy, aten.detach, aten.detach_, aten.clone, aten.alias) or (
            is_op(n, aten.to, aten._to_copy) and isinstance(val(n), torch.Tensor) and val(n).is_floating_point()):
        return _constant(n.args[0], depth - 1)
    name = getattr(getattr(n, "target", None), "__name__", "").split(".")[0]
    if name in _CONST_UNARY and n.op == "call_function" and len(n.args) == 1:
        c = _constant(n.args[0], depth - 1)
        return None if c is None else _CONST_UNARY[name](c)
    if name in _CONST_BINARY and n.op == "call_function" and len(n.args) == 2 and not n.kwargs:
        a = _constant(n.args[0], depth - 1) if isinstance(n.args[0], Node) else scalar(n.args[0])
        b = _constant(n.args[1], depth - 1) if isinstance(n.args[1], Node) else scalar(n.args[1])
        return None if a is None or b is None else _CONST_BINARY[name](a, b)
    return None


def _tensor_constant(n: Node) -> float | None:
    """The value of a 0-dim floating or integer tensor attribute that is neither a parameter nor a buffer."""
    gm = n.graph.owning_module
    if gm is None or not isinstance(n.target, str):
        return None
    owner, _, leaf = n.target.rpartition(".")
    try:
        mod = gm.get_submodule(owner) if owner else gm
    except AttributeError:
        return None
    t = getattr(mod, leaf, None)
    if not isinstance(t, torch.Tensor) or isinstance(t, nn.Parameter) or leaf in mod._buffers or t.dim() != 0 \
            or t.dtype == torch.bool or t.is_complex():
        return None
    return float(t)


def _param_t(n) -> Node | None:
    """W for ``n`` = the transpose of a 2-D parameter W (``W.T``, ``W.t()``, ``W.transpose(0, 1)``), else None."""
    if not isinstance(n, Node) or n.op not in ("call_function", "call_method"):
        return None
    w = n.args[0] if n.args else None
    if not (isinstance(w, Node) and w.op == "get_attr" and len(shape(w) or ()) == 2):
        return None
    t, rest = n.target, list(n.args[1:])
    name = t if isinstance(t, str) else getattr(t, "__name__", "")
    if is_op(n, aten.numpy_T, aten.t) or name in ("t", "numpy_T") or (name == "getattr" and rest == ["T"]):
        return w
    if (is_op(n, aten.transpose) or name == "transpose") and sorted(d % 2 for d in rest) == [0, 1]:
        return w
    if (is_op(n, aten.permute) or name == "permute") and [d % 2 for d in (rest[0] if len(rest) == 1 else rest)] == [1, 0]:
        return w
    return None


def _normalise(g, node: Node) -> Node | None:
    """Canonical spelling of an aten call, or None if it already is canonical."""
    if is_op(node, aten.div, aten.mul) and len(node.args) == 2 and isinstance(node.args[0], Node) \
            and _constant(node.args[1]) not in (None, 0.0) and not node.kwargs.get("rounding_mode") \
            and isinstance(val(node.args[0]), torch.Tensor) and val(node.args[0]).is_floating_point():
        c = _constant(node.args[1])  # x / full([], c): a scale written as a 0-dim tensor (GPT-2's attention)
        return _call(g, aten.mul.Tensor, (node.args[0], 1.0 / c if is_op(node, aten.div) else c))
    if is_op(node, aten.div) and len(node.args) == 2 and scalar(node.args[1]) not in (None, 0.0) \
            and not node.kwargs.get("rounding_mode"):
        return _call(g, aten.mul.Tensor, (node.args[0], 1.0 / scalar(node.args[1])))
    if is_op(node, aten.mul) and len(node.args) == 2 and scalar(node.args[0]) is not None \
            and isinstance(node.args[1], Node):
        return _call(g, aten.mul.Tensor, (node.args[1], node.args[0]))
    if is_op(node, aten.mul) and node.target is aten.mul.Scalar:
        return _call(g, aten.mul.Tensor, node.args)
    if is_op(node, aten.matmul) and len(node.args) == 2 and _param_t(node.args[1]) is not None \
            and len(shape(node.args[0]) or ()) >= 2:
        return _call(g, aten.linear.default, (node.args[0], _param_t(node.args[1]), None))  # x @ W.T
    if is_op(node, aten.add) and node.target is aten.add.Tensor and not node.kwargs:
        for lin, b in (node.args, node.args[::-1]):
            if is_op(lin, aten.linear) and len(lin.args) == 3 and lin.args[2] is None and len(lin.users) == 1 \
                    and isinstance(b, Node) and b.op == "get_attr" and shape(lin) and shape(b) == shape(lin)[-1:] \
                    and val(b).dtype == val(lin).dtype:
                return _call(g, aten.linear.default, (lin.args[0], lin.args[1], b))  # x @ W.T + b
    if node.target is aten.where.self and len(node.args) == 3 and _constant(node.args[2]) is not None \
            and isinstance(val(node.args[1]), torch.Tensor) and val(node.args[1]).is_floating_point():
        # where(cond, scores, c) with c a 0-dim tensor constant (GPT-Neo's finfo.min): a number
        return _call(g, aten.where.ScalarOther, (node.args[0], node.args[1], _constant(node.args[2])))
    if is_op(node, aten.bmm):
        return _call(g, aten.matmul.default, node.args[:2])
    if is_op(node, aten.baddbmm):
        inp, b1, b2 = node.args[:3]
        beta = node.kwargs.get("beta", node.args[3] if len(node.args) > 3 else 1)
        alpha = node.kwargs.get("alpha", node.args[4] if len(node.args) > 4 else 1)
        out = _call(g, aten.matmul.default, (b1, b2))
        out.meta["val"] = node.meta.get("val")
        if alpha != 1:
            out = _call(g, aten.mul.Tensor, (out, float(alpha)))
            out.meta["val"] = node.meta.get("val")
        if beta != 0:
            term = inp if beta == 1 else _call(g, aten.mul.Tensor, (inp, float(beta)))
            out = _call(g, aten.add.Tensor, (out, term))
        return out
    if node.target is aten._softmax.default:
        return _call(g, aten.softmax.int, (node.args[0], node.args[1]))
    nd = len(shape(node.args[0])) if node.op == "call_function" and node.args and shape(node.args[0]) else None
    if is_op(node, aten.permute) and nd:
        perm = [d % nd for d in node.args[1]]
        moved = [i for i, d in enumerate(perm) if d != i]
        if len(moved) == 2 and perm[moved[0]] == moved[1]:
            return _call(g, aten.transpose.int, (node.args[0], moved[0], moved[1]))
    if node.target is aten.transpose.int and nd:
        d0, d1 = sorted(d % nd for d in node.args[1:3])
        if (d0, d1) != tuple(node.args[1:3]):
            return _call(g, aten.transpose.int, (node.args[0], d0, d1))
    return None
