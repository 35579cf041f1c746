"""The PyTorch kernel of ``attnforge::memory_layer``: the sign hash in a few tensor ops, then one weighted
``F.embedding_bag(mode="sum")`` over the K rows of each token (no [tokens, K, d_out] intermediate)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def memory_hash(x: Tensor, tau: int) -> tuple[Tensor, Tensor]:
    """(rows [..., K] int64, w [..., K]) for x [..., d]: each chunk's table row (bucket + k·2^τ) and weight."""
    z = x.unflatten(-1, (x.shape[-1] // tau, tau))
    place = 2 ** torch.arange(tau - 1, -1, -1, device=x.device)  # MSB first
    start = torch.arange(z.shape[-2], device=x.device) * 2 ** tau
    rows = ((z >= 0).long() * place).sum(-1) + start
    w = torch.sigmoid(2 * z.abs()).prod(-1)
    return rows, w


def memory_layer_cpu(x: Tensor, table: Tensor, bias: Optional[Tensor], tau: int) -> Tensor:
    """Σ_k w_k · T[row_k] (+ b) by one weighted ``embedding_bag`` over the K rows of each token."""
    rows, w = memory_hash(x, tau)
    k = rows.shape[-1]
    y = F.embedding_bag(rows.reshape(-1, k), table, per_sample_weights=w.reshape(-1, k).to(table.dtype), mode="sum")
    y = y.view(*x.shape[:-1], table.shape[1]).to(x.dtype)
    return y if bias is None else y + bias
