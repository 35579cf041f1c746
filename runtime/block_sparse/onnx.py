"""ONNX translation of ``attnforge::block_sparse_attention``."""
from __future__ import annotations

import torch

from attnforge.codegen import masks

from ..onnx import const, masked_attention, positions, repeat_kv
from .layout import dense_block_mask, static_layout


def block_sparse_onnx(op, q, k, v, mask, scale, block, local, global_, random, seed, topk, causal):
    """Static layouts: the index table as a constant boolean mask (shapes are static at export).
    Top-k layouts: pooled scores, TopK and ScatterElements rebuild the table inside the graph."""
    import onnx.numpy_helper as nh

    n = q.shape[-2]
    if not isinstance(n, int) or n % block:
        raise ValueError("block_sparse exports with a static sequence length that the block divides")
    nb = n // block
    if topk == 0:
        counts, idx = static_layout(nb, local, global_, random, seed, causal)
        keep = dense_block_mask(counts, idx, n, block, causal).numpy()
        return masked_attention(op, q, k, v, mask, scale, op.Constant(value=nh.from_array(keep)))
    kk = repeat_kv(op, k, q.shape[-3] // k.shape[-3])
    pooled_shape = op.Constant(value_ints=[0, 0, nb, block, q.shape[-1]])
    qm = op.ReduceMean(op.Reshape(q, pooled_shape), op.Constant(value_ints=[3]), keepdims=0)
    km = op.ReduceMean(op.Reshape(kk, pooled_shape), op.Constant(value_ints=[3]), keepdims=0)
    scores = op.Mul(op.MatMul(qm, op.Transpose(km, perm=[0, 1, 3, 2])), const(op, scale, q))
    i = torch.arange(nb)
    if causal:
        scores = op.Where(op.Constant(value=nh.from_array((i[None] <= i[:, None]).numpy())), scores,
                          const(op, float("-inf"), q))
    forced = ((i[None] == i[:, None]) | (i[None] == 0)).numpy()
    scores = op.Where(op.Constant(value=nh.from_array(forced)), const(op, float("inf"), q), scores)
    values, indices = op.TopK(scores, op.Constant(value_ints=[min(topk + 2, nb)]), axis=-1)
    kept = op.Cast(op.Greater(values, const(op, float("-inf"), q)), to=1)
    blocks = op.ScatterElements(op.ConstantOfShape(op.Shape(scores)), indices, kept, axis=-1, reduction="max")
    dense = op.Reshape(op.Expand(op.Reshape(blocks, op.Constant(value_ints=[0, 0, nb, 1, nb, 1])),
                                 op.Constant(value_ints=[1, 1, 1, block, 1, block])),
                       op.Constant(value_ints=[0, 0, n, n]))
    keep = op.Cast(dense, to=9)  # 9: BOOL
    if causal:
        keep = op.And(keep, masks.onnx(masks.causal(), op, *positions(op, q, k)))
    return masked_attention(op, q, k, v, mask, scale, keep)
