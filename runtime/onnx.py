"""ONNX translations of the ``attnforge`` ops, ONNX export of rewritten graphs and an onnxruntime run.

Each variant declares how its op becomes standard ONNX (``Variant.onnx``, runtime/registry.py): a function
``fn(op, *op_args)`` where ``op`` is the onnxscript opset being exported to (``op.version``), the tensor arguments
are onnxscript values and the others plain Python values, in the op's schema order. ``export_onnx`` hands the
registry's translations to ``torch.onnx.export(..., dynamo=True, custom_translation_table=...)``. The helpers
below are what the translations share (the attention composition, positions, masks rendered as ONNX).
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

from attnforge.codegen import masks
from attnforge.errors import ExportError

from .registry import VARIANTS

__all__ = ["ExportError", "export_onnx", "run_onnx", "translations", "translation_table", "untranslated_ops"]


class _TranslationFailed(Exception):
    """Raised inside the exporter by a translation, so the op's name survives torch.onnx's own wrapping."""


def translations() -> dict[OpOverload, Callable]:
    """{op overload: its translation} for every registered variant that has one."""
    return {v.op: v.onnx for v in VARIANTS.values() if v.onnx is not None}


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

    return {target: bind(target, fn) for target, fn in translations().items()}


# --------------------------------------------------------------------------- helpers the translations share


def const(op, value: float, like):
    """A float constant in ``like``'s dtype."""
    return op.CastLike(op.Constant(value_float=value), like)


def is_bool(x) -> bool:
    return x.dtype is not None and x.dtype.name == "BOOL"


def ints(op, *values: int):
    return op.Constant(value_ints=list(values))


def repeat_kv(op, x, groups: int):
    """[..., Hkv, M, D] -> [..., Hkv·groups, M, D]: query head h reads key/value head h // groups."""
    if groups == 1:
        return x
    expanded = op.Expand(op.Unsqueeze(x, [-3]),
                         op.Concat(op.Shape(x, end=-2), ints(op, groups), op.Shape(x, start=-2), axis=0))
    return op.Reshape(expanded, op.Concat(op.Shape(x, end=-3), ints(op, -1), op.Shape(x, start=-2), axis=0))


def attention_composed(op, q, k, v, mask, scale, causal, rank: int, groups: int, softcap: float = 0.0):
    """softmax(scale · q kᵀ + mask) v from MatMul/Where/Softmax, for q of ``rank`` and any group size; scores
    soft-capped to c · tanh(s / c) first when ``softcap`` c > 0."""
    k, v = repeat_kv(op, k, groups), repeat_kv(op, v, groups)
    perm = list(range(rank - 2)) + [rank - 1, rank - 2]
    scores = op.Mul(op.MatMul(q, op.Transpose(k, perm=perm)), const(op, scale, q))
    if softcap:
        scores = op.Mul(op.Tanh(op.Div(scores, const(op, softcap, q))), const(op, softcap, q))
    hidden = const(op, -math.inf, scores)
    if mask is not None:
        scores = op.Where(mask, scores, hidden) if is_bool(mask) else op.Add(scores, op.CastLike(mask, scores))
    if causal:  # key j visible from query i iff j <= i (upper-left aligned, as in SDPA)
        i, j = positions(op, q, k)
        scores = op.Where(masks.onnx(masks.causal(), op, i, j), scores, hidden)
    return op.MatMul(op.Softmax(scores, axis=-1), v)


def positions(op, q, k):
    """(i [N, 1], j [1, M]) int64 query and key positions, from the lengths of q and k."""
    zero, one = op.Constant(value_int=0), op.Constant(value_int=1)
    n = op.Squeeze(op.Shape(q, start=-2, end=-1), [0])
    m = op.Squeeze(op.Shape(k, start=-2, end=-1), [0])
    return op.Unsqueeze(op.Range(zero, n, one), [1]), op.Unsqueeze(op.Range(zero, m, one), [0])


def masked_attention(op, q, k, v, mask, scale, keep):
    """The attention composition with a boolean ``keep`` [.., N, M] ANDed into the model's own mask (the ONNX
    form of every sparse variant: ``keep`` is a mask predicate rendered by ``masks.onnx``, or a constant)."""
    extra = None
    if mask is not None:
        if is_bool(mask):
            keep = op.And(keep, mask)
        else:
            extra = mask
    additive = op.Where(keep, const(op, 0.0, q), const(op, float("-inf"), q))
    if extra is not None:
        additive = op.Add(additive, op.CastLike(extra, q))
    return attention_composed(op, q, k, v, additive, scale, False, len(q.shape), q.shape[-3] // k.shape[-3])


def predicate_attention(op, q, k, v, mask, scale, predicate):
    """``masked_attention`` under a mask predicate (codegen/masks.py) rendered on the query/key positions."""
    i, j = positions(op, q, k)
    return masked_attention(op, q, k, v, mask, scale, masks.onnx(predicate, op, i, j))


# --------------------------------------------------------------------------- export and run


def untranslated_ops(gm: torch.fx.GraphModule) -> list[str]:
    """Names of the ``attnforge`` ops in ``gm`` that have no ONNX translation."""
    return sorted({n.target.name() for n in gm.graph.nodes if n.op == "call_function"
                   and isinstance(n.target, OpOverload) and n.target.namespace == "attnforge"
                   and n.target not in translations()})


def export_onnx(gm: torch.nn.Module, args: tuple, kwargs: dict, path: str | Path, opset: int = 23, *,
                dynamic: bool = True, output_names: list[str] | None = None, notes: list | None = None) -> Path:
    """Export ``gm`` with its ``attnforge`` ops translated; raise ``ExportError`` naming the op that failed.

    A graph captured by attnforge (``gm.meta["attnforge_form"]``) takes the call ``args``/``kwargs`` of the
    model: its tensor inputs become the ONNX inputs, named as the model's parameters (``input_ids``,
    ``attention_mask``), with the dims the capture kept symbolic (batch, sequence) dynamic unless ``dynamic`` is
    False; a graph that cannot export with them (a static block-sparse layout needs its length) is exported with
    static shapes, and ``notes`` gets why. ``output_names`` names the outputs in order (e.g. ``logits``)."""
    missing = untranslated_ops(gm) if isinstance(gm, torch.fx.GraphModule) else []
    if missing:
        raise ExportError(f"ONNX export failed: no ONNX translation for {', '.join(missing)}")
    if opset < 18:
        raise ExportError(f"ONNX export failed: opset {opset} is below 18, the lowest torch.onnx (dynamo) writes")
    form = gm.meta.get("attnforge_form") if isinstance(gm, torch.fx.GraphModule) else None
    names, shapes = None, None
    if form is not None:
        args, kwargs, names = tuple(form.inputs(tuple(args), dict(kwargs))), {}, list(form.tensors)
        if dynamic:
            shapes = _dynamic_dims(gm, names)
    def export(dynamic_shapes):
        return dynamo_export(gm, args, opset, kwargs=dict(kwargs), input_names=names, output_names=output_names,
                             dynamic_shapes=dynamic_shapes)

    try:
        try:
            program = export(shapes)
        except Exception as e:  # noqa: BLE001
            if shapes is None:
                raise
            program = export(None)
            if notes is not None:
                notes.append(f"exported with the example's static shapes: with dynamic ones, {export_failure(e)}")
    except Exception as e:  # noqa: BLE001 - the cause names the op
        raise ExportError("ONNX export failed: " + export_failure(e)) from e
    path = Path(path)
    save(program, path)
    return path


def dynamo_export(gm: torch.nn.Module, args: tuple, opset: int, **options):
    """``torch.onnx.export`` (dynamo) of ``gm`` with the ``attnforge`` ops translated for ``opset``, its logging
    silenced; ``options`` are torch.onnx.export's (names, dynamic shapes). Raises what torch raises:
    ``export_failure`` says it in one line."""
    # optimize=False: onnxscript's rotary fusion writes RotaryEmbedding nodes that onnxruntime rejects once the
    # batch is dynamic (cos/sin caches of batch 1)
    with _quiet():
        return torch.onnx.export(gm, tuple(args), dynamo=True, opset_version=opset, verbose=False, optimize=False,
                                 custom_translation_table=translation_table(opset), **options)


def save(program, path) -> None:
    """Write an exported program, marked as attnforge's (``metadata_props["producer"]``: the CLI overwrites
    such a file from an earlier run without ``--force``, tools/outputs.py)."""
    program.model.metadata_props["producer"] = "attnforge"
    program.save(str(path))


def _dynamic_dims(gm: torch.fx.GraphModule, names: list[str]) -> dict:
    """{input: {dim: Dim.AUTO}} for the dims that are symbolic in the captured graph."""
    holders = {n.name: n.meta.get("val") for n in gm.graph.nodes if n.op == "placeholder"}
    out = {}
    for name in names:
        v = holders.get(name)
        dims = {i: torch.export.Dim.AUTO for i, d in enumerate(getattr(v, "shape", ()))
                if isinstance(d, torch.SymInt) and not d.node.expr.is_number}
        out[name] = dims or None
    return out


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


def export_failure(e: BaseException) -> str:
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
    """Run the ONNX file in onnxruntime (CPU) on ``args``/``kwargs`` (keyword tensors fed to the inputs of their
    name, the positional ones to the rest in order); outputs in the pytree structure of ``like``."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [i.name for i in session.get_inputs()]
        feed = {k: v for k, v in kwargs.items() if k in names and isinstance(v, torch.Tensor)}
        rest = [x for x in pytree.tree_leaves((tuple(args), {k: v for k, v in kwargs.items() if k not in feed}))
                if isinstance(x, torch.Tensor)]
        feed.update(zip([n for n in names if n not in feed], rest))
        feed = {k: v.detach().cpu().numpy() for k, v in feed.items()}
        outs = iter(torch.from_numpy(o) for o in session.run(None, feed))
    except Exception as e:  # noqa: BLE001 - onnxruntime's own errors, first line kept
        raise ExportError(f"onnxruntime could not run {path}: {str(e).strip().splitlines()[0][:500]}") from None
    leaves, spec = pytree.tree_flatten(like)
    return pytree.tree_unflatten([next(outs) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
