"""ONNX translation of ``attnforge::memory_layer``."""
from __future__ import annotations

from ..onnx import ints as _ints


def memory_layer_onnx(op, x, table, bias, tau):
    """Sign bits (GreaterOrEqual, Cast) weighted by powers of two and summed to rows, Gather of the rows,
    ReduceSum of the rows times ReduceProd(Sigmoid(2|z|)). Needs a static feature dim."""
    d = x.shape[-1]
    if not isinstance(d, int):
        raise ValueError("memory_layer exports with a static feature dim")
    k = d // tau
    z = op.Reshape(x, op.Concat(op.Shape(x, end=-1), _ints(op, k, tau), axis=0))
    bits = op.Cast(op.GreaterOrEqual(z, op.CastLike(op.Constant(value_float=0.0), x)), to=7)  # 7: INT64
    place = _ints(op, *[2 ** (tau - 1 - j) for j in range(tau)])
    last = _ints(op, -1)
    rows = op.Add(op.ReduceSum(op.Mul(bits, place), last, keepdims=0), _ints(op, *[i * 2 ** tau for i in range(k)]))
    w = op.ReduceProd(op.Sigmoid(op.Mul(op.Abs(z), op.CastLike(op.Constant(value_float=2.0), x))), last, keepdims=0)
    picked = op.Gather(table, rows, axis=0)  # [..., K, d_out]
    y = op.ReduceSum(op.Mul(picked, op.Unsqueeze(op.CastLike(w, table), last)), _ints(op, -2), keepdims=0)
    y = op.CastLike(y, x)
    return y if bias is None else op.Add(y, op.CastLike(bias, x))
