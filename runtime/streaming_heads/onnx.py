"""ONNX translation of ``attnforge::streaming_heads_attention``: one boolean keep per query head, into
MatMul/Where/Softmax."""
from __future__ import annotations

import numpy as np

from attnforge.codegen import masks

from ..onnx import masked_attention, positions
from .heads import head_sets


def streaming_heads_onnx(op, q, k, v, mask, scale, retrieval, window, sinks, causal):
    """keep [H, N, M] = (retrieval head [H, 1, 1] ∧ the full rule) ∨ (streaming head ∧ the window rule), both rules
    rendered on Range-built positions (codegen/masks.py), ANDed with the model's mask in ``masked_attention``."""
    import onnx.numpy_helper as nh

    heads = q.shape[-3]
    if not isinstance(heads, int):
        raise ValueError("streaming_heads exports with a static number of heads")
    sets = head_sets(retrieval, heads, k.shape[-3] if isinstance(k.shape[-3], int) else None)
    i, j = positions(op, q, k)
    full = masks.onnx(masks.causal() if causal else masks.KEEP_ALL, op, i, j)
    band = masks.onnx(masks.sliding_window(window, sinks, causal), op, i, j)
    if not sets.streaming_q:
        keep = full
    elif not sets.retrieval_q:
        keep = band
    else:
        per_head = np.zeros((heads, 1, 1), dtype=np.bool_)
        per_head[list(sets.retrieval_q)] = True
        flags = op.Constant(value=nh.from_array(per_head))  # (onnxruntime has no Where over bools: And/Or)
        keep = op.Or(op.And(flags, full), op.And(op.Not(flags), band))
    return masked_attention(op, q, k, v, mask, scale, keep)
