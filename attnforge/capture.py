"""Capture a model as an FX graph: torch.export (non-strict), else torch.fx.symbolic_trace.

The result is an ``fx.GraphModule`` whose parameters are ``get_attr`` nodes, with an example value
(fake or meta tensor) in every ``node.meta["val"]`` and module FQNs in ``node.meta["nn_module_stack"]``.
"""
from __future__ import annotations

import contextlib
import copy
import inspect
import io
import logging
import warnings
from dataclasses import dataclass, field

import torch
from torch import nn
from torch.fx import GraphModule, Interpreter

from .errors import CaptureError


@dataclass
class Captured:
    gm: GraphModule
    method: str  # "export" or "symbolic_trace"
    dynamic: bool  # batch/sequence dims stay symbolic (other input shapes are accepted)
    notes: list[str] = field(default_factory=list)
    model: nn.Module | None = None  # the copy that was captured (the graph's parameters alias it)


def _auto_shapes(model: nn.Module, args: tuple, kwargs: dict):
    """Dim.AUTO for every dim of every tensor input, keyed as torch.export expects."""
    auto = torch.export.Dim.AUTO

    def spec(x):
        if isinstance(x, torch.Tensor):
            return {i: auto for i in range(x.dim())}
        if isinstance(x, (list, tuple)):
            return type(x)(spec(y) for y in x)
        if isinstance(x, dict):
            return {k: spec(y) for k, y in x.items()}
        return None

    if not kwargs:
        return tuple(spec(a) for a in args)
    bound = inspect.signature(model.forward).bind(*args, **kwargs)
    out = {}
    for name, value in bound.arguments.items():
        kind = inspect.signature(model.forward).parameters[name].kind
        if kind == inspect.Parameter.VAR_KEYWORD:
            out[name] = {k: spec(v) for k, v in value.items()}
        else:
            out[name] = spec(value)
    return out


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *, dynamic: bool = True,
            copy_model: bool = True) -> Captured:
    """Capture ``model`` on the example ``args``/``kwargs``; raise ``CaptureError`` saying why if nothing works.

    The model is deep-copied first (``copy_model``), so the graph's parameters never alias the user's.
    """
    kwargs = dict(kwargs or {})
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    model = copy.deepcopy(model) if copy_model else model
    errors: list[str] = []
    tries = [True, False] if dynamic else [False]
    for dyn in tries:
        try:
            with _quiet():
                ds = _auto_shapes(model, args, kwargs) if dyn else None
                ep = torch.export.export(model, tuple(args), kwargs, dynamic_shapes=ds, strict=False)
                gm = ep.module()
                # module() forbids train()/eval(); allow them (so a rewritten model can be fine-tuned): the graph
                # keeps the dropout/batch-norm behaviour it was captured with, the flag only changes submodules
                for name in ("train", "eval"):
                    gm.__dict__.pop(name, None)
            notes = [] if dyn or not dynamic else [f"dynamic shapes failed, captured with static shapes ({errors[-1]})"]
            return Captured(gm, "export", dyn, notes, model)
        except Exception as e:  # noqa: BLE001 - every failure is reported, with its cause
            errors.append(f"torch.export{' (dynamic)' if dyn else ''}: {type(e).__name__}: {_first_line(e)}")
    try:
        with _quiet():
            gm = torch.fx.symbolic_trace(model)
            _record_values(gm, args, kwargs)
        return Captured(gm, "symbolic_trace", True,
                        [f"torch.export failed; used torch.fx.symbolic_trace ({errors[-1]})"], model)
    except Exception as e:  # noqa: BLE001
        errors.append(f"torch.fx.symbolic_trace: {type(e).__name__}: {_first_line(e)}")
    raise CaptureError(f"could not capture {type(model).__name__}:\n  " + "\n  ".join(errors))


@contextlib.contextmanager
def _quiet():
    """Silence torch's own logging and warnings while a capture attempt runs; failures are reported by us."""
    previous = logging.root.manager.disable
    logging.disable(logging.CRITICAL)
    try:
        # export prints the partial graph of a failed trace to stderr; the error we raise says why
        with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


class _Recorder(Interpreter):
    def run_node(self, n):
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            n.meta["val"] = torch.empty_like(out, device="meta")
        return out


def _record_values(gm: GraphModule, args: tuple, kwargs: dict) -> None:
    """Give a symbolically traced graph shapes (meta tensors) by running it once."""
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(args)
    for n in holders[len(args):]:
        if n.target in kwargs:
            flat.append(kwargs[n.target])
        elif n.args:  # the parameter's default
            flat.append(n.args[0])
        else:
            raise CaptureError(f"symbolic_trace: no example value for input {n.target!r}")
    with torch.no_grad():
        _Recorder(gm).run(*flat)


def flat_inputs(gm: GraphModule, args: tuple, kwargs: dict | None) -> list:
    """The example inputs in the order of ``gm``'s placeholders (what ``fx.Interpreter.run`` takes)."""
    import torch.utils._pytree as pytree

    kwargs = dict(kwargs or {})
    info = getattr(gm.graph._codegen, "pytree_info", None)
    if info is not None and info.in_spec is not None:
        spec = info.in_spec
        keys = spec.child(1).context if spec.num_children == 2 else None
        if keys is not None:
            kwargs = {k: kwargs[k] for k in keys if k in kwargs}
        return pytree.tree_leaves((tuple(args), kwargs))
    holders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    flat = list(args)
    for n in holders[len(args):]:
        flat.append(kwargs[n.target] if n.target in kwargs else (n.args[0] if n.args else None))
    return flat
