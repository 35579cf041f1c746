"""The PyTorch kernel of ``attnforge::block_sparse_attention``: the layout's tables, gathered (runtime/blockwise.py)."""
from __future__ import annotations

from attnforge.codegen import masks

from ..blockwise import attend_tables
from .layout import block_tables


def block_sparse_cpu(q, k, v, mask, scale, block, local, global_, random, seed, topk, causal):
    counts, idx = block_tables(q, k, block, local, global_, random, seed, topk, scale, causal)
    return attend_tables(q, k, v, mask, scale, counts, idx, block, masks.causal() if causal else None)
