"""ONNX translation of ``attnforge::engram_embed``."""
from __future__ import annotations

from ..onnx import ints as _ints
from .hashing import offsets as _offsets


def engram_embed_onnx(op, ids, table, multipliers, ngram, heads, primes, pad_id):
    """int64 Pad/Slice (shifts), Mul, BitwiseXor, Mod and Add (rows), then one Gather from the table."""
    x = op.Cast(ids, to=7)  # 7: INT64
    n_ctx = op.Shape(x, start=-1)
    pad = op.Constant(value_int=pad_id)
    shifted = [x] + [op.Slice(op.Pad(x, op.Concat(_ints(op, *[0] * (len(ids.shape) - 1), k),
                                                  _ints(op, *[0] * len(ids.shape)), axis=0), pad),
                              _ints(op, 0), n_ctx, _ints(op, -1)) for k in range(1, max(ngram))]
    offsets, rows = _offsets(primes), []
    for i, n in enumerate(ngram):
        mix = op.Mul(shifted[0], op.Constant(value_int=multipliers[0]))
        for k in range(1, n):
            mix = op.BitwiseXor(mix, op.Mul(shifted[k], op.Constant(value_int=multipliers[k])))
        heads_of_n = slice(i * heads, (i + 1) * heads)
        rows.append(op.Add(op.Mod(op.Unsqueeze(mix, _ints(op, -1)), _ints(op, *primes[heads_of_n])),
                           _ints(op, *offsets[heads_of_n])))
    picked = op.Gather(table, op.Concat(*rows, axis=-1), axis=0)  # [..., N, H, dim]
    width = len(ngram) * heads * table.shape[1]
    return op.Reshape(picked, op.Concat(op.Shape(x), _ints(op, width), axis=0))
