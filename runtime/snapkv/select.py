"""SnapKV's selection rule (Li et al., 2024), as ``../shared/REFERENCES.md`` states it after kvpress.

For a prompt of T keys and the observation window of its last w = min(window, T) queries (after RoPE):

    p[h, i, j]  = softmax_j(scale · q_i · k_j  over the keys j ≤ i that are real), in fp32 (i in the window)
    a[h, j]     = mean over the window's real queries of p[h, i, j], for the keys before the window
    s[h, j]     = avg_pool1d(a[h], kernel, stride 1, zero padding kernel // 2, the padding counted)
    score[g, j] = mean of s[h, j] over the query heads h of KV head g (grouped-query attention)

The window's own keys score above every other and padding keys below; each KV head keeps its ``keep_count`` best
keys, with their original (already rotated) positions. The pooling runs over all T columns with the window's
columns zeroed, which equals pooling the T − w earlier columns with zero padding at both ends.
"""
from __future__ import annotations

import math

import sympy
import torch
import torch.nn.functional as F
from torch import Tensor

from ..common import repeat_heads


def keep_count(n, budget: int, ratio: float, window: int):
    """Keys kept of a prompt of ``n`` real tokens: the budget (``budget`` tokens, or ⌊n·ratio⌋), at least the
    observation window, at most n. ``n``: an int, a SymInt, a tensor of per-row counts or a sympy expression."""
    if isinstance(n, Tensor):
        want = torch.full_like(n, budget) if budget else torch.floor(n * ratio).long()
        return torch.minimum(n, want.clamp(min=window))
    if isinstance(n, sympy.Basic):
        return sympy.Min(n, sympy.Max(budget if budget else sympy.floor(n * sympy.nsimplify(ratio)), window))
    want = budget if budget else (math.floor(n * ratio) if isinstance(n, int) else torch.sym_int(n * ratio))
    return torch.sym_min(n, torch.sym_max(want, window))


def key_scores(q: Tensor, k: Tensor, valid: Tensor, scale: float, window: int, kernel: int) -> Tensor:
    """score [B, Hkv, T] of each key of a chunk q [B, H, T, D], k [B, Hkv, T, D] whose real tokens are
    ``valid`` [B, T]: +inf for the window's keys, −inf for padding."""
    t = q.shape[2]
    w = torch.sym_min(window, t)
    dtype = torch.promote_types(q.dtype, torch.float32)
    qw, kk = q[:, :, t - w:].to(dtype), repeat_heads(k, q.shape[1]).to(dtype)
    s = (qw @ kk.transpose(-1, -2)) * scale  # [B, H, w, T]
    i = torch.arange(t, device=q.device)[t - w:, None]
    j = torch.arange(t, device=q.device)[None, :]
    seen = (j <= i)[None] & valid[:, None, :]  # [B, w, T]: causal inside the window, real keys
    p = torch.softmax(s.masked_fill(~seen[:, None], float("-inf")), -1).nan_to_num(0.0)
    before = j < t - w  # [1, T]: the keys the window scores
    real_q = valid[:, t - w:].to(dtype)  # [B, w]
    a = (p * (real_q[:, None, :, None] * before[None, None].to(dtype))).sum(2)
    a = a / real_q.sum(-1).clamp(min=1)[:, None, None]  # [B, H, T]
    b, h = a.shape[:2]
    box = torch.full((1, 1, kernel), 1.0 / kernel, dtype=dtype, device=q.device)
    pooled = F.conv1d(a.reshape(b * h, 1, t), box, padding=kernel // 2).reshape(b, h, t)
    score = pooled.reshape(b, k.shape[1], h // k.shape[1], t).mean(2)
    score = torch.where(before[None], score, torch.full_like(score, float("inf")))
    return score.masked_fill(~valid[:, None, :], float("-inf"))


def select_keys(q: Tensor, k: Tensor, valid: Tensor, scale: float, budget: int, ratio: float, window: int,
                kernel: int) -> tuple[Tensor, Tensor]:
    """(index [B, Hkv, K], kept [B, Hkv, K]) of the keys each KV head keeps of a chunk: the best
    ``keep_count(real tokens)`` by ``key_scores``, K = ``keep_count(T)`` slots (rows with fewer real tokens mark the
    rest not kept)."""
    t = q.shape[2]
    width = keep_count(t, budget, ratio, window)
    index = key_scores(q, k, valid, scale, window, kernel).topk(width, -1).indices
    per_row = keep_count(valid.sum(-1), budget, ratio, window)  # [B]
    kept = torch.arange(width, device=q.device)[None, None, :] < per_row[:, None, None]
    return index, kept.expand(index.shape)
