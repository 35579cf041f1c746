"""The plain definition of ``attnforge::streaming_heads_attention``: dense attention, one rule per KV head."""
from __future__ import annotations

import torch

from attnforge.codegen import masks

from ..common import dense_attention
from .heads import head_sets


def rule(retrieval, heads: int, n: int, m: int, window: int, sinks: int, causal: bool, device=None) -> torch.Tensor:
    """Boolean keep [H, N, M]: a retrieval head's queries see every key (j ≤ i when causal), a streaming head's the
    sliding-window rule of codegen/masks.py (0 ≤ i − j < window or j < sinks; bidirectional: |i − j| < window
    or j < sinks)."""
    sets = head_sets(retrieval, heads)
    full = masks.dense(masks.causal() if causal else masks.KEEP_ALL, n, m, device=device)
    band = masks.dense(masks.sliding_window(window, sinks, causal), n, m, device=device)
    per_head = torch.zeros(heads, dtype=torch.bool, device=device)
    per_head[list(sets.retrieval_q)] = True
    return torch.where(per_head[:, None, None], full, band)


def streaming_heads_attention(q, k, v, mask, scale: float, retrieval, window: int, sinks: int, causal: bool):
    """DuoAttention's head-wise attention (Xiao et al., 2024): retrieval heads attend exactly, streaming heads
    over attention sinks and a recent window.

    ``retrieval`` has one flag per KV head; query head h reads KV head h // (H / Hkv) and follows its rule: a
    retrieval head softmax(scale·q kᵀ + mask) over every key (j ≤ i when ``causal``), a streaming head the same
    ANDed with key j visible from query i iff 0 ≤ i − j < window or j < sinks (bidirectional: |i − j| < window
    or j < sinks), exactly ``sliding_window_attention``. ``mask`` is the model's (additive or boolean keep).
    q [B, H, N, D], k/v [B, Hkv, M, D]. Rows that see no key give 0.
    """
    keep = rule(retrieval, q.shape[1], q.shape[-2], k.shape[-2], window, sinks, causal, q.device)
    return dense_attention(q, k, v, mask, scale, keep)
