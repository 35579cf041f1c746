"""The variant registry: each runtime op is declared once, in one ``Variant``, and everything reads it.

A variant is one ``torch.ops.attnforge.<name>`` op with, in one object (DESIGN.md, "Runtime ops"):

    name, schema     the op and its argument schema (torch.library); ``arg_names`` from it
    rewrite, params  the recipe step that inserts it and that step's pydantic params model
    reference        a plain implementation (dense, obviously right): what the kernels are tested against
    cpu              the PyTorch kernel (vectorised; runs on any device)
    fake             output shapes from input shapes (export and tracing)
    autograd         default: recompute the PyTorch kernel on the saved inputs and differentiate it; or a
                     custom (backward, setup_context) pair; ``no_grad`` names inputs it refuses to train with
    triton, supports the Triton launcher, and the one predicate saying which calls it covers: dispatch and the
                     tuner both ask ``supports``, so they cannot disagree
    cost             FLOPs and bytes moved as sympy formulas of the argument shapes (``Shaped``)
    synthetic        random arguments for ``attnforge autotune --op`` from a shape and name=value params
    tunables         the ``Tunable`` kernels one call runs (codegen/autotune.py) on a backend (``tunables_for``
                     asks ``supports`` first)
    onnx             its ONNX translation, ``fn(op, *args)`` (runtime/onnx.py)
    cache            its cache policy for generation (runtime/cache.py): the layout of its KV state
    waiting          for an op that no rewrite inserts yet: which issue wires it

The CLI, ``attnforge autotune``, the diff's FLOP counts, ONNX export and the recipe schema read this registry;
no central list names an op. Each variant lives in its own folder, ``runtime/<variant>/`` (docs/extending.md).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Callable, Optional

import sympy
import torch
from pydantic import BaseModel, ConfigDict
from torch import Tensor

from .dispatch import wants_triton

VARIANTS: dict[str, "Variant"] = {}


class Params(BaseModel):
    """Base of every rewrite's parameter model: unknown keys are errors, values are immutable."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class NoParams(Params):
    """Exact rewrites take no parameters."""


@dataclass(frozen=True)
class Shaped:
    """What a cost formula reads of a tensor: its shape (ints or sympy expressions) and dtype."""

    shape: tuple
    dtype: torch.dtype

    def dim(self) -> int:
        return len(self.shape)

    @property
    def itemsize(self) -> int:
        return self.dtype.itemsize

    def numel(self):
        return sympy.Mul(*self.shape)


def sym(d):
    """A dimension as a sympy expression (a SymInt's expression, or an integer)."""
    if isinstance(d, torch.SymInt):
        return d.node.expr
    return sympy.Integer(int(d)) if not isinstance(d, sympy.Basic) else d


def shaped(x):
    """A tensor (real, fake or meta) as ``Shaped`` with sympy dims; anything else as it is."""
    if isinstance(x, Tensor):
        return Shaped(tuple(sym(d) for d in x.shape), x.dtype)
    return x


@dataclass(frozen=True)
class Cost:
    flops: Any  # sympy expression
    bytes: Any  # sympy expression: each input read once and the output written once


def io_bytes(*tensors) -> sympy.Expr:
    """Bytes of the given ``Shaped`` tensors (None ignored): the traffic of a kernel that reads each once."""
    return sympy.Add(*[t.numel() * t.itemsize for t in tensors if isinstance(t, Shaped)])


def _no_tunables(args, device, backend) -> list:
    return []


def _never(*args) -> bool:
    return False


@dataclass
class Variant:
    name: str
    schema: str
    reference: Callable
    cpu: Callable
    fake: Callable
    rewrite: str = ""
    params: Optional[type] = None
    triton: Optional[Callable] = None
    supports: Callable[..., bool] = _never
    backward: Optional[tuple[Callable, Callable]] = None
    no_grad: Optional[Callable[..., Optional[str]]] = None
    cost: Optional[Callable[..., Cost]] = None
    synthetic: Optional[Callable] = None
    tunables: Callable = _no_tunables
    onnx: Optional[Callable] = None
    cache: Optional[Any] = None  # the variant's cache policy for generation (runtime/cache.py)
    mutates: tuple = ()  # arguments the op writes in place (a cache)
    differentiable: bool = True
    inserted_by: str = ""  # for an op no recipe step inserts: what does
    waiting: str = ""
    doc: str = ""

    @property
    def op(self):
        """The ``torch.ops.attnforge.<name>.default`` overload."""
        return getattr(torch.ops.attnforge, self.name).default

    @property
    def arg_names(self) -> list[str]:
        return [a.name for a in self.op._schema.arguments]

    def tunables_for(self, args: tuple, device, backend: str) -> list:
        """The ``Tunable`` kernels one call runs on ``backend``: the Triton kernel's when ``supports`` covers the call
        (the predicate dispatch asks), else the PyTorch kernel's, since that is what then runs."""
        if backend == "triton" and (self.triton is None or not self.supports(*args)):
            backend = "torch"
        return self.tunables(args, torch.device(device), backend)

    def dispatch(self, *args):
        """The op's body: the Triton launcher when the backend asks for it and ``supports`` the call, else the
        PyTorch kernel (runtime/dispatch.py)."""
        first = next((a for a in args if isinstance(a, Tensor)), None)
        if self.triton is not None and first is not None and wants_triton(first) and self.supports(*args):
            return self.triton(*args)
        return self.cpu(*args)


def register(v: Variant) -> Variant:
    """Define ``torch.ops.attnforge.<v.name>`` from the variant (op, fake, autograd) and add it to the registry."""
    if v.name in VARIANTS:
        raise ValueError(f"variant {v.name!r} is registered twice")
    doc = v.doc or (v.reference.__doc__ or "")

    def body(*args):
        return v.dispatch(*args)

    body.__name__, body.__doc__ = v.name, doc
    op = torch.library.custom_op(f"attnforge::{v.name}", body, mutates_args=v.mutates, schema=v.schema)
    op.register_fake(v.fake)
    if v.differentiable:
        backward, setup = v.backward or (_recompute_backward(v), _save_inputs)
        op.register_autograd(backward, setup_context=setup)
    v.doc = doc
    VARIANTS[v.name] = v
    return v


def _save_inputs(ctx, inputs, output):
    tensors = [x for x in inputs if isinstance(x, Tensor)]
    ctx.save_for_backward(*tensors)
    ctx.is_tensor = [isinstance(x, Tensor) for x in inputs]
    ctx.others = [None if isinstance(x, Tensor) else x for x in inputs]


def _recompute_backward(v: Variant):
    """Gradients by differentiating the PyTorch kernel on the saved inputs (the forward is recomputed with autograd
    on, as flash attention's backward recomputes the scores)."""

    def backward(ctx, *grads):
        saved = iter(ctx.saved_tensors)
        inputs = [next(saved) if t else x for t, x in zip(ctx.is_tensor, ctx.others)]
        if v.no_grad is not None:
            why = v.no_grad(*inputs)
            if why:
                raise NotImplementedError(f"attnforge::{v.name} backward: {why}")
        wants = [need and isinstance(x, Tensor) and x.is_floating_point() for x, need in
                 zip(inputs, ctx.needs_input_grad)]
        with torch.enable_grad():
            leaves = [x.detach().requires_grad_(w) if isinstance(x, Tensor) else x for x, w in zip(inputs, wants)]
            out = v.cpu(*leaves)
            outs = out if isinstance(out, (tuple, list)) else (out,)
            pairs = [(o, g) for o, g in zip(outs, grads) if isinstance(o, Tensor) and o.requires_grad
                     and g is not None]
            targets = [x for x, w in zip(leaves, wants) if w]
            got = torch.autograd.grad([o for o, _ in pairs], targets, [g for _, g in pairs],
                                      allow_unused=True) if pairs and targets else [None] * len(targets)
        it = iter(got)
        return tuple(next(it) if w else None for w in wants)

    return backward


def variant(name: str) -> Variant:
    """The variant named by its op name or by the rewrite that inserts it; a ``KeyError`` listing them otherwise."""
    if name in VARIANTS:
        return VARIANTS[name]
    for v in VARIANTS.values():
        if v.rewrite and v.rewrite == name:
            return v
    names = sorted(op_names())
    close = difflib.get_close_matches(name, names, n=1)
    raise KeyError(f"unknown op {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                   + f"; ops: {', '.join(names)}")


def op_names(tunable_only: bool = False) -> list[str]:
    """Every name ``variant`` accepts (op names and rewrite names), e.g. for the CLI's choices."""
    out = []
    for v in VARIANTS.values():
        if tunable_only and v.synthetic is None:
            continue
        out.append(v.name)
        if v.rewrite and v.rewrite != v.name:
            out.append(v.rewrite)
    return out


def of_op(target) -> Optional[Variant]:
    """The variant whose op ``target`` (an OpOverload) is, or None."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "attnforge":
        return VARIANTS.get(target._opname)
    return None


def param(params: dict, name: str, default):
    """A name=value parameter (``attnforge autotune --params``) as the type of ``default``; removes it from params."""
    value = params.pop(name, default)
    if isinstance(default, bool) and isinstance(value, str):
        return value.lower() in ("1", "true", "yes")
    return type(default)(value)
