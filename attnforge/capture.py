"""Capture a model as an FX graph: torch.export (non-strict), else torch.fx.symbolic_trace.

A call is first bound to the model's ``forward`` signature (``call_form``): its tensor arguments become the graph's
inputs, in order and named as the parameters are (``input_ids``, ``attention_mask``), and everything else (flags
such as ``return_dict``, arguments given as None) is baked into the capture. ``use_cache`` is forced off: the KV
cache is not an output of the graph (decoding with a cache is the generation issue's). One capture serves one
call form; ``OptimizedModel`` captures again for another (attnforge/model.py).

Batch and sequence dims stay symbolic (a floating-point input's feature dim stays static). An example of batch 1
(or length 1) would pin that size (torch.export specialises 0/1 sizes), so such an example is widened first: size-1 batch dims, and size-1 sequence dims of
integer inputs, are repeated to 2 for the capture, and the graph is then checked on the user's own example too.

The result is an ``fx.GraphModule`` whose parameters are ``get_attr`` nodes with their original names, an example
value (fake or meta tensor) in every ``node.meta["val"]`` and module FQNs in ``node.meta["nn_module_stack"]``.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import io
import logging
import warnings
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor, nn
from torch.fx import GraphModule, Interpreter

from .errors import CaptureError

_NO_CACHE = {"use_cache": False}  # forced: the graph returns no KV cache


class Uncapturable(CaptureError):
    """A call whose arguments a graph cannot take (a cache object, a list of tensors): it runs eagerly."""


@dataclass(frozen=True)
class CallForm:
    """How a call binds to the model's forward: which parameters get tensors (the graph's inputs, in order), the
    other arguments (baked in), the training flag and each tensor's dtype and rank. Equal forms share a graph."""

    tensors: tuple[str, ...]
    consts: tuple[tuple[str, Any], ...]
    training: bool
    specs: tuple[tuple[str, int], ...]
    positional: tuple[str, ...] = ()  # parameters passed positionally (positional-only, *args items)
    shapes: tuple = ()  # the exact input shapes, for a static graph (one the dynamic graph's guards exclude)
    signature: Any = field(default=None, compare=False, hash=False, repr=False)

    def describe(self) -> str:
        flags = ", ".join(f"{k}={v!r}" for k, v in self.consts)
        sizes = f"; shapes {', '.join('x'.join(map(str, s)) for s in self.shapes)}" if self.shapes else ""
        return (f"({', '.join(self.tensors)}{'; ' + flags if flags else ''}{'; training' if self.training else ''}"
                f"{sizes})")

    def inputs(self, args: tuple, kwargs: dict) -> list[Tensor]:
        """The graph inputs of a call of this form."""
        named = _bind(self.signature, args, kwargs)
        return [named[n] for n in self.tensors]


def _bind(signature: inspect.Signature, args: tuple, kwargs: dict) -> dict[str, Any]:
    """{parameter name: value} of a call (``*args`` items as ``args_<i>``, ``**kwargs`` items by their key)."""
    try:
        bound = signature.bind(None, *args, **kwargs)  # None stands for self
    except TypeError as e:
        raise CaptureError(f"the call does not match forward{signature}: {e}") from None
    named = {}
    for i, (name, value) in enumerate(bound.arguments.items()):
        if i == 0:
            continue
        kind = signature.parameters[name].kind
        if kind == inspect.Parameter.VAR_POSITIONAL:
            named.update({f"{name}_{j}": v for j, v in enumerate(value)})
        elif kind == inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        else:
            named[name] = value
    return named


@functools.lru_cache(maxsize=64)
def _signature(cls) -> inspect.Signature:
    return inspect.signature(cls.forward)


def _hashable(value) -> bool:
    try:
        hash(value)
    except TypeError:
        return False
    return True


def call_form(model: nn.Module, args: tuple = (), kwargs: Optional[dict] = None,
              training: Optional[bool] = None) -> tuple[CallForm, list[Tensor]]:
    """The call form of ``model(*args, **kwargs)`` (in ``training`` mode, default the model's) and its tensor
    inputs. ``Uncapturable`` for arguments a graph cannot take as inputs or constants (a ``DynamicCache``, a list
    of tensors)."""
    signature = _signature(type(model))
    named = _bind(signature, tuple(args), dict(kwargs or {}))
    params = signature.parameters
    if "use_cache" in params:
        named.update(_NO_CACHE)
    tensors, consts, positional = [], [], []
    for name, value in named.items():
        base = name.rpartition("_")[0] if name not in params and "_" in name else name
        if base in params and params[base].kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                    inspect.Parameter.VAR_POSITIONAL):
            positional.append(name)
        if isinstance(value, Tensor):
            tensors.append(name)
        elif value is None or isinstance(value, (bool, int, float, str)) or (
                isinstance(value, (tuple, frozenset)) and _hashable(value) and not _has_tensor(value)):
            consts.append((name, value))
        else:
            raise Uncapturable(f"argument {name!r} is a {type(value).__name__}: a graph takes tensors, numbers, "
                               "strings and None")
    values = [named[n] for n in tensors]
    specs = tuple((str(v.dtype).removeprefix("torch."), v.dim()) for v in values)
    mode = model.training if training is None else training
    form = CallForm(tuple(tensors), tuple(consts), bool(mode), specs, tuple(positional), signature=signature)
    return form, values


def _has_tensor(value) -> bool:
    return any(isinstance(v, Tensor) or (isinstance(v, (tuple, list)) and _has_tensor(v)) for v in value)


def bound_module(model: nn.Module, form: CallForm) -> nn.Module:
    """A shallow copy of ``model`` (same submodules and parameters, so the same FQNs) whose ``forward`` takes the
    form's tensors as named arguments and calls the model's forward with the form's constants."""
    names = [n for n in form.tensors]
    pos = [n for n in form.positional]
    const_names = {k for k, _ in form.consts}
    call_pos = ", ".join(n if n in names else f"_c[{n!r}]" for n in pos)
    call_kw = ", ".join(f"{n}={n}" for n in names if n not in pos)
    consts_kw = ", ".join(f"{k}=_c[{k!r}]" for k in const_names if k not in pos)
    args = ", ".join(x for x in (call_pos, call_kw, consts_kw) if x)
    source = f"def forward(self, {', '.join(names)}):\n    return _fwd(self, {args})\n"
    scope = {"_fwd": type(model).forward, "_c": dict(form.consts)}
    exec(compile(source, f"<attnforge call form {form.describe()}>", "exec"), scope)  # noqa: S102
    cls = type(model)
    bound_cls = type(cls.__name__, (cls,), {"forward": scope["forward"], "__module__": cls.__module__,
                                            "__qualname__": cls.__qualname__})
    wrapped = copy.copy(model)
    wrapped.__class__ = bound_cls
    return wrapped


def widened(values: list[Tensor]) -> Optional[list[Tensor]]:
    """The example with size-1 batch dims (dim 0 of every input) and size-1 sequence dims (the last dim of integer
    inputs) repeated to 2, so that torch.export keeps them symbolic; None when there is nothing to widen."""
    out, changed = [], False
    for v in values:
        reps = [1] * v.dim()
        if v.dim() >= 1 and v.shape[0] == 1:
            reps[0] = 2
        if not v.is_floating_point() and v.dim() >= 2 and v.shape[-1] == 1:
            reps[-1] = 2
        changed = changed or any(r != 1 for r in reps)
        out.append(v.repeat(*reps) if any(r != 1 for r in reps) else v)
    return out if changed else None


@dataclass
class Captured:
    gm: GraphModule
    method: str  # "export" or "symbolic_trace"
    dynamic: bool  # batch/sequence dims stay symbolic (other input shapes are accepted)
    notes: list[str] = field(default_factory=list)
    model: nn.Module | None = None  # the copy that was captured (the graph's parameters alias it)
    form: CallForm | None = None
    inputs: list = field(default_factory=list)  # the graph's inputs on the example (widened when it was)
    example: list = field(default_factory=list)  # the graph's inputs on the user's own example
    shapes: dict = field(default_factory=dict)  # input name -> its dims ("B", "N" or a size) as captured
    widened: bool = False  # inputs is the example widened to batch/length 2


def _auto_shapes(form: CallForm) -> dict:
    """Dim.AUTO (symbolic unless the model fixes it) for the batch and sequence dims of every tensor input, keyed by
    the generated forward's parameter names. The feature dim of a floating-point input (its last: hidden or head
    dim), and dim 1 of a 4-D one (heads, channels), stay static: weights fix them, and a rewrite needs them."""
    auto = torch.export.Dim.AUTO
    out = {}
    for name, (dtype, rank) in zip(form.tensors, form.specs):
        floating = torch.empty(0, dtype=getattr(torch, dtype)).is_floating_point()
        static = {rank - 1} | ({1} if rank == 4 else set()) if floating and rank >= 2 else set()
        out[name] = {i: auto for i in range(rank) if i not in static}
    return out


def capture(model: nn.Module, args: tuple = (), kwargs: dict | None = None, *, dynamic: bool = True,
            copy_model: bool = True, training: Optional[bool] = None) -> Captured:
    """Capture ``model`` on the example ``args``/``kwargs``; raise ``CaptureError`` saying why if nothing works.

    The model is deep-copied first (``copy_model``), so the graph's parameters never alias the user's. ``training``:
    capture in that mode (default: the model's own)."""
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    form, values = call_form(model, tuple(args), dict(kwargs or {}), training)
    model = copy.deepcopy(model) if copy_model else model
    was_training = model.training
    model.train(form.training)
    try:
        return _capture(model, form, values, dynamic)
    finally:
        model.train(was_training)


def _capture(model: nn.Module, form: CallForm, values: list, dynamic: bool) -> Captured:
    wide = widened(values) if dynamic else None
    errors: list[str] = []
    tries = ([("dynamic, widened", wide)] if wide is not None else []) + \
        ([("dynamic", values)] if dynamic else []) + [("static", values)]
    root = bound_module(model, form)
    for label, example in tries:
        dyn = label.startswith("dynamic")
        try:
            with _quiet():
                ep = torch.export.export(root, tuple(example), dynamic_shapes=_auto_shapes(form) if dyn else None,
                                         strict=False)
                gm = ep.module()
                # module() forbids train()/eval(); allow them (so a rewritten model can be fine-tuned): the graph
                # keeps the dropout/batch-norm behaviour it was captured with, the flag only changes submodules
                for name in ("train", "eval"):
                    gm.__dict__.pop(name, None)
            notes = []
            if label == "dynamic, widened":
                notes.append("captured on the example widened to batch/length 2 (a size of 1 would pin it), "
                             "then checked on the example itself")
            if not dyn and dynamic:
                notes.append(f"dynamic shapes failed, captured with static shapes ({errors[-1]})")
            gm.meta["attnforge_form"] = form
            return Captured(gm, "export", dyn, notes, model, form, list(example), values, _dims(gm, form),
                            example is wide)
        except Exception as e:  # noqa: BLE001 - every failure is reported, with its cause
            errors.append(f"torch.export ({label}): {type(e).__name__}: {_first_line(e)}")
    try:
        with _quiet():
            gm = torch.fx.symbolic_trace(root)
            _record_values(gm, values)
        gm.meta["attnforge_form"] = form
        return Captured(gm, "symbolic_trace", True, [f"torch.export failed; used torch.fx.symbolic_trace "
                                                     f"({errors[-1]})"], model, form, values, values, {})
    except Exception as e:  # noqa: BLE001
        errors.append(f"torch.fx.symbolic_trace: {type(e).__name__}: {_first_line(e)}")
    raise CaptureError(f"could not capture {type(model).__name__}:\n  " + "\n  ".join(errors))


def _dims(gm: GraphModule, form: CallForm) -> dict:
    """{input: [dims]}: each symbolic dim by a readable name (B for a leading dim, N, N2, ... for the others, one
    name per symbol, shared by the inputs that share it), each static dim by its size."""
    names: dict = {}
    out = {}
    holders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder"}
    for inp in form.tensors:
        v = holders[inp].meta.get("val") if inp in holders else None
        if not isinstance(v, Tensor):
            continue
        dims = []
        for i, d in enumerate(v.shape):
            if isinstance(d, torch.SymInt) and not d.node.expr.is_number:
                key = str(d.node.expr)
                if key not in names:
                    base = "B" if i == 0 else "N"
                    taken = sum(1 for x in names.values() if x.rstrip("0123456789") == base)
                    names[key] = base if taken == 0 else f"{base}{taken + 1}"
                dims.append(names[key])
            else:
                dims.append(int(d))
        out[inp] = dims
    return out


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


def _record_values(gm: GraphModule, values: list) -> None:
    """Give a symbolically traced graph shapes (meta tensors) by running it once."""
    with torch.no_grad():
        _Recorder(gm).run(*values)


def flat_inputs(gm: GraphModule, args: tuple, kwargs: dict | None) -> list:
    """The inputs of a captured ``gm`` for a call ``model(*args, **kwargs)`` of its call form, in placeholder order."""
    form = gm.meta.get("attnforge_form")
    if form is None:
        raise CaptureError("this graph module was not made by attnforge.capture")
    return form.inputs(tuple(args), dict(kwargs or {}))
