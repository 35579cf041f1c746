"""The PyTorch kernel of ``attnforge::engram_embed``: hash on the ids' device, one ``F.embedding`` gather; with the
table offloaded to host memory (ids on the GPU), the rows are gathered on the host and only they are copied."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .hashing import engram_rows


def engram_embed_cpu(ids, table, multipliers, ngram, heads, primes, pad_id):
    """Hash on the ids' device, gather on the table's, result on the ids' device: [..., N, H·dim]."""
    if ids.is_cuda and table.device.type == "cpu":
        return _offloaded(ids, table, multipliers, ngram, heads, primes, pad_id)
    rows = engram_rows(ids, multipliers, ngram, heads, primes, pad_id).to(table.device)
    e = F.embedding(rows, table).flatten(-2)
    return e.to(ids.device, non_blocking=True)


def _offloaded(ids, table, multipliers, ngram, heads, primes, pad_id):
    """Gather in pinned host memory, copy only the picked rows to the GPU."""
    rows = engram_rows(ids.cpu(), multipliers, ngram, heads, primes, pad_id)
    staged = torch.empty((*rows.shape, table.shape[1]), dtype=table.dtype, pin_memory=True)
    torch.index_select(table, 0, rows.flatten(), out=staged.view(-1, table.shape[1]))
    return staged.flatten(-2).to(ids.device, non_blocking=True)
