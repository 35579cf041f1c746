"""ONNX translation of ``attnforge::sliding_window_attention``: the window predicate rendered on positions."""
from __future__ import annotations

from attnforge.codegen import masks

from ..onnx import predicate_attention


def sliding_window_onnx(op, q, k, v, mask, scale, window, sinks, causal):
    """Boolean window(+sinks) keep from Range/Sub/Less on the positions, into MatMul/Where/Softmax."""
    return predicate_attention(op, q, k, v, mask, scale, masks.sliding_window(window, sinks, causal))
