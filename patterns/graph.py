"""Small helpers for reading and editing canonical aten FX graphs."""
from __future__ import annotations

import numbers
from typing import Any

import torch
from torch.fx import Graph, Node
from torch.fx.node import map_arg

aten = torch.ops.aten


def is_op(node: Any, *targets) -> bool:
    """True when ``node`` is a call of one of ``targets`` (OpOverloads or packets)."""
    if not isinstance(node, Node) or node.op != "call_function":
        return False
    t = node.target
    packet = getattr(t, "overloadpacket", None)
    return any(t is x or packet is x for x in targets)


def call_args(node: Node) -> dict[str, Any]:
    """All arguments of an aten call by schema name, defaults filled in."""
    schema = node.target._schema
    out: dict[str, Any] = {}
    for i, a in enumerate(schema.arguments):
        if i < len(node.args) and not a.kwarg_only:
            out[a.name] = node.args[i]
        elif a.name in node.kwargs:
            out[a.name] = node.kwargs[a.name]
        elif a.has_default_value():
            out[a.name] = a.default_value
        else:
            out[a.name] = None
    return out


def val(node: Any):
    """The example value (fake/meta tensor) recorded for ``node``, or None."""
    return node.meta.get("val") if isinstance(node, Node) else None


def shape(node: Any) -> tuple | None:
    v = val(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def static_int(x) -> int | None:
    """``x`` as a Python int when it is one (not a free symbol)."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        try:
            return int(x.node.maybe_as_int()) if x.node.maybe_as_int() is not None else None
        except Exception:
            return None
    return None


def scalar(x) -> float | None:
    """``x`` as a Python float when it is a plain number (not a tensor)."""
    if isinstance(x, bool):
        return None
    if isinstance(x, numbers.Number):
        return float(x)
    return None


def fqn_of(node: Node) -> str:
    """The innermost module FQN that produced ``node`` (from nn_module_stack)."""
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return node.meta.get("attnforge_fqn", "")
    path = list(stack.values())[-1][0]
    return clean_fqn(path)


def module_path(node: Node) -> list[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        f = node.meta.get("attnforge_fqn", "")
        return [f] if f else []
    return [clean_fqn(v[0]) for v in stack.values()]


def clean_fqn(path: str) -> str:
    # export writes "L['self'].layers[0]" style paths for some frontends; keep dotted names
    path = path.replace("L['self'].", "").replace("L['self']", "")
    path = path.replace("[", ".").replace("]", "").replace("'", "")
    path = path.replace("._modules.", ".")
    return path.strip(".")


def common_prefix(fqns: list[str]) -> str:
    parts = [f.split(".") for f in fqns if f]
    if not parts:
        return ""
    out = []
    for items in zip(*parts):
        if all(x == items[0] for x in items):
            out.append(items[0])
        else:
            break
    return ".".join(out)


def insert_call(graph: Graph, target, args: tuple, kwargs: dict | None = None, *, fqn: str = "") -> Node:
    """Insert a call at the graph's current insert point and compute its meta["val"]."""
    kwargs = kwargs or {}
    node = graph.call_function(target, args, kwargs)
    node.meta["attnforge_fqn"] = fqn
    vals = []
    map_arg((args, kwargs), lambda n: vals.append(val(n)) or n)
    fake_args = map_arg(args, val)
    fake_kwargs = map_arg(kwargs, val)
    if all(v is not None for v in vals):
        mode = torch._guards.detect_fake_mode([v for v in vals if isinstance(v, torch.Tensor)])
        try:
            if mode is not None:
                with mode:
                    node.meta["val"] = target(*fake_args, **fake_kwargs)
            else:
                node.meta["val"] = target(*fake_args, **fake_kwargs)
        except Exception:
            pass
    return node


def single_user(node: Node) -> bool:
    return len(node.users) == 1


def example_size(x) -> int | None:
    """A dim size as an int: static, or the example value behind a symbolic size."""
    if isinstance(x, int):
        return x
    if isinstance(x, torch.SymInt):
        hint = x.node.hint
        return int(hint) if hint is not None else None
    return None
