"""ONNX translation of ``attnforge::linear_attention``: the quadratic masked form (the reference's)."""
from __future__ import annotations

import math

from attnforge.codegen import masks

from ..onnx import const, positions, repeat_kv
from .features import EXP_KERNELS


def phi_onnx(op, x, name, scale, w):
    """φ(x) in ONNX ops (cosine's constant feature is added to the kernel matrix instead)."""
    if name == "elu":
        return op.Add(op.Elu(x, alpha=1.0), const(op, 1.0, x))
    if name == "relu":
        return op.Relu(x)
    if name == "cosine":
        norm = op.Max(op.Sqrt(op.ReduceSum(op.Mul(x, x), op.Constant(value_ints=[-1]), keepdims=1)),
                      const(op, 1e-12, x))
        return op.Div(x, norm)
    if name == "performer":
        xs = op.Mul(x, const(op, math.sqrt(scale), x))
        half_norm = op.Div(op.ReduceSum(op.Mul(xs, xs), op.Constant(value_ints=[-1]), keepdims=1), const(op, 2.0, x))
        return op.Mul(op.Exp(op.Sub(op.MatMul(xs, w), half_norm)), const(op, w.shape[-1] ** -0.5, x))
    y = op.MatMul(x, w)  # hedgehog
    return op.Concat(op.Softmax(y, axis=-1), op.Softmax(op.Neg(y), axis=-1), axis=-1)


def linear_attention_onnx(op, q, k, v, key_mask, scale, feature_map, causal, window, eps, wq, wk, mix):
    """Kernel matrix A = φ(Q)φ(K)ᵀ (taylor: 1 + u + u²/2 from Q Kᵀ), masked by causality, the key mask and
    (hybrid) the window, whose softmax weights are added; then (A V) / (rowsum A + eps). Quadratic in N."""
    if len(q.shape) != 4:
        raise ValueError("linear_attention exports [B, H, N, D] inputs")
    groups = q.shape[-3] // k.shape[-3]
    perm = [0, 1, 3, 2]
    if feature_map == "taylor":
        u = op.Mul(op.MatMul(q, op.Transpose(repeat_kv(op, k, groups), perm=perm)), const(op, scale, q))
        a = op.Add(op.Add(const(op, 1.0, q), u), op.Mul(op.Mul(u, u), const(op, 0.5, q)))
    else:
        fq, fk = phi_onnx(op, q, feature_map, scale, wq), phi_onnx(op, k, feature_map, scale, wk)
        a = op.MatMul(fq, op.Transpose(repeat_kv(op, fk, groups), perm=perm))
        if feature_map == "cosine":
            a = op.Add(a, const(op, 1.0, q))
    i, j = positions(op, q, k)
    visible = masks.onnx(masks.causal() if causal else masks.KEEP_ALL, op, i, j)
    if key_mask is not None:
        visible = op.And(visible, op.Unsqueeze(key_mask, [-2]))
    zeros = const(op, 0.0, q)
    if window == 0:
        weight = op.Where(visible, a, zeros)
    else:
        band = masks.onnx(masks.window(window, causal), op, i, j)
        in_band, far = op.And(visible, band), op.And(visible, op.Not(band))
        s = op.Mul(op.MatMul(q, op.Transpose(repeat_kv(op, k, groups), perm=perm)), const(op, scale, q))
        s = op.Where(in_band, s, const(op, -math.inf, q))
        m = op.ReduceMax(s, op.Constant(value_ints=[-1]), keepdims=1)
        m = op.Where(op.IsInf(m), zeros, m)
        e = op.Where(in_band, op.Exp(op.Sub(s, m)), zeros)
        gamma = op.Reshape(op.Exp(op.CastLike(mix, q)), op.Constant(value_ints=[-1, 1, 1]))
        rest = op.Where(far, a, zeros)
        if feature_map in EXP_KERNELS:
            rest = op.Mul(rest, op.Exp(op.Neg(m)))
        weight = op.Add(op.Mul(gamma, e), rest)
    num = op.MatMul(weight, repeat_kv(op, v, groups))
    den = op.Add(op.ReduceSum(weight, op.Constant(value_ints=[-1]), keepdims=1), const(op, eps, q))
    return op.Div(num, den)
