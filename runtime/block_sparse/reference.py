"""The plain definition of ``attnforge::block_sparse_attention``: dense attention under the layout's mask."""
from __future__ import annotations

from ..common import dense_attention
from .layout import block_tables, dense_block_mask


def block_sparse_attention(q, k, v, mask, scale: float, block: int, local: int, global_: int, random: int,
                           seed: int, topk: int, causal: bool):
    """Softmax attention over the KV blocks named by per-query-block index tables.

    Static tables (``topk == 0``) follow BigBird (local + global + seeded random blocks); dynamic tables
    (``topk > 0``) keep each query block's top-k KV blocks by pooled q·k plus the first block and the
    diagonal. Causal sites stay causal on the original positions; the model's own ``mask`` is ANDed in.
    """
    counts, idx = block_tables(q, k, block, local, global_, random, seed, topk, scale, causal)
    keep = dense_block_mask(counts, idx, q.shape[-2], block, causal)
    return dense_attention(q, k, v, mask, scale, keep)
