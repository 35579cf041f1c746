"""Attention masks as small predicates on positions, written once and rendered wherever a kernel needs them.

A mask says whether key position ``j`` is visible from query position ``i`` (attention-gym's
``mask_mod(b, h, q_idx, kv_idx)``, for the rules that depend on positions only). It is an expression tree
built from ``I``, ``J``, integer constants, ``+ - //`` and ``abs``, comparisons, and ``& | ~``:

    causal()                   j ≤ i
    window(w, causal=True)     0 ≤ i − j < w          (bidirectional: |i − j| < w)
    sinks(s, causal=True)      j < s  (causal: and j ≤ i, a sink never shows a query its future)
    sliding_window(w, s, c)    window(w, c) | sinks(s, c)       (DESIGN.md, "Rewrites"; StreamingLLM)
    and_masks(...), or_masks(...)

One tree is rendered four ways, so a rule cannot diverge between them:

    evaluate(m, i, j)               torch tensors or ints -> bool   references, CPU kernels' mask templates
    triton(m, i, j)                 Triton source text              the generated kernels' element-wise test
    onnx(m, op, i, j)               onnxscript values               ONNX graphs
    classify(m, i0, i1, j0, j1)     (any, all) per tile             which key tiles a query tile visits, and
                                                                    which of them need no element-wise test

``classify`` evaluates the tree on intervals (the tile [i0, i1] × [j0, j1]): ``any`` is False only when no pair
in the tile is visible and ``all`` is True only when every pair is (exact for the masks above, whose terms use
i and j once each; conservative otherwise). ``//`` is floor division and takes non-negative operands.

The model's own mask (padding, biases) is data, not a rule: ``additive(mask, dtype)`` is the one conversion of a
boolean keep-mask to 0 / −inf that every kernel applies before adding it to the scores.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
from torch import Tensor


class Expr:
    """A node of a mask expression; the operators build bigger ones (``==`` stays structural equality: ``.eq``)."""

    def __add__(self, o): return Binary("+", self, lift(o))
    def __radd__(self, o): return Binary("+", lift(o), self)
    def __sub__(self, o): return Binary("-", self, lift(o))
    def __rsub__(self, o): return Binary("-", lift(o), self)
    def __floordiv__(self, o): return Binary("//", self, lift(o))
    def __abs__(self): return Unary("abs", self)
    def __lt__(self, o): return Binary("<", self, lift(o))
    def __le__(self, o): return Binary("<=", self, lift(o))
    def __gt__(self, o): return Binary(">", self, lift(o))
    def __ge__(self, o): return Binary(">=", self, lift(o))
    def eq(self, o): return Binary("==", self, lift(o))
    def __and__(self, o): return Binary("&", self, lift(o))
    def __or__(self, o): return Binary("|", self, lift(o))
    def __invert__(self): return Unary("~", self)

    def __str__(self) -> str:
        return triton(self, "i", "j")


@dataclass(frozen=True, eq=True)
class Var(Expr):
    name: str  # "i" (query position) or "j" (key position)


@dataclass(frozen=True, eq=True)
class Const(Expr):
    value: Any  # an int, or True (the mask that keeps everything)


@dataclass(frozen=True, eq=True)
class Binary(Expr):
    op: str  # + - // (integers), < <= > >= == (comparisons), & | (logic)
    a: Expr
    b: Expr


@dataclass(frozen=True, eq=True)
class Unary(Expr):
    op: str  # abs, ~
    a: Expr


I, J = Var("i"), Var("j")
KEEP_ALL = Const(True)
FLOOR = -1.0e4  # an additive mask entry at or below this hides its key (patterns.MASK_FLOOR, the same number)


def lift(x) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, bool) or not isinstance(x, int):
        raise TypeError(f"mask expressions take integer constants, not {x!r}")
    return Const(int(x))


# --------------------------------------------------------------------------- the masks


def causal() -> Expr:
    """Key j is visible from query i iff j ≤ i."""
    return J <= I


def window(w: int, causal: bool = True) -> Expr:
    """The local band: 0 ≤ i − j < w (causal) or |i − j| < w (Longformer, Mistral)."""
    d = I - J
    return (d >= 0) & (d < w) if causal else abs(d) < w


def sinks(s: int, causal: bool = True) -> Expr:
    """The first ``s`` keys (attention sinks, StreamingLLM); causal sinks also require j ≤ i."""
    return (J < s) & (J <= I) if causal else J < s


def sliding_window(w: int, s: int = 0, causal: bool = True) -> Expr:
    """``window(w) | sinks(s)``: the ``sliding_window`` rewrite's rule (DESIGN.md)."""
    band = window(w, causal)
    return band | sinks(s, causal) if s else band


def and_masks(*masks: Expr) -> Expr:
    out = KEEP_ALL
    for m in masks:
        out = m if out == KEEP_ALL else out & m
    return out


def or_masks(*masks: Expr) -> Expr:
    if not masks:
        raise ValueError("or_masks needs at least one mask")
    out = masks[0]
    for m in masks[1:]:
        out = out | m
    return out


# --------------------------------------------------------------------------- rendering


def _fold(e: Expr, leaf: Callable[[Expr], Any], ops: dict[str, Callable]) -> Any:
    if isinstance(e, (Var, Const)):
        return leaf(e)
    if isinstance(e, Binary):
        return ops[e.op](_fold(e.a, leaf, ops), _fold(e.b, leaf, ops))
    if isinstance(e, Unary):
        return ops[e.op](_fold(e.a, leaf, ops))
    raise TypeError(f"not a mask expression: {e!r}")


def _not(x):
    return ~x if isinstance(x, Tensor) else not x


_PYTHON = {"+": operator.add, "-": operator.sub, "//": operator.floordiv, "<": operator.lt, "<=": operator.le,
           ">": operator.gt, ">=": operator.ge, "==": operator.eq, "&": operator.and_, "|": operator.or_,
           "abs": abs, "~": _not}


def evaluate(m: Expr, i, j):
    """The mask at positions ``i`` and ``j`` (tensors that broadcast, e.g. [N, 1] and [1, M], or ints) -> bool."""
    def leaf(e):
        if isinstance(e, Var):
            return i if e.name == "i" else j
        if e.value is True:
            return torch.ones(torch.broadcast_shapes(_shape(i), _shape(j)), dtype=torch.bool,
                              device=_device(i, j)) if isinstance(i, Tensor) or isinstance(j, Tensor) else True
        return e.value
    return _fold(m, leaf, _PYTHON)


def _shape(x):
    return x.shape if isinstance(x, Tensor) else ()


def _device(*xs):
    return next((x.device for x in xs if isinstance(x, Tensor)), None)


def dense(m: Expr, n: int, k: int | None = None, offset: int = 0, device=None) -> Tensor:
    """The mask as a boolean [n, k] tensor over query positions offset … offset + n − 1 and keys 0 … k − 1."""
    k = n if k is None else k
    i = torch.arange(offset, offset + n, device=device)[:, None]
    j = torch.arange(k, device=device)[None]
    return torch.as_tensor(evaluate(m, i, j), device=device).expand(n, k)


def triton(m: Expr, i: str, j: str) -> str:
    """The mask as Triton (or Python) source, ``i`` and ``j`` being the expressions of the positions."""
    def leaf(e):
        if isinstance(e, Var):
            return i if e.name == "i" else j
        return "True" if e.value is True else repr(e.value)
    binary = {op: (lambda a, b, op=op: f"({a} {op} {b})") for op in ("+", "-", "//", "<", "<=", ">", ">=", "==",
                                                                         "&", "|")}
    return _fold(m, leaf, {**binary, "abs": lambda a: f"tl.abs({a})", "~": lambda a: f"({a} == 0)"})


def onnx(m: Expr, op, i, j):
    """The mask as ONNX values: ``i`` [N, 1] and ``j`` [1, M] int64 positions, ``op`` the onnxscript opset."""
    def leaf(e):
        if isinstance(e, Var):
            return i if e.name == "i" else j
        if e.value is True:
            return op.Equal(op.Add(i, j), op.Add(i, j))
        return op.Constant(value_int=e.value)
    ops = {"+": op.Add, "-": op.Sub, "//": op.Div, "<": op.Less, "<=": op.LessOrEqual, ">": op.Greater,
           ">=": op.GreaterOrEqual, "==": op.Equal, "&": op.And, "|": op.Or, "abs": op.Abs, "~": op.Not}
    return _fold(m, leaf, ops)


def _min(a, b):
    return torch.minimum(a, b) if isinstance(a, Tensor) or isinstance(b, Tensor) else min(a, b)


def _max(a, b):
    return torch.maximum(a, b) if isinstance(a, Tensor) or isinstance(b, Tensor) else max(a, b)


def _interval_ops():
    def cmp(lt):
        # must: every pair satisfies it; may: some pair does (intervals [alo, ahi] vs [blo, bhi])
        return lambda a, b: ((a[1] < b[0], a[0] < b[1]) if lt else (a[1] <= b[0], a[0] <= b[1]))

    def eq(a, b):
        must = (a[0] == a[1]) & (b[0] == b[1]) & (a[0] == b[0]) if isinstance(a[0], Tensor) or isinstance(
            b[0], Tensor) else a[0] == a[1] == b[0] == b[1]
        return must, (a[0] <= b[1]) & (b[0] <= a[1])

    def absolute(a):
        lo, hi = a
        neg_hi, neg_lo = -hi, -lo
        inner_lo = _max(_max(lo, neg_hi), 0 * lo)  # 0 when the interval straddles 0
        return inner_lo, _max(hi, neg_lo)

    def both(f):
        return lambda a, b: (f(a[0], b[0]), f(a[1], b[1]))

    return {"+": lambda a, b: (a[0] + b[0], a[1] + b[1]), "-": lambda a, b: (a[0] - b[1], a[1] - b[0]),
            "//": lambda a, b: (a[0] // b[1], a[1] // b[0]), "<": cmp(True), "<=": cmp(False),
            ">": lambda a, b: cmp(True)(b, a), ">=": lambda a, b: cmp(False)(b, a), "==": eq,
            "&": both(operator.and_), "|": both(operator.or_), "abs": absolute,
            "~": lambda a: (_not(a[1]), _not(a[0]))}


_INTERVAL = _interval_ops()


def classify(m: Expr, i0, i1, j0, j1):
    """(any, all) of the mask over the tile of queries i0 … i1 and keys j0 … j1 (inclusive; tensors broadcast).

    ``any`` is False only if no pair is visible, ``all`` True only if every pair is (see the module docstring)."""
    def leaf(e):
        if isinstance(e, Var):
            return (i0, i1) if e.name == "i" else (j0, j1)
        if e.value is True:
            return True, True
        return e.value, e.value
    must, may = _fold(m, leaf, _INTERVAL)
    return may, must


def tile_tables(m: Expr, n: int, k: int, block_q: int, block_k: int, device=None):
    """Index tables of the key tiles each query tile must visit: (counts [nqb], indices [nqb, W], full [nqb, W]).

    ``full`` marks tiles where every pair is visible (no element-wise test needed). Padding slots repeat the last
    visited tile, so a gather never goes out of range; ``counts`` says which slots are real."""
    nqb, nkb = -(-n // block_q), -(-k // block_k)
    qs = torch.arange(nqb, device=device)[:, None] * block_q
    ks = torch.arange(nkb, device=device)[None] * block_k
    q_last = torch.clamp(qs + block_q - 1, max=n - 1)
    k_last = torch.clamp(ks + block_k - 1, max=k - 1)
    any_, all_ = classify(m, qs, q_last, ks, k_last)
    any_ = torch.as_tensor(any_, device=device).expand(nqb, nkb)
    all_ = torch.as_tensor(all_, device=device).expand(nqb, nkb)
    counts = any_.sum(-1)
    width = max(1, int(counts.max()) if counts.numel() else 1)
    order = torch.argsort((~any_).to(torch.int8), dim=-1, stable=True)[:, :width]  # visited tiles first, in order
    last = order.gather(1, (counts - 1).clamp(min=0)[:, None])
    slot = torch.arange(width, device=device)[None]
    indices = torch.where(slot < counts[:, None], order, last)
    full = all_.gather(1, indices) & (slot < counts[:, None])
    return counts.to(torch.int32), indices.to(torch.int32), full


def additive(mask: Optional[Tensor], dtype) -> Optional[Tensor]:
    """The model's mask as an additive float mask: a boolean keep-mask becomes 0 (kept) / −inf (hidden)."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(~mask, float("-inf"))
    return mask.to(dtype)


__all__ = ["Expr", "I", "J", "KEEP_ALL", "causal", "window", "sinks", "sliding_window", "and_masks", "or_masks",
           "evaluate", "dense", "triton", "onnx", "classify", "tile_tables", "additive"]
