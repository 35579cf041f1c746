"""ONNX translation of ``attnforge::attention``."""
from __future__ import annotations

from ..onnx import attention_composed, is_bool


def attention_onnx(op, q, k, v, mask, scale, causal, dropout_p, softcap=0.0):
    """opset >= 23: one ``Attention`` node (GQA from the K/V head count; its ``softcap`` attribute); else, or when a
    mask and ``causal`` come together (Attention takes one of them), the MatMul/Where/Softmax composition."""
    if dropout_p:
        raise ValueError(f"dropout_p={dropout_p} has no inference-time ONNX form")
    rank, groups, queries = len(q.shape), q.shape[-3] // k.shape[-3], q.shape[-2]
    if rank == 3:  # [B·H, N, D] spellings run as one batch of B·H heads
        q, k, v = (op.Unsqueeze(t, [0]) for t in (q, k, v))
    if op.version >= 23 and rank in (3, 4) and not (causal and mask is not None):
        if mask is not None and not is_bool(mask):
            mask = op.CastLike(mask, q)
        if mask is not None and (mask.shape is None or len(mask.shape) < 2 or mask.shape[-2] != queries):
            # onnxruntime wants the query dim spelled out: broadcast [.., 1, M] to [.., N, M]
            mask = op.Expand(mask, op.Concat(op.Shape(q, start=-2, end=-1), op.Shape(mask, start=-1), axis=0))
        y, *_ = op.Attention(q, k, v, mask, scale=float(scale), is_causal=int(causal), softcap=float(softcap))
    else:
        y = attention_composed(op, q, k, v, mask, scale, causal, 4 if rank == 3 else rank, groups, softcap)
    return op.Squeeze(y, [0]) if rank == 3 else y
