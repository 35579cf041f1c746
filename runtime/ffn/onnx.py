"""ONNX translation of ``attnforge::ffn``."""
from __future__ import annotations

from .activations import ONNX_ACTIVATIONS


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
