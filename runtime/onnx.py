"""ONNX translations of the ``attnforge`` ops, ONNX export of rewritten graphs and an onnxruntime run.

A variant registers how its op becomes standard ONNX with ``@onnx_translation(torch.ops.attnforge.X.default)``
on a function ``fn(op, *op_args)``: ``op`` is the onnxscript opset being exported to (``op.version``), the
tensor arguments are onnxscript values and the others plain Python values, in the op's schema order.
``export_onnx`` hands the registry to ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``.
"""
from __future__ import annotations

import contextlib
import functools
import io
import logging
import math
import re
import warnings
from pathlib import Path
from typing import Callable

import torch
import torch.utils._pytree as pytree
from torch._ops import OpOverload

ONNX_TRANSLATIONS: dict[OpOverload, Callable] = {}


class ExportError(RuntimeError):
    """The graph could not be exported to ONNX; the message names the op that could not be translated."""


class _TranslationFailed(Exception):
    """Raised inside the exporter by a translation, so the op's name survives torch.onnx's own wrapping."""


def onnx_translation(op: OpOverload):
    """Decorator: register ``fn(op, *args)`` as the ONNX translation of the custom op ``op``."""

    def register(fn):
        ONNX_TRANSLATIONS[op] = fn
        return fn

    return register


def translation_table(opset: int) -> dict:
    """``custom_translation_table`` for ``torch.onnx.export`` at ``opset``: each translation bound to that opset."""
    import onnxscript.onnx_opset

    ops = getattr(onnxscript.onnx_opset, f"opset{opset}")

    def bind(target, fn):
        @functools.wraps(fn, assigned=("__name__", "__doc__"))
        def translate(*args, **kwargs):
            try:
                return fn(ops, *args, **kwargs)
            except Exception as e:  # noqa: BLE001 - re-raised with the op's name
                raise _TranslationFailed(f"{target.name()}: {type(e).__name__}: {e}") from e

        return translate

    return {target: bind(target, fn) for target, fn in ONNX_TRANSLATIONS.items()}


# --------------------------------------------------------------------------- attnforge::attention


def _const(op, value: float, like):
    return op.CastLike(op.Constant(value_float=value), like)


def _is_bool(x) -> bool:
    return x.dtype is not None and x.dtype.name == "BOOL"


def _ints(op, *values: int):
    return op.Constant(value_ints=list(values))


def _repeat_kv(op, x, groups: int):
    """[..., Hkv, M, D] -> [..., Hkv·groups, M, D]: query head h reads key/value head h // groups."""
    if groups == 1:
        return x
    expanded = op.Expand(op.Unsqueeze(x, [-3]),
                         op.Concat(op.Shape(x, end=-2), _ints(op, groups), op.Shape(x, start=-2), axis=0))
    return op.Reshape(expanded, op.Concat(op.Shape(x, end=-3), _ints(op, -1), op.Shape(x, start=-2), axis=0))


def _attention_composed(op, q, k, v, mask, scale, causal, rank: int, groups: int):
    """softmax(scale · q kᵀ + mask) v from MatMul/Where/Softmax, for q of ``rank`` and any group size."""
    k, v = _repeat_kv(op, k, groups), _repeat_kv(op, v, groups)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=perm)), _const(op, scale, q))
    hidden = _const(op, -math.inf, scores)
    if mask is not None:
        scores = op.Where(mask, scores, hidden) if _is_bool(mask) else op.Add(scores, op.CastLike(mask, scores))
    if causal:  # key j visible from query i iff j <= i (upper-left aligned, as in SDPA)
        ones = op.Expand(op.Constant(value_float=1.0),
                         op.Concat(op.Shape(q, start=-2, end=-1), op.Shape(k, start=-2, end=-1), axis=0))
        scores = op.Where(op.Cast(op.Trilu(ones, upper=0), to=9), scores, hidden)  # 9: BOOL
    return op.MatMul(op.Softmax(scores, axis=-1), v)


@onnx_translation(torch.ops.attnforge.attention.default)
def attention_onnx(op, q, k, v, mask, scale, causal, dropout_p):
    """opset >= 23: one ``Attention`` node (GQA from the K/V head count); else, or when a mask and
    ``causal`` come together (Attention takes one of them), the MatMul/Where/Softmax composition."""
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p} has no inference-time ONNX form")
    rank, groups, queries = len(q.shape), q.shape[-3] // k.shape[-3], q.shape[-2]
    if rank == 3:  # [B·H, N, D] spellings run as one batch of B·H heads
        q, k, v = (op.Unsqueeze(t, [0]) for t in (q, k, v))
    if op.version >= 23 and rank in (3, 4) and not (causal and mask is not None):
        if mask is not None and not _is_bool(mask):
            mask = op.CastLike(mask, q)
        if mask is not None and (mask.shape is None or len(mask.shape) < 2 or mask.shape[-2] != queries):
            # onnxruntime wants the query dim spelled out: broadcast [.., 1, M] to [.., N, M]
            mask = op.Expand(mask, op.Concat(op.Shape(q, start=-2, end=-1), op.Shape(mask, start=-1), axis=0))
        y, *_ = op.Attention(q, k, v, mask, scale=float(scale), is_causal=int(causal))
    else:
        y = _attention_composed(op, q, k, v, mask, scale, causal, 4 if rank == 3 else rank, groups)
    return op.Squeeze(y, [0]) if rank == 3 else y


# --------------------------------------------------------------------------- attnforge::ffn


def _gelu(op, x, approximate: str):
    if op.version >= 20:
        return op.Gelu(x, approximate=approximate)
    if approximate == "tanh":
        inner = op.Mul(op.Add(x, op.Mul(op.Mul(op.Mul(x, x), x), 0.044715)), math.sqrt(2 / math.pi))
        return op.Mul(op.Mul(x, 0.5), op.Add(op.Tanh(inner), 1.0))
    return op.Mul(op.Mul(x, 0.5), op.Add(op.Erf(op.Mul(x, 1 / math.sqrt(2))), 1.0))


ONNX_ACTIVATIONS: dict[str, Callable] = {  # runtime/activations.py's names, in standard ONNX ops
    "relu": lambda op, x: op.Relu(x),
    "gelu": lambda op, x: _gelu(op, x, "none"),
    "gelu_tanh": lambda op, x: _gelu(op, x, "tanh"),
    "silu": lambda op, x: op.Mul(x, op.Sigmoid(x)),
    "quick_gelu": lambda op, x: op.Mul(x, op.Sigmoid(op.Mul(x, 1.702))),
    "sigmoid": lambda op, x: op.Sigmoid(x),
    "tanh": lambda op, x: op.Tanh(x),
    "relu2": lambda op, x: op.Mul(op.Relu(x), op.Relu(x)),
    "mish": lambda op, x: op.Mish(x),
    "leaky_relu": lambda op, x: op.LeakyRelu(x, alpha=0.01),
    "elu": lambda op, x: op.Elu(x, alpha=1.0),
    "softplus": lambda op, x: op.Softplus(x),
    "hardswish": lambda op, x: op.HardSwish(x),
}


@onnx_translation(torch.ops.attnforge.ffn.default)
def ffn_onnx(op, x, w_up, b_up, w_down, b_down, w_gate, b_gate, activation, layout):
    """MatMul (+Add) projections around the activation; W is transposed for the nn.Linear layout."""
    if activation not in ONNX_ACTIVATIONS:
        raise ValueError(f"activation {activation!r} has no ONNX translation")
    act = ONNX_ACTIVATIONS[activation]

    def project(h, w, b):
        y = op.MatMul(h, op.Transpose(w, perm=[1, 0]) if layout == "out_in" else w)
        return y if b is None else op.Add(y, b)

    up = project(x, w_up, b_up)
    h = act(op, up) if w_gate is None else op.Mul(act(op, project(x, w_gate, b_gate)), up)
    return project(h, w_down, b_down)


# --------------------------------------------------------------------------- export and run


def untranslated_ops(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the ``attnforge`` ops in ``gm`` that have no ONNX translation."""
    return sorted({n.target.name() for n in gm.graph.nodes if n.op == "call_function"
                   and isinstance(n.target, OpOverload) and n.target.namespace == "attnforge"
                   and n.target not in ONNX_TRANSLATIONS})


def export_onnx(gm: torch.nn.Module, args: tuple, kwargs: dict, path: str | Path, opset: int = 23) -> Path:
    """Export ``gm`` with its ``attnforge`` ops translated; raise ``ExportError`` naming the op that failed."""
    missing = untranslated_ops(gm) if isinstance(gm, torch.fx.GraphModule) else []
    if missing:
        raise ExportError(f"ONNX export failed: no ONNX translation for {', '.join(missing)}")
    if opset < 18:
        raise ExportError(f"ONNX export failed: opset {opset} is below 18, the lowest torch.onnx (dynamo) writes")
    try:
        with _quiet():
            program = torch.onnx.export(gm, tuple(args), kwargs=dict(kwargs), dynamo=True, opset_version=opset,
                                        custom_translation_table=translation_table(opset), verbose=False)
    except Exception as e:  # noqa: BLE001 - the cause names the op
        raise ExportError("ONNX export failed: " + _export_failure(e)) from e
    path = Path(path)
    program.save(str(path))
    return path


@contextlib.contextmanager
def _quiet():
    """Silence the exporter's progress lines, logging and warnings ("training mode" for ep.module() graphs)."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()), \
                warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _export_failure(e: BaseException) -> str:
    """Name the op that failed, from our own translation error or torch.onnx's dispatch/conversion errors."""
    chain, cur = [], e
    while cur is not None and len(chain) < 20:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    failed = next((c for c in chain if isinstance(c, _TranslationFailed)), None)
    if failed is not None:
        return f"could not translate {failed}"
    text = "\n".join(str(c) for c in chain)
    op = re.search(r"OpOverload\(op='([^']+)', overload='([^']+)'\)", text)
    node = re.search(r"target=torch\.ops\.([\w.]+)", text)
    name = ".".join(op.groups()) if op else node.group(1) if node else None
    cause = str(chain[-1]).strip().splitlines()[0][:300] if str(chain[-1]).strip() else type(chain[-1]).__name__
    return f"could not translate {name}: {cause}" if name else f"{type(e).__name__}: {cause}"


def run_onnx(path: str | Path, args: tuple, kwargs: dict, like):
    """Run the ONNX file in onnxruntime (CPU) on ``args``/``kwargs``; outputs in the pytree structure of ``like``."""
    import onnxruntime as ort

    flat = [x for x in pytree.tree_leaves((tuple(args), dict(kwargs))) if x is not None]
    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        feed = {i.name: (x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x)
                for i, x in zip(session.get_inputs(), flat)}
        outs = iter(torch.from_numpy(o) for o in session.run(None, feed))
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors, first line kept
        raise ExportError(f"onnxruntime could not run {path}: {str(e).strip().splitlines()[0][:500]}") from None
    leaves, spec = pytree.tree_flatten(like)
    return pytree.tree_unflatten([next(outs) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
